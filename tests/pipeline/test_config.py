import pytest
import yaml

from spear.pipeline.config import ConfigError, SpearConfig, commented_default_config, dump_config, load_config


def test_defaults_need_no_file():
    cfg = load_config(None)
    assert cfg.decode.max_segment_seconds == 30.0
    assert cfg.teachers.speech.kind == "mfcc" and cfg.teachers.audio.kind == "fbank"
    assert cfg.mvq.speech_codebooks == 16 and cfg.mvq.audio_codebooks == 8


def test_overrides_are_typed(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("decode:\n  max_segment_seconds: 20\n")
    cfg = load_config(p, ["decode.max_segment_seconds=12.5", "corpus.sources=[{uri: s3://b/x, domain: audio}]",
                          "train.workers=[1, 4]"])
    assert cfg.decode.max_segment_seconds == 12.5
    assert cfg.corpus.sources[0].domain == "audio" and cfg.corpus.sources[0].source_name == "x"
    assert cfg.train.workers == (1, 4)


def test_invalid_file_names_file_field_and_expectation(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("decode:\n  max_segment_seconds: -1\n  max_segmnt: 3\nmvq:\n  codebook_size: 100\n"
                 "corpus:\n  sources:\n    - {uri: /x, domain: music}\n")
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    msg = str(ei.value)
    assert str(p) in msg
    assert "decode.max_segment_seconds" in msg and "greater than 0" in msg
    assert "decode.max_segmnt" in msg and "unknown field" in msg
    assert "mvq.codebook_size" in msg and "power of two" in msg
    assert "corpus.sources.0.domain" in msg and "'speech' or 'audio'" in msg


@pytest.mark.parametrize("text, expected", [
    ("[1, 2", "not valid YAML"),
    ("- a\n- b\n", "expected a mapping"),
])
def test_malformed_files(tmp_path, text, expected):
    p = tmp_path / "m.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=expected):
        load_config(p)


def test_missing_file_and_bad_override():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("/nonexistent/spear.yaml")
    with pytest.raises(ConfigError, match="expected section.key=value"):
        load_config(None, ["decode.max_segment_seconds"])
    with pytest.raises(ConfigError, match="teachers.speech.*needs `path`"):
        load_config(None, ["teachers.speech={kind: wavlm}"])


def test_secrets_are_masked():
    cfg = load_config(None, ["storage.access_key_id=AKIAEXAMPLE", "storage.secret_access_key=supersecret"])
    shown = dump_config(cfg)
    assert "supersecret" not in shown and "AKIAEXAMPLE" not in shown and "***" in shown
    assert "supersecret" not in repr(cfg)


def test_commented_default_config_round_trips():
    text = commented_default_config()
    assert "# S3 endpoint" in text
    data = yaml.safe_load(text)
    assert SpearConfig.model_validate(data) == SpearConfig()
