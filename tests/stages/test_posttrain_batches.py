"""Post-training batches: labels per attribute, sample weights, crops, rank parts, exact resume, elastic merge."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from spear.config import AttributeConfig, ConfigError
from spear.models.posttrain import pivot_text_embedding
from spear.stages.audio import flac_encode
from spear.stages.posttrain_batches import PostTrainBatches, PostTrainDataError, plan_posttrain
from spear.stages.train_data import resume_state
from spear.synthetic.counting import CountingGenerator

SR = 16000


def _table(n: int = 20, seed: int = 0) -> pa.Table:
    """n utterances of tones (real FLAC bytes), 0.5-3 s; speakers s0..s3 (every 5th row none), a pivot
    text shared by pairs of rows (translations), every 4th row no text at all."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        length = int(rng.integers(SR // 2, 3 * SR))
        wav = (0.3 * np.sin(2 * np.pi * (200 + 10 * i) * np.arange(length) / SR) * 32767).astype(np.int16)
        rows.append({"utt_id": f"u{i:03d}", "split": "train", "audio": flac_encode(wav), "num_samples": length,
                     "speaker": None if i % 5 == 4 else f"s{i % 4}", "language": "en" if i % 2 else "de",
                     "text": None if i % 4 == 3 else f"sentence number {i // 2}",
                     "pivot": None if i % 4 == 3 else f"sentence number {i // 2}",
                     "sentence": None if i % 4 == 3 else f"sent{i // 2}", "source": "m.csv", "row": i + 1})
    return pa.Table.from_pylist(rows)


def TARGETS(texts, attribute):
    return pivot_text_embedding(texts, attribute.dim).numpy()


ATTRS = [AttributeConfig(name="spk", kind="speaker", dim=8, sample_weight=2.0),
         AttributeConfig(name="sem", kind="semantic", dim=16),
         AttributeConfig(name="cnt", kind="counting", dim=8, tasks=["tones", "higher"], sample_weight=1.0)]


def _loader(table, plan, rank=0, world=1, state=None, step=0, batch_size=6, max_seconds=1.0):
    return PostTrainBatches(table, plan, rank=rank, world_size=world, batch_size=batch_size, max_seconds=max_seconds,
                            seed=3, state=state, step=step)


def test_plan_labels_speakers_targets_and_groups():
    t = _table()
    plan = plan_posttrain(t, ATTRS, clip_seconds=1.0, counting_generator=CountingGenerator, targets=TARGETS)
    assert plan.speakers == ("s0", "s1", "s2", "s3")
    assert plan.speaker_index.tolist()[:6] == [0, 1, 2, 3, -1, 1]
    sem = plan.semantic["sem"]
    texts = t.column("pivot").to_pylist()
    for i, text in enumerate(texts):
        if text is None:
            assert sem.index[i] == -1 and sem.groups[i] == -1
        else:
            assert torch.equal(torch.from_numpy(sem.vectors[sem.index[i]]), pivot_text_embedding([text], 16)[0])
    assert sem.groups[0] == sem.groups[1] != sem.groups[2]  # translations of one sentence share a group
    specs = {s.name: s for s in plan.specs()}
    assert specs["spk"].num_classes == 4 and specs["sem"].dim == 16
    assert specs["cnt"].tasks == {"tones": 5, "higher": 2}  # 1 s clips: at most 5 tones (6 at 2 s)
    assert plan.info()["attributes"]["sem"]["distinct_targets"] == len(sem.texts)


def test_plan_refuses_an_attribute_no_row_can_train():
    t = _table().drop_columns(["speaker"])
    with pytest.raises(ConfigError, match="'spk' \\(speaker\\).*no row has a speaker"):
        plan_posttrain(t, ATTRS, targets=TARGETS)
    none = pa.array([None] * 20, pa.string())
    t = _table().set_column(6, "text", none).set_column(7, "pivot", none)
    with pytest.raises(ConfigError, match="'sem' \\(semantic\\).*pivot or text"):
        plan_posttrain(t, ATTRS, targets=TARGETS)


def test_batches_carry_each_rows_labels_crop_and_follow_sample_weights():
    t = _table()
    plan = plan_posttrain(t, ATTRS, clip_seconds=1.0, counting_generator=CountingGenerator, targets=TARGETS)
    loader = _loader(t, plan, batch_size=8, max_seconds=1.0)
    counts = {"spk": 0, "cnt": 0, "labelled": 0}
    for _ in range(30):
        batch, ids = loader.next_batch()
        assert batch.wavs.shape[0] == 8 and int(batch.lengths.max()) <= SR  # cropped to max_seconds
        for j, uid in enumerate(ids):
            if ":" in uid:  # a counting clip: only its counting label
                counts["cnt"] += 1
                assert batch.labels["cnt"][j] >= 0 and batch.labels["spk"][j] == -1 and not batch.masks["sem"][j]
                assert int(batch.lengths[j]) == SR
                continue
            counts["labelled"] += 1
            i = plan.utt_ids.index(uid)
            assert int(batch.labels["spk"][j]) == plan.speaker_index[i]
            assert bool(batch.masks["sem"][j]) == (plan.semantic["sem"].index[i] >= 0)
            assert int(batch.labels["cnt"][j]) == -1
    total = 30 * 8
    # weights 2 : 1 : 1 -> counting a quarter of the rows
    assert abs(counts["cnt"] / total - 0.25) < 0.08, counts


def test_resumed_loader_gives_the_same_batches():
    t = _table()
    plan = plan_posttrain(t, ATTRS, clip_seconds=1.0, counting_generator=CountingGenerator, targets=TARGETS)
    ref = _loader(t, plan)
    want = [ref.next_batch() for _ in range(8)]
    first = _loader(t, plan)
    for _ in range(3):
        first.next_batch()
    import json

    state = json.loads(json.dumps(first.state()))  # what a checkpoint holds
    resumed = _loader(t, plan, state=state)
    for batch, ids in want[3:]:
        got, got_ids = resumed.next_batch()
        assert got_ids == ids
        assert torch.equal(got.wavs, batch.wavs) and torch.equal(got.lengths, batch.lengths)
        for k in batch.labels:
            assert torch.equal(torch.nan_to_num(got.labels[k], 9.0), torch.nan_to_num(batch.labels[k], 9.0))


def test_ranks_read_disjoint_parts_and_an_elastic_merge_repeats_nothing():
    t = _table()
    attrs = [AttributeConfig(name="spk", kind="speaker", dim=8)]
    plan = plan_posttrain(t, attrs)
    eligible = {plan.utt_ids[i] for i in plan.eligible("spk")}  # 16 rows
    ranks = [_loader(t, plan, rank=r, world=2, batch_size=3) for r in range(2)]
    seen = [[u for _ in range(2) for u in ranks[r].next_batch()[1]] for r in range(2)]
    assert not set(seen[0]) & set(seen[1]) and len(set(seen[0] + seen[1])) == 12
    state = resume_state([ranks[0].state(), ranks[1].state()], 0, 1)  # shrink to one worker
    one = _loader(t, plan, rank=0, world=1, state=state, step=2, batch_size=2)
    rest = [u for _ in range(2) for u in one.next_batch()[1]]
    assert set(rest) == eligible - set(seen[0]) - set(seen[1])  # the epoch's other rows, none again
    with pytest.raises(PostTrainDataError, match="fewer than the 40 workers"):
        _loader(t, plan, rank=39, world=40).next_batch()
