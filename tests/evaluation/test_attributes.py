"""Utterance-level attribute evaluation on real espeak-ng speech: verification, cross-lingual retrieval,
counting, the comparisons, the plots and the report section (rendered by headless Chromium)."""

from __future__ import annotations

import doctest
import hashlib

import numpy as np
import pyarrow as pa
import pytest
import soxr
import torch

from spear.evaluation import attributes
from spear.evaluation.attributes import (POOLED, System, Utterances, evaluate_attributes, fbank_system,
                                         mean_pooled_system, posttrained_system, read_utterances,
                                         utterances_from_table, weight_free_targets)
from spear.models.device import torch_threads
from spear.models.posttrain import AttributeSpec, PostTrainModel
from spear.models.student import build_encoder, build_student, export_fields, export_state
from spear.stages.audio import flac_encode, float_to_pcm16
from spear.synthetic.counting import CountingGenerator
from spear.synthetic.speech import ESPEAK_RATE, synth_speech

# Four sentences in three languages; the English text is the pivot.
SENTENCES = {
    "s1": {"en": "the cat is red", "de": "die Katze ist rot", "fr": "le chat est rouge"},
    "s2": {"en": "open the door", "de": "öffne die Tür", "fr": "ouvre la porte"},
    "s3": {"en": "I like green apples", "de": "ich mag grüne Äpfel", "fr": "j'aime les pommes vertes"},
    "s4": {"en": "the dog runs fast", "de": "der Hund läuft schnell", "fr": "le chien court vite"},
}
# A speaker is an espeak-ng voice variant with its own pitch and rate, in every language.
SPEAKERS = {"m3": (145, 30), "f2": (170, 75), "m1": (160, 50), "f4": (150, 62)}
TRAIN_SPEAKERS = ["m1"]
SEEN = {"s1", "s2"}


def _rows() -> list[dict]:
    rows = []

    def add(utt, lang, sid, spk, voice, speed, pitch):
        x = synth_speech(SENTENCES[sid][lang], voice, speed, pitch)
        pcm = float_to_pcm16(soxr.resample(x, ESPEAK_RATE, 16000).astype(np.float32) * 0.8)
        rows.append({"utt_id": utt, "split": "eval", "audio": flac_encode(pcm), "num_samples": len(pcm),
                     "speaker": spk, "language": lang, "text": SENTENCES[sid][lang], "pivot": SENTENCES[sid]["en"],
                     "sentence": sid, "seen_sentence": sid in SEEN, "source": "test", "row": len(rows) + 2})

    for spk, (speed, pitch) in SPEAKERS.items():
        for lang in ("en", "de", "fr"):
            for sid in SENTENCES:
                add(f"{spk}-{lang}-{sid}", lang, sid, spk, f"{lang}+{spk}", speed, pitch)
    add("nospk-en-s1", "en", "s1", None, "en", 150, 50)  # no speaker label: kept for retrieval only
    return rows


@pytest.fixture(scope="module")
def table() -> pa.Table:
    return pa.Table.from_pylist(_rows())


@pytest.fixture(scope="module")
def utts(table) -> Utterances:
    return utterances_from_table(table)


def _key(wav: torch.Tensor) -> str:
    return hashlib.sha1(np.ascontiguousarray(wav.numpy(), dtype=np.float32).tobytes()).hexdigest()


def oracle_system(name: str, wavs, labels, dim: int, noise: float, seed: int = 0, kinds=None,
                  vectors=None) -> System:
    """A system whose embedding of a clip is its label's one-hot (or ``vectors[label]``) plus noise: it
    finds the clip by its samples, so it runs through the same batching as a real system."""
    rng = np.random.default_rng(seed)
    classes = sorted(set(labels))
    lookup = {_key(torch.as_tensor(w)): labels[i] for i, w in enumerate(wavs)}

    def embed(x, lengths):
        rows = []
        for b in range(len(x)):
            lab = lookup[_key(x[b, : int(lengths[b])])]
            v = vectors[lab] if vectors is not None else np.eye(dim)[classes.index(lab)]
            rows.append(v + noise * rng.standard_normal(dim))
        key = next(iter(kinds)) if kinds else POOLED
        return {key: np.stack(rows).astype(np.float32)}

    return System(name, embed, dict(kinds or {}))


def random_system(name: str, dim: int = 16, seed: int = 1) -> System:
    rng = np.random.default_rng(seed)
    return System(name, lambda x, lengths: {POOLED: rng.standard_normal((len(x), dim)).astype(np.float32)})


def tiny_posttrained() -> PostTrainModel:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        enc = build_encoder("zipformer2", "tiny")
        student = build_student(export_fields(enc), export_state(enc), device="cpu")
        return PostTrainModel(student, [AttributeSpec("speaker", "speaker", dim=16, num_classes=4),
                                        AttributeSpec("semantic", "semantic", dim=32),
                                        AttributeSpec("count", "counting", dim=8, tasks={"tones": 6, "higher": 2})],
                              input_layer=True).eval()


def test_doctests():
    from spear.evaluation import report

    assert doctest.testmod(attributes).failed == 0
    assert doctest.testmod(report).failed == 0  # frame_probe_changes


def test_table_reading(table, utts, tmp_path):
    assert len(utts) == table.num_rows == 49
    assert utts.wavs[0].dtype == np.float32 and len(utts.wavs[0]) == table["num_samples"][0].as_py()
    assert utts.column("speaker")[-1] is None and utts.seen[0] is True and utts.seen[-1] is True
    # a missing sentence falls back to the pivot; the parquet file reads the same
    t2 = table.set_column(table.schema.get_field_index("sentence"), "sentence", pa.array([None] * table.num_rows,
                                                                                          pa.string()))
    assert utterances_from_table(t2).sentence[0] == "the cat is red"
    import pyarrow.parquet as pq

    pq.write_table(table, tmp_path / "eval.parquet")
    back = read_utterances(str(tmp_path / "eval.parquet"))
    assert back.utt_id == utts.utt_id and np.array_equal(back.wavs[3], utts.wavs[3])
    with pytest.raises(ValueError, match="utt_id and audio"):
        utterances_from_table([{"id": "x"}])
    # a row whose audio does not decode is left out, counted
    broken = utterances_from_table(table.to_pylist()[:3] + [dict(table.to_pylist()[3], audio=b"fLaC-not-really")])
    assert broken.utt_id == utts.utt_id[:3] and sum(broken.skipped.values()) == 1


def test_oracles_on_real_audio(utts):
    """Embeddings that are the label plus noise score perfectly; random ones score at chance."""
    spk = utts.column("speaker")
    sent = utts.column("sentence")
    targets = weight_free_targets([p for p in utts.column("pivot")], 32)
    by_sentence = {s: targets[i] for i, s in enumerate(sent)}
    speaker_oracle = oracle_system("speaker_oracle", utts.wavs, [s or "?" for s in spk], dim=5, noise=0.05)
    sentence_oracle = oracle_system("sentence_oracle", utts.wavs, sent, dim=32, noise=0.02, seed=2,
                                    kinds={"semantic": "semantic"}, vectors=by_sentence)
    rnd = random_system("random")
    res = evaluate_attributes([speaker_oracle, sentence_oracle, rnd], utts, train_speakers=TRAIN_SPEAKERS,
                              n_bootstrap=200)
    # held-out speakers only, with the exclusions counted
    assert res["data"]["excluded"]["verification"] == {"no speaker label": 1, "speaker seen in training": 12}
    assert res["data"]["excluded"]["table"] == {}
    ver = res["verification"]
    assert ver["trials"]["speakers"] == 3 and ver["trials"]["utterances"] == 36
    assert ver["trials"]["target"] == 3 * 66 and ver["trials"]["nontarget"] == 198
    assert ver["systems"]["speaker_oracle"]["eer"] == 0.0
    assert ver["systems"]["speaker_oracle"]["min_dcf"]["0.01"] == 0.0
    r = ver["systems"]["random"]
    assert 0.3 < r["eer"] < 0.7 and r["eer_ci"][0] <= r["eer"] <= r["eer_ci"][1] and r["eer_ci"][1] > 0.4
    assert r["min_dcf"]["0.01"] > 0.5
    det = ver["systems"]["random"]["det"]
    assert det["fa"][0] == 1.0 and det["miss"][-1] == 1.0 and np.all(np.diff(det["miss"]) >= 0)
    # retrieval: identical sentence embeddings across languages find each other
    block = res["retrieval"]["subsets"]["all"]
    assert res["retrieval"]["languages"] == ["de", "en", "fr"] and block["utterances"] == 49
    s2s = block["speech_to_speech"]
    assert s2s["sentence_oracle"]["recall"] == {"R@1": 1.0, "R@5": 1.0}
    assert len(s2s["sentence_oracle"]["pairs"]) == 6 and s2s["sentence_oracle"]["pairs"]["en->de"]["num_queries"] == 17
    m = np.array(s2s["sentence_oracle"]["matrix"], dtype=float)
    assert np.isnan(np.diag(m)).all() and np.nanmin(m) == 1.0
    assert s2s["random"]["recall"]["R@1"] < 0.6  # 4 sentences, 4 speakers each: chance 0.25
    # speech -> text: the oracle's semantic embedding is its pivot's target
    s2t = block["speech_to_text"]
    assert s2t["sentence_oracle"]["recall"]["R@1"] == 1.0 and s2t["sentence_oracle"]["gallery"] == 4
    assert set(s2t["sentence_oracle"]["by_language"]) == {"de", "en", "fr"}
    assert "no semantic embedding" in s2t["random"]["not_applicable"]
    # seen and unseen sentences apart
    subsets = res["retrieval"]["subsets"]
    assert subsets["seen"]["sentences"] == 2 and subsets["unseen"]["sentences"] == 2
    assert subsets["unseen"]["speech_to_speech"]["sentence_oracle"]["recall"]["R@1"] == 1.0
    # which is better by more than the CI
    cmp = res["comparisons"]
    assert ver["systems"]["sentence_oracle"] == {"not_applicable": "no speaker embedding"}
    assert cmp["verification/eer"]["best"] == "speaker_oracle"
    assert cmp["verification/eer"]["better"] == [["speaker_oracle", "random"]]
    assert cmp["retrieval/all/speech_to_speech/R@1"]["best"] == "sentence_oracle"
    assert "counting" not in res
    # one language and one held-out speaker: neither metric can be measured, and the reasons say why
    en = [i for i, lang in enumerate(utts.language) if lang == "en" and spk[i] in ("m1", "f2")]
    one = Utterances([utts.utt_id[i] for i in en], [utts.wavs[i] for i in en], [spk[i] for i in en],
                     [utts.language[i] for i in en], sentence=[sent[i] for i in en])
    res1 = evaluate_attributes([rnd], one, train_speakers=TRAIN_SPEAKERS, n_bootstrap=20)
    assert "single speaker" in res1["verification"]["not_applicable"]
    assert "needs two languages" in res1["retrieval"]["not_applicable"] and res1["retrieval"]["subsets"] == {}
    # a semantic embedding of another size than the text targets: not applicable, said so
    small = oracle_system("small", utts.wavs, sent, dim=4, noise=0.0, kinds={"semantic": "semantic"})
    res2 = evaluate_attributes([small], utts, n_bootstrap=20)
    assert "size" in res2["retrieval"]["subsets"]["all"]["speech_to_text"]["small"]["not_applicable"] or \
        "dim" in res2["retrieval"]["subsets"]["all"]["speech_to_text"]["small"]["not_applicable"]


def test_real_systems(utts, tmp_path):
    """The post-trained model, the input model's mean-pooled features and fbank on real audio, with a
    held-out synthetic counting set and the demo corpus's event_count."""
    from spear.synthetic.corpus import generate_demo_corpus

    corpus = generate_demo_corpus(tmp_path / "corpus", size="tiny", seed=0)
    model = tiny_posttrained()
    systems = [posttrained_system(model), mean_pooled_system(model.student), fbank_system()]
    seed = attributes.counting_eval_seed([0])
    items = CountingGenerator(tasks=("tones", "higher"), seed=seed).balanced(2)
    with torch_threads(1):
        res = evaluate_attributes(systems, utts, train_speakers=TRAIN_SPEAKERS, counting_items=items,
                                  counting_info={"seed": seed}, corpus_root=str(corpus.root), probe_seeds=(0,),
                                  l2_grid=(1e-2,), n_bootstrap=100)
    names = ["posttrained", "input", "fbank"]
    assert [s["name"] for s in res["systems"]] == names
    assert res["systems"][0]["embedding_for"] == {"speaker": "speaker", "semantic": "semantic", "counting": "count"}
    for n in names:
        v = res["verification"]["systems"][n]
        assert 0.0 <= v["eer"] <= 1.0 and 0.0 <= v["eer_ci"][0] <= v["eer_ci"][1] <= 1.0
    # espeak-ng voices differ in pitch and rate: fbank's mean + std separate them better than chance
    assert res["verification"]["systems"]["fbank"]["eer"] < 0.4
    s2t = res["retrieval"]["subsets"]["all"]["speech_to_text"]
    assert 0.0 <= s2t["posttrained"]["recall"]["R@1"] <= 1.0 and "not_applicable" in s2t["fbank"]
    syn = res["counting"]["synthetic"]
    assert syn["seed"] == seed and syn["tasks"] == ["tones", "higher"] and syn["num_test"] == 8
    assert set(syn["systems"]["posttrained"]) == {"embedding", "probe", "head"}
    assert syn["systems"]["posttrained"]["head"]["num_test"] == 8 and "head" not in syn["systems"]["fbank"]
    for n in names:
        p = syn["systems"][n]["probe"]
        assert 0.0 <= p["accuracy"] <= 1.0 and set(p["tasks"]) == {"tones", "higher"}
    ev = res["counting"]["event_count"]
    assert ev["files"] == 10 and ev["systems"]["fbank"]["num_test"] == 2
    assert set(res["comparisons"]) >= {"verification/eer", "retrieval/all/speech_to_speech/R@1",
                                       "retrieval/seen/speech_to_text/R@1", "counting/synthetic/probe",
                                       "counting/event_count/probe"}
    import json

    json.dumps(res)  # JSON-ready


def test_evaluate_a_posttrained_export(table, tmp_path):
    """`spear evaluate` on a post-trained export laid out as `spear posttrain` writes it: the attribute
    section, the input model probed beside the post-trained encoder, and the report in headless Chromium."""
    import json

    import pyarrow.parquet as pq

    from spear.pipeline.evaluate_job import run_evaluate
    from spear.stages.artefacts import export_posttrained, export_student
    from spear.synthetic.corpus import generate_demo_corpus
    from support.browser import dump_dom, image_marks

    corpus = generate_demo_corpus(tmp_path / "corpus", size="tiny", seed=0)
    model = tiny_posttrained()
    out = tmp_path / "run" / "posttrain"
    export_student(model.student, str(out / "input-model"))
    export_posttrained(model, str(out / "model"), metadata={
        "input_model": "runs/student", "input_model_loaded_from": str(out / "input-model"), "speakers": TRAIN_SPEAKERS,
        "attributes": {"count": {"kind": "counting", "tasks": ["tones", "higher"], "clip_seconds": 1.5}}})
    (out / "data").mkdir()
    pq.write_table(table, out / "data" / "eval.parquet")
    summary = run_evaluate(str(out / "model"), str(corpus.root), output=str(tmp_path / "eval"), seeds=(0,),
                           tasks=["event_count", "speaker"], l2_grid=(1e-2,), random_student=False, fbank_floor=False,
                           counting_per_class=2, attribute_bootstrap=50, num_threads=1, progress=False)
    attrs = summary.attributes
    assert [s["name"] for s in attrs["systems"]] == ["posttrained", "input", "fbank"]
    assert attrs["data"]["source"] == {"table": str(out / "data" / "eval.parquet")}
    assert attrs["data"]["excluded"]["verification"] == {"no speaker label": 1, "speaker seen in training": 12}
    # 1.5 s clips hold at most 5 tones: 5 + 2 classes, 2 clips each, half of them test clips
    assert attrs["counting"]["synthetic"]["clip_seconds"] == 1.5 and attrs["counting"]["synthetic"]["num_test"] == 7
    assert attrs["counting"]["event_count"]["files"] == 10
    # the frame-level probes before and after: the input model is probed as student:input
    assert {r["model"] for r in summary.probes} == {"student", "student:input"}
    assert attrs["frame_probes"] == {"before": "student:input", "after": "student"}
    # the encoder was not changed here: the same features, the same probe scores before and after
    for t in ("event_count", "speaker"):
        assert summary.best[t]["student"]["score"] == summary.best[t]["student:input"]["score"]
    page = (tmp_path / "eval" / "index.html").read_text()
    assert "Utterance-level attributes" in page and "speaker verification EER" in page
    assert page.count("<td>same</td>") == 2  # before / after table: no regression
    saved = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert saved["attributes"]["comparisons"].keys() == attrs["comparisons"].keys()
    assert "verification/eer" in summary.human() and "counting/synthetic/probe" in summary.human()
    for name in ("attributes_det.png", "attributes_retrieval.png", "attributes_bars.png"):
        assert (tmp_path / "eval" / name).stat().st_size > 5000
    marks = image_marks(dump_dom(tmp_path / "eval" / "index.html", tmp_path / "profile"))
    assert {"attributes_det.png", "attributes_retrieval.png", "attributes_bars.png"} <= set(marks)
    assert set(marks.values()) == {"1"}, marks


def test_eval_manifests_of_the_multilingual_corpus(tmp_path):
    """Held-out manifests (the multilingual demo corpus's eval.jsonl, plus rows that cannot be used) read and
    decoded by the post-training data's own reader; seen / unseen sentences from the training table."""
    import json

    import pyarrow.parquet as pq

    from spear.cluster.storage import Storage
    from spear.pipeline.posttrain_eval import AttributeEvalSettings, evaluate_posttrained, posttrained_config
    from spear.schemas.posttrain_data import POSTTRAIN_UTTERANCE_SCHEMA
    from spear.stages.artefacts import export_posttrained
    from spear.stages.posttrain_data import decode_items, read_manifests
    from spear.synthetic.multilingual import generate_multilingual_corpus

    corpus = generate_multilingual_corpus(tmp_path / "ml", size="tiny")
    storage = Storage()
    out = tmp_path / "run" / "posttrain"
    (out / "data").mkdir(parents=True)
    items, _, _ = read_manifests([str(corpus.train_manifest)], [], storage)
    train, _ = decode_items(items, storage)
    pq.write_table(train.replace_schema_metadata(POSTTRAIN_UTTERANCE_SCHEMA.metadata), out / "data" / "train.parquet")
    export_posttrained(tiny_posttrained(), str(out / "model"), metadata={"speakers": corpus.speakers["train"]})
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "gone", "audio": "nowhere.flac", "speaker": "x", "language": "en"}) + "\n")

    settings = AttributeEvalSettings(eval_manifests=(str(corpus.eval_manifest), str(bad)), counting_per_class=2,
                                     n_bootstrap=50)
    export = str(out / "model")
    res = evaluate_posttrained(export, posttrained_config(export, storage), settings, input_model=None,
                               corpus_root=None, storage=storage, device=torch.device("cpu"), probe_seeds=(0,),
                               l2_grid=(1e-2,))
    source = res["data"]["source"]
    assert source["manifests"] == [str(corpus.eval_manifest), str(bad)] and source["set_aside"] == {"missing audio": 1}
    assert [s["name"] for s in res["systems"]] == ["posttrained", "fbank"]
    assert any("no input model" in n for n in res["notes"])
    # held-out speakers only: nothing excluded from the trials
    assert res["data"]["excluded"]["verification"] == {}
    assert res["verification"]["trials"]["speakers"] == len(corpus.speakers["eval"])
    # seen / unseen as the manifest says, found from the training rows
    rows = [json.loads(line) for line in corpus.eval_manifest.read_text().splitlines()]
    subsets = res["retrieval"]["subsets"]
    assert source["seen"]["utterances"] == sum(r["seen_sentence"] for r in rows)
    assert subsets["seen"]["sentences"] == len({r["sentence"] for r in rows if r["seen_sentence"]})
    assert subsets["unseen"]["sentences"] == len({r["sentence"] for r in rows if not r["seen_sentence"]})
    assert res["retrieval"]["languages"] == sorted({r["language"] for r in rows})


def test_text_encoder_targets(table, tmp_path):
    """Semantic targets from a transformers sentence encoder: speech -> text against the encoder's embeddings
    of the pivot texts; without the encoder's folder it is not evaluated, and said so."""
    from spear.cluster.storage import Storage
    from spear.pipeline.posttrain_eval import AttributeEvalSettings, evaluate_posttrained, posttrained_config
    from spear.stages.artefacts import export_posttrained
    from spear.stages.text_targets import load_text_encoder
    from support.text_encoders import tiny_bert

    words = sorted({w for s in SENTENCES.values() for w in s["en"].lower().split()})
    folder = tiny_bert(tmp_path / "bert", words, hidden=24)
    with torch.random.fork_rng():
        torch.manual_seed(1)
        enc = build_encoder("zipformer2", "tiny")
        model = PostTrainModel(build_student(export_fields(enc), export_state(enc), device="cpu"),
                               [AttributeSpec("meaning", "semantic", dim=24)])
    export = str(tmp_path / "model")
    export_posttrained(model, export, metadata={"attributes": {"meaning": {"kind": "semantic", "target_field": "pivot",
                                                                            "targets": "text_encoder"}}})
    import pyarrow.parquet as pq

    pq.write_table(table, tmp_path / "eval.parquet")
    storage = Storage()
    run = lambda encoder: evaluate_posttrained(  # noqa: E731
        export, posttrained_config(export, storage),
        AttributeEvalSettings(eval_table=str(tmp_path / "eval.parquet"), counting_per_class=2, n_bootstrap=20,
                              text_encoder=encoder),
        input_model=None, corpus_root=None, storage=storage, device=torch.device("cpu"), probe_seeds=(0,),
        l2_grid=(1e-2,))
    res = run(folder)
    assert res["model"]["text_encoder"] == folder
    s2t = res["retrieval"]["subsets"]["all"]["speech_to_text"]["posttrained"]
    assert s2t["gallery"] == 4 and s2t["num_queries"] == 49 and 0.0 <= s2t["recall"]["R@1"] <= 1.0
    # the encoder's targets are what the retrieval ranks against: an oracle holding them finds every sentence
    encoder, _ = load_text_encoder(folder, storage, "text_encoder")
    sent = [s for s in table["sentence"].to_pylist()]
    vectors = dict(zip(SENTENCES, encoder.encode([SENTENCES[s]["en"] for s in SENTENCES])))
    # (a random BERT's sentence vectors lie close together: no noise on them)
    oracle = oracle_system("oracle", utterances_from_table(table).wavs, sent, dim=24, noise=0.0,
                           kinds={"meaning": "semantic"}, vectors=vectors)
    r = evaluate_attributes([oracle], utterances_from_table(table), n_bootstrap=20,
                            text_targets=lambda texts, dim: encoder.encode(list(texts)))
    assert r["retrieval"]["subsets"]["all"]["speech_to_text"]["oracle"]["recall"]["R@1"] == 1.0
    # without the folder: not evaluated, with the reason
    res = run(None)
    assert any("text encoder" in n for n in res["notes"])
    assert res["retrieval"]["subsets"]["all"]["speech_to_text"]["posttrained"] == {"not_applicable": "no text targets given"}


def test_posttrained_export_on_s3(table, tmp_path, s3_storage, s3_server):
    """The export and the prepared tables on SeaweedFS, laid out as `spear posttrain` writes them: the held-out
    table is found beside the export and the training table marks the seen sentences."""
    import io
    import uuid

    import pyarrow.parquet as pq

    from spear.cluster.storage import join_uri
    from spear.pipeline.posttrain_eval import AttributeEvalSettings, evaluate_posttrained, posttrained_config
    from spear.schemas.posttrain_data import utterance_table
    from spear.stages.artefacts import export_posttrained

    root = f"s3://{s3_server.bucket}/post-{uuid.uuid4().hex[:8]}/posttrain"
    export = join_uri(root, "model")
    export_posttrained(tiny_posttrained(), export, metadata={"speakers": TRAIN_SPEAKERS}, storage=s3_storage)
    rows = table.to_pylist()  # as prepared tables (their schema keeps no seen_sentence)
    for name, t in (("eval.parquet", utterance_table(rows)),
                    ("train.parquet", utterance_table([dict(r, split="train") for r in rows if r["sentence"] in SEEN]))):
        buf = io.BytesIO()
        pq.write_table(t, buf)
        s3_storage.write_bytes(join_uri(root, "data", name), buf.getvalue())
    config = posttrained_config(export, s3_storage)
    assert config is not None and posttrained_config(str(tmp_path), s3_storage) is None
    res = evaluate_posttrained(export, config, AttributeEvalSettings(counting_per_class=2, n_bootstrap=20),
                               input_model=None, corpus_root=None, storage=s3_storage, device=torch.device("cpu"),
                               probe_seeds=(0,), l2_grid=(1e-2,))
    assert res["data"]["source"]["table"] == join_uri(root, "data", "eval.parquet")
    assert res["data"]["source"]["seen"] == {"from": join_uri(root, "data", "train.parquet"), "utterances": 25}
    assert res["retrieval"]["subsets"]["seen"]["sentences"] == 2 and res["retrieval"]["subsets"]["unseen"]["sentences"] == 2
    assert res["data"]["excluded"]["verification"] == {"no speaker label": 1, "speaker seen in training": 12}
