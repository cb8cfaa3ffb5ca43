"""The training input: live rows only, duration batches, weighted domains, exact resume."""

import numpy as np
import pytest

from spear.cluster.storage import Storage
from spear.stages.train_data import IGNORE_INDEX, TrainBatches, TrainDataPlan, resume_state

from support.shards import CODEBOOKS, make_token_store


@pytest.fixture(scope="module")
def plan(tmp_path_factory):
    store = make_token_store(Storage(), str(tmp_path_factory.mktemp("shards")), n_speech=12, n_audio=10)
    return TrainDataPlan.from_store(store)


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
        assert B * S / 16000 <= 6.0 + 1e-6 or B == 1
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
        done = set(merged["streams"][d]["done_files"])
        for s in states:
            assert set(s["streams"][d]["done_files"]) <= done
    assert _take(TrainBatches(plan, None, rank=0, world_size=1, batch_seconds=5.0, audio_weight=3.0, seed=3,
                              state=merged), 3)
