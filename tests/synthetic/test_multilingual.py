"""The multilingual espeak-ng corpus: its plan (speakers, sentences, splits), real synthesis of the tiny size,
manifests read by the post-training reader, the cache and determinism."""

from __future__ import annotations

import os
from collections import defaultdict

import numpy as np
import pytest
import soundfile as sf

from spear.cluster.storage import Storage
from spear.stages.posttrain_data import read_manifests
from spear.synthetic.multilingual import (SIZES, generate_multilingual_corpus, plan_multilingual)
from spear.synthetic.multilingual_sentences import LANGUAGES, SENTENCES


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return generate_multilingual_corpus(tmp_path_factory.mktemp("ml") / "corpus", size="tiny", seed=3)


def test_demo_plan_has_held_out_speakers_and_sentences():
    train_spk, eval_spk, utts = plan_multilingual("demo", 0)
    assert len(train_spk) == 24 and len(eval_spk) == 16 and len(SENTENCES) >= 36 and len(LANGUAGES) >= 4
    voices = {(s.variant, s.pitch, s.rate) for s in train_spk + eval_spk}
    assert len(voices) == 40                                            # every speaker sounds different
    train = [u for u in utts if u["split"] == "train"]
    ev = [u for u in utts if u["split"] == "eval"]
    assert (len(train), len(ev)) == (576, 672)
    assert not {u["speaker"] for u in train} & {u["speaker"] for u in ev}
    per_speaker = defaultdict(set)
    for u in train:
        per_speaker[u["speaker"]].add(u["language"])
    assert all(langs == set(LANGUAGES) for langs in per_speaker.values())  # a speaker speaks every language
    train_sentences = {u["sentence"] for u in train}
    unseen = {u["sentence"] for u in ev if not u["seen_sentence"]}
    seen = {u["sentence"] for u in ev if u["seen_sentence"]}
    assert len(unseen) == 6 and not unseen & train_sentences and seen <= train_sentences and len(seen) == 8
    by_sentence = defaultdict(set)
    for u in ev:
        by_sentence[u["sentence"]].add(u["language"])
    assert all(len(langs) == 4 for langs in by_sentence.values())      # parallel items in every language
    assert len({u["id"] for u in utts}) == len(utts)
    assert plan_multilingual("demo", 1)[2] != utts                      # another seed, another corpus


def test_tiny_corpus_is_real_speech_read_by_the_posttrain_reader(tiny):
    spec = SIZES["tiny"]
    assert tiny.utterances == {"train": spec.train_speakers * spec.per_speaker * len(LANGUAGES),
                               "eval": spec.eval_speakers * (spec.eval_seen + spec.unseen_sentences)
                               * spec.eval_languages}
    items, bad, notes = read_manifests([str(tiny.train_manifest)], [str(tiny.eval_manifest)], Storage())
    assert bad == [] and notes == {} and len(items) == sum(tiny.utterances.values())
    rows = tiny.rows("eval")
    assert {r["seen_sentence"] for r in rows} == {True, False}
    audio = {}
    for r in tiny.rows("train") + rows:
        x, sr = sf.read(tiny.root / r["audio"], dtype="float32")
        assert sr == 16000 and x.ndim == 1 and 0.4 < x.size / sr < 6 and np.abs(x).max() > 0.05
        audio[r["id"]] = x
    # one speaker, one sentence, two languages: other words, other audio
    spk, sent = rows[0]["speaker"], rows[0]["sentence"]
    same = [r for r in rows if r["speaker"] == spk and r["sentence"] == sent]
    assert len({r["language"] for r in same}) >= 2 and len({r["text"] for r in same}) >= 2
    a, b = audio[same[0]["id"]], audio[same[1]["id"]]
    assert a.size != b.size or not np.allclose(a, b)
    # one sentence in one language by two speakers: another voice
    by_key = defaultdict(list)
    for r in tiny.rows("train"):
        by_key[(r["sentence"], r["language"])].append(r)
    pairs = [(audio[v[0]["id"]], audio[v[1]["id"]]) for v in by_key.values() if len(v) >= 2]
    for r in rows:
        by_key[(r["sentence"], r["language"])].append(r)
    pairs += [(audio[v[0]["id"]], audio[v[-1]["id"]]) for v in by_key.values()
              if len(v) >= 2 and v[0]["speaker"] != v[-1]["speaker"]]
    assert pairs and all(x.size != y.size or not np.allclose(x, y) for x, y in pairs)
    # the pivot is the English sentence, shared by the translations
    for r in rows:
        assert r["pivot"] == SENTENCES[int(r["sentence"][1:]) - 1][0]


def test_cached_and_deterministic(tiny, tmp_path, monkeypatch):
    mtime = os.stat(tiny.train_manifest).st_mtime_ns
    again = generate_multilingual_corpus(tiny.root, size="tiny", seed=3)
    assert again == tiny and os.stat(tiny.train_manifest).st_mtime_ns == mtime
    monkeypatch.chdir(tmp_path)              # a relative root
    other = generate_multilingual_corpus("copy", size="tiny", seed=3, workers=1)
    assert other.root == tmp_path / "copy"
    assert other.train_manifest.read_bytes() == tiny.train_manifest.read_bytes()
    for r in other.rows("train") + other.rows("eval"):
        assert (other.root / r["audio"]).read_bytes() == (tiny.root / r["audio"]).read_bytes(), r["id"]
