import pytest
import yaml

from spear.config import ConfigError, SpearConfig, commented_default_config, dump_config, load_config


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


@pytest.mark.parametrize("text, expected", [("2:4", (2, 4)), ('"2:4"', (2, 4)), ("[2, 4]", (2, 4)), ("3", (3, 3)),
                                            ("'1:1'", (1, 1)), ("[2]", (2, 2))])
def test_workers_forms_in_a_file_and_in_set(tmp_path, text, expected):
    """YAML 1.1 reads 2:4 as the base-60 integer 124; the config loader does not."""
    p = tmp_path / "w.yaml"
    p.write_text(f"train:\n  workers: {text}\n")
    assert load_config(p).train.workers == expected
    assert load_config(None, [f"train.workers={text}"]).train.workers == expected


@pytest.mark.parametrize("text", ["two", "2:x", "4:2", "0", "[1, 2, 3]", "yes", "1.5"])
def test_bad_workers_say_what_is_expected(text):
    with pytest.raises(ConfigError) as ei:
        load_config(None, [f"train.workers={text}"])
    msg = str(ei.value)
    assert "train.workers: expected" in msg and "MIN:MAX" in msg and "2:4" in msg


def test_config_loader_drops_only_base_60_numbers():
    from spear.config import load_yaml

    assert load_yaml("a: 1:30\nb: 190\nc: 1.5\nd: 0x10\ne: .inf\nf: 1_000\ng: true\nh: ~\ni: 2:4.5\n") == {
        "a": "1:30", "b": 190, "c": 1.5, "d": 16, "e": float("inf"), "f": 1000, "g": True, "h": None, "i": "2:4.5"}
    assert yaml.safe_load("a: 1:30")["a"] == 90  # what PyYAML alone does


@pytest.mark.parametrize("override, line", [
    ("storage.retries=x", "storage.retries: must be a whole number (given: 'x')"),
    ("storage.retries=-1", "storage.retries: must be at least 0 (given: -1)"),
    ("decode.max_segment_seconds=lots", "decode.max_segment_seconds: must be a valid number (such as 30 or 2.5) "
                                        "(given: 'lots')"),
    ("decode.max_segment_seconds=1:30", "decode.max_segment_seconds: must be a valid number"),
    ("storage.anonymous=maybe", "storage.anonymous: must be true or false (given: 'maybe')"),
    ("teachers.speech.kind=bert", "teachers.speech.kind: must be 'mfcc', 'fbank', 'wavlm', 'hubert', 'dasheng', "
                                  "'resemblyzer', 'crepe', 'student' or 'spear' (given: 'bert')"),
    ("train.mixing.speech_snr_db=5", "train.mixing.speech_snr_db: must be a list, such as [a, b] (given: 5)"),
    ("decode=3", "decode: must be a section of `key: value` fields (given: 3)"),
    ("corpus.sources=[{uri: /x}]", "corpus.sources.0.domain: is required but missing"),
    ("decode.min_segment_seconds=40", "decode: min_segment_seconds must be below max_segment_seconds"),
])
def test_config_errors_are_worded_without_pydantic(override, line):
    with pytest.raises(ConfigError) as ei:
        load_config(None, [override])
    msg = str(ei.value)
    assert line in msg
    assert "Input should" not in msg and "Value error" not in msg and "pydantic" not in msg


def test_secret_values_never_appear_in_config_errors(tmp_path):
    secrets = {"access_key_id": "AKIA-example-0042", "secret_access_key": "s3cr3t-example-0042",
               "session_token": "tok-example-0042"}
    sets = [f"storage.{k}={v}" for k, v in secrets.items()]
    cases = [(None, sets + ["storage.retries=x"]), (None, [f"storage.{k}=[{v}, 1]" for k, v in secrets.items()]),
             (None, ["storage.session_token=[tok-example-0042"])]
    p = tmp_path / "c.yaml"
    p.write_text("storage:\n" + "".join(f"  {k}: {v}\n" for k, v in secrets.items()) + "  retries: [oops\n")
    cases.append((p, []))
    for path, overrides in cases:
        with pytest.raises(ConfigError) as ei:
            load_config(path, overrides)
        assert not [v for v in secrets.values() if v in str(ei.value)], str(ei.value)


def test_posttrain_counting_task_names_are_the_generators():
    from spear.config import COUNTING_TASK_NAMES
    from spear.synthetic.counting import COUNTING_TASKS

    assert tuple(COUNTING_TASK_NAMES) == tuple(COUNTING_TASKS)


def test_posttrain_config_errors_name_the_field():
    import pytest

    from spear.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"posttrain\.attributes.*unique; repeated: a"):
        load_config(None, ["posttrain.attributes=[{name: a, kind: speaker}, {name: a, kind: counting}]"])
    with pytest.raises(ConfigError, match=r"posttrain\.attributes\.0\.kind"):
        load_config(None, ["posttrain.attributes=[{name: a, kind: emotion}]"])
    cfg = load_config(None, ["posttrain.workers=1:2"])
    assert cfg.posttrain.workers == (1, 2) and [a.kind for a in cfg.posttrain.attributes] == ["speaker", "semantic", "counting"]
