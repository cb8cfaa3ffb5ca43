"""Semantic targets: the weight-free pivot embedding and a transformers encoder (a tiny random BERT saved into
tmp_path with a tokenizer built from a vocabulary written here: nothing is downloaded), cached per text."""

from __future__ import annotations

import json
import os
import uuid

import numpy as np
import pyarrow as pa
import pytest
import torch

from spear.cluster.storage import Storage
from spear.config import AttributeConfig, ConfigError
from spear.models.posttrain import pivot_text_embedding
from spear.stages.text_targets import build_text_targets, target_texts

WORDS = "the cat sat on a mat dog ran far away hello world good day morning".split()


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> str:
    from transformers import BertConfig, BertModel, BertTokenizerFast

    root = tmp_path_factory.mktemp("bert")
    vocab = root / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS) + "\n")
    out = root / "encoder"
    BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(out)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=5 + len(WORDS), hidden_size=24, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=48, max_position_embeddings=32)).save_pretrained(out)
    return str(out)


def mean_pooled_reference(folder: str, text: str) -> np.ndarray:
    """What the encoder gives for one text alone (no padding), pooled and normalised by hand."""
    from transformers import AutoModel, AutoTokenizer

    tok, model = AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder).eval()
    with torch.no_grad():
        h = model(**tok([text], return_tensors="pt")).last_hidden_state[0]
    v = h.mean(0).numpy()
    return v / np.linalg.norm(v)


def test_target_texts_prefer_the_pivot():
    t = pa.table({"pivot": ["good day", None, None], "text": ["guten tag", "hello", None]})
    assert target_texts(t) == ["good day", "hello", None]
    assert target_texts(t, "text") == ["guten tag", "hello", None]


def test_pivot_targets_are_cached_per_text(tmp_path):
    attr = AttributeConfig(name="semantic", kind="semantic", dim=64)
    data = str(tmp_path / "data")
    first = build_text_targets(["good day", "hello world", None, "good day"], attr, 1, data, Storage())
    assert first.texts == ["good day", "hello world"] and first.vectors.shape == (2, 64) and first.cached == 0
    assert np.allclose(first.vectors, pivot_text_embedding(first.texts, dim=64).numpy())
    assert first.lookup(["hello world", None, "good day"]).tolist() == [1, -1, 0]
    with pytest.raises(KeyError, match="the cat"):
        first.lookup(["the cat"])
    rec = json.loads((tmp_path / "data/targets-semantic.json").read_text())
    assert rec["encoder"] == "pivot-hash:64" and rec["texts"] == first.texts
    again = build_text_targets(["hello world", "the cat sat", "good day"], attr, 1, data, Storage())
    assert again.cached == 2 and again.texts == ["good day", "hello world", "the cat sat"]
    assert np.allclose(again.vectors[:2], first.vectors)
    # another width is another encoder: nothing reused
    wider = build_text_targets(["good day"], AttributeConfig(name="semantic", kind="semantic", dim=128), 1, data,
                               Storage())
    assert wider.cached == 0 and wider.dim == 128


def test_transformers_encoder_local_and_s3(tiny_bert, tmp_path, s3_server, s3_storage):
    attr = AttributeConfig(name="meaning", kind="semantic", text_encoder=tiny_bert)
    texts = ["the cat sat on a mat", "hello world", "a dog ran far away"]
    targets = build_text_targets(texts, attr, 0, str(tmp_path / "d"), Storage())
    assert targets.dim == 24 and targets.encoder.startswith("transformers:")
    assert np.allclose(np.linalg.norm(targets.vectors, axis=1), 1.0, atol=1e-5)
    for text in texts:    # padded batches pool only the real tokens
        assert np.allclose(targets.vectors[targets.texts.index(text)], mean_pooled_reference(tiny_bert, text),
                           atol=1e-4)
    assert build_text_targets(texts, attr, 0, str(tmp_path / "d"), Storage()).cached == 3

    base = f"s3://{s3_server.bucket}/enc-{uuid.uuid4().hex[:8]}"
    for name in os.listdir(tiny_bert):
        s3_storage.write_bytes(f"{base}/encoder/{name}", open(os.path.join(tiny_bert, name), "rb").read())
    remote = AttributeConfig(name="meaning", kind="semantic", text_encoder=f"{base}/encoder")
    on_s3 = build_text_targets(texts, remote, 0, f"{base}/data", s3_storage)
    assert on_s3.encoder == targets.encoder and np.allclose(on_s3.vectors, targets.vectors, atol=1e-6)


def test_unusable_encoder_folders_are_config_errors(tmp_path):
    missing = AttributeConfig(name="m", kind="semantic", text_encoder=str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match=r"^posttrain.attributes\[2\].text_encoder: .*nope does not exist"):
        build_text_targets(["hi"], missing, 2, str(tmp_path / "d"), Storage())
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "weights.bin").write_bytes(b"\0" * 16)
    with pytest.raises(ConfigError, match=r"attributes\[0\].text_encoder: .*not a transformers model folder"):
        build_text_targets(["hi"], AttributeConfig(name="m", kind="semantic", text_encoder=str(foreign)), 0,
                           str(tmp_path / "d"), Storage())
    (foreign / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(ConfigError, match="not a transformers model folder") as err:
        build_text_targets(["hi"], AttributeConfig(name="m", kind="semantic", text_encoder=str(foreign)), 0,
                           str(tmp_path / "d"), Storage())
    assert "\n" not in str(err.value)
