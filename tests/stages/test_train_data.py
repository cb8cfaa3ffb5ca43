"""The training input: live rows only, duration batches, weighted domains, exact resume."""

import numpy as np
import pytest

from spear.cluster.storage import Storage
from spear.pipeline.train_job import plan_training_data
from spear.stages.train_data import (IGNORE_INDEX, DomainStream, StreamState, TrainBatches, TrainDataError,
                                     merge_states, resume_state)

from support.shards import CODEBOOKS, make_token_store


@pytest.fixture(scope="module")
def plan(tmp_path_factory):
    store = make_token_store(Storage(), str(tmp_path_factory.mktemp("shards")), n_speech=12, n_audio=10)
    return plan_training_data(store)


def _ids(batches):
    return [tuple(b["segment_ids"].tolist()) for b in batches]


def _take(loader, n):
    out = []
    for b in loader:
        out.append(b)
        if len(out) == n:
            break
    return out


def test_batches_respect_duration_and_pad_targets(plan):
    loader = TrainBatches(plan, None, rank=0, world_size=1, batch_seconds=6.0, audio_weight=3.0, seed=0)
    for b in _take(loader, 12):
        B, S = b["wavs"].shape
        assert B * S / 16000 <= 6.0 + 1e-6  # every utterance is at most 3 s, so no batch may exceed 6 s
        assert (b["wav_lens"] <= S).all()
        for role, C in CODEBOOKS.items():
            tok = b[f"{role}_tokens"]
            assert tok.shape[0] == B and tok.shape[2] == C
            for i in range(B):
                n = b[f"{role}_lens"][i]
                assert (tok[i, n:] == IGNORE_INDEX).all()
                assert (tok[i, :n] >= 0).all()
        # speech utterances carry no audio-teacher targets
        speech = b["domains"] == 0
        assert (b["audio_tokens"][speech] == IGNORE_INDEX).all()


def test_audio_weight_sets_the_domain_share(plan):
    share = {}
    for w in (1.0, 3.0):
        loader = TrainBatches(plan, None, rank=0, world_size=1, batch_seconds=6.0, audio_weight=w, seed=1)
        doms = np.concatenate([b["domains"] for b in _take(loader, 60)])
        share[w] = doms.mean()
    assert share[3.0] > share[1.0] + 0.1


def test_resume_from_state_continues_exactly(plan):
    full = _take(TrainBatches(plan, None, rank=0, world_size=1, batch_seconds=5.0, audio_weight=3.0, seed=2), 25)
    loader = TrainBatches(plan, None, rank=0, world_size=1, batch_seconds=5.0, audio_weight=3.0, seed=2)
    first = _take(loader, 9)
    state = loader.state()
    resumed = _take(TrainBatches(plan, None, rank=0, world_size=1, batch_seconds=5.0, audio_weight=3.0, seed=2,
                                 state=state), 16)
    assert _ids(first + resumed) == _ids(full)


def test_ranks_split_an_epoch_into_disjoint_parts_that_cover_every_live_row(plan):
    from spear.stages.train_data import DomainStream

    for domain in ("speech", "audio"):
        parts = []
        for rank in range(2):
            stream = DomainStream(plan, domain, None, rank, 2, seed=3)
            ids = []
            for row in stream:
                if stream.state.epoch > 0:
                    break
                ids.append(row["segment_id"])
            parts.append(ids)
        assert parts[0] and parts[1] and not set(parts[0]) & set(parts[1])
        assert len(parts[0]) + len(parts[1]) == len(set(parts[0]) | set(parts[1])) == (12 if domain == "speech" else 10)


def test_resize_merges_positions_without_losing_rows(plan):
    loaders = [TrainBatches(plan, None, rank=r, world_size=2, batch_seconds=5.0, audio_weight=3.0, seed=3)
               for r in range(2)]
    for loader in loaders:
        _take(loader, 1)
    states = [l.state() for l in loaders]
    assert resume_state(states, 1, 2) == states[1]  # same world size: each rank's own state
    merged = resume_state(states, rank=0, world_size=1)  # 2 -> 1: the union of both ranks' positions
    for d in ("speech", "audio"):
        done = StreamState.from_dict(merged["streams"][d]).consumed()
        for s in states:
            for a, b in StreamState.from_dict(s["streams"][d]).consumed():
                assert any(x <= a and b <= y for x, y in done)
    assert _take(TrainBatches(plan, None, rank=0, world_size=1, batch_seconds=5.0, audio_weight=3.0, seed=3,
                              state=merged), 3)


# ----------------------------------------------------------------------------- more ranks than shard files


@pytest.fixture(scope="module")
def one_file_plan(tmp_path_factory):
    """Every row in one shard file (one row group): the case where whole-file sharding starved ranks."""
    store = make_token_store(Storage(), str(tmp_path_factory.mktemp("one-file")), n_speech=9, n_audio=7,
                             rows_per_shard=100, seed=4)
    return plan_training_data(store)


def _epoch_rows(stream):
    ids = []
    for row in stream:
        if stream.state.epoch > 0:
            break
        ids.append(row["segment_id"])
    return ids


def test_one_shard_file_is_split_over_every_rank(one_file_plan):
    assert len(one_file_plan.files) == 1
    for world in (2, 3, 7):
        for domain, n in (("speech", 9), ("audio", 7)):
            parts = [_epoch_rows(DomainStream(one_file_plan, domain, None, r, world, seed=0)) for r in range(world)]
            assert all(parts), (world, domain, [len(p) for p in parts])
            assert max(map(len, parts)) - min(map(len, parts)) <= 1
            flat = [i for p in parts for i in p]
            assert len(flat) == len(set(flat)) == n


def test_a_domain_with_fewer_rows_than_ranks_leaves_the_other_ranks_the_other_domain(tmp_path):
    store = make_token_store(Storage(), str(tmp_path / "t"), n_speech=6, n_audio=1, rows_per_shard=100, seed=6)
    plan = plan_training_data(store)
    assert plan.live_rows("audio") == 1
    assert list(DomainStream(plan, "audio", None, 1, 2, seed=0)) == []  # ends: nothing, ever, for rank 1
    for rank, has_audio in ((0, True), (1, False)):
        doms = np.concatenate([b["domains"] for b in _take(TrainBatches(plan, None, rank=rank, world_size=2,
                                                                        batch_seconds=5.0, audio_weight=3.0,
                                                                        seed=0), 8)])
        assert len(doms) and bool(doms.any()) == has_audio and (doms == 0).any()


def test_two_ranks_resume_exactly_from_their_own_states(one_file_plan):
    kw = dict(batch_seconds=4.0, audio_weight=3.0, seed=5)
    for rank in range(2):
        full = _take(TrainBatches(one_file_plan, None, rank=rank, world_size=2, **kw), 12)
        loader = TrainBatches(one_file_plan, None, rank=rank, world_size=2, **kw)
        first = _take(loader, 5)
        resumed = _take(TrainBatches(one_file_plan, None, rank=rank, world_size=2, state=loader.state(), **kw), 7)
        assert _ids(first + resumed) == _ids(full)


@pytest.mark.parametrize("before,after", [(2, 1), (1, 2), (2, 3), (3, 2)])
def test_a_resize_mid_epoch_reads_every_row_once(plan, before, after):
    """Rows the old ranks consumed plus the rows the new ranks read to the end of the epoch: each row once."""
    for domain in ("speech", "audio"):
        seen = []
        old = [DomainStream(plan, domain, None, r, before, seed=7) for r in range(before)]
        for r, stream in enumerate(old):
            it = iter(stream)
            seen += [next(it)["segment_id"] for _ in range(r + 1)]  # ranks at different positions
        merged = merge_states([s.state.to_dict() for s in old])
        for r in range(after):
            seen += _epoch_rows(DomainStream(plan, domain, None, r, after, seed=7, state=merged))
        assert len(seen) == len(set(seen)) == plan.live_rows(domain), (domain, len(seen), len(set(seen)))


def test_a_missing_shard_file_is_one_line_naming_it(tmp_path):
    import os

    store = make_token_store(Storage(), str(tmp_path / "t"), n_speech=4, n_audio=2, rows_per_shard=3)
    gone = store.shard_files()[0]
    os.remove(gone)
    with pytest.raises(TrainDataError) as err:
        plan_training_data(store)
    msg = str(err.value)
    assert "\n" not in msg and gone in msg and "missing" in msg


def test_teacher_roles_make_a_single_teacher_student(tmp_path):
    """train.teacher_roles: a single-teacher student reads only its teacher's tokens and has only its
    heads (the demo's ablation); an unknown role is refused naming the field."""
    import torch

    from spear.config import ConfigError, load_config
    from spear.stages.train_loop import build_objective

    store = make_token_store(Storage(), str(tmp_path / "shards"), n_speech=6, n_audio=6)
    for roles in (["speech"], ["audio"], ["speech", "audio"]):
        cfg = load_config(None, [f"train.teacher_roles={roles}", "train.student.size=tiny"])
        plan = plan_training_data(store, roles=cfg.train.teacher_roles)
        assert plan.roles == tuple(roles) and set(plan.codebooks) == set(roles)
        objective = build_objective(cfg.train, plan)
        assert set(objective.heads) == set(roles)
        batch = next(iter(TrainBatches(plan, None, rank=0, world_size=1, batch_seconds=6.0, audio_weight=3.0,
                                       seed=0)))
        assert {k for k in batch if k.endswith("_tokens")} == {f"{r}_tokens" for r in roles}
        assert isinstance(objective.encoder, torch.nn.Module)
    with pytest.raises(ConfigError, match="train.teacher_roles"):
        load_config(None, ["train.teacher_roles=[video]"])
    with pytest.raises(ConfigError, match="train.teacher_roles"):
        load_config(None, ["train.teacher_roles=[]"])
