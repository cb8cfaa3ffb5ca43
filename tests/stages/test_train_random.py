"""The random streams a checkpoint carries (stages/train_loop.random_state, resume_random): a resumed rank
draws the dropout and masks an uninterrupted one would; after a resize each rank gets its own new stream."""

from __future__ import annotations

import json

import torch

from spear.stages.train_loop import ResumePoint, random_state, restore_random_state, resume_random

CPU = torch.device("cpu")


def _dropout_masks(n: int = 3) -> list[torch.Tensor]:
    drop = torch.nn.Dropout(0.5).train()
    return [drop(torch.ones(64)) for _ in range(n)]


def test_restored_streams_give_the_same_dropout_and_masks_after_a_json_round_trip():
    torch.manual_seed(11)
    masks = torch.Generator().manual_seed(5)
    _dropout_masks()  # the steps before the checkpoint
    saved = json.loads(json.dumps(random_state(CPU, masks)))  # as the checkpoint's state file holds it
    want = _dropout_masks(), torch.rand(8, generator=masks)
    torch.manual_seed(999)  # a new worker: seeded again, as at a fresh start
    masks = torch.Generator().manual_seed(5)
    restore_random_state(saved, CPU, masks)
    got = _dropout_masks(), torch.rand(8, generator=masks)
    assert all(torch.equal(a, b) for a, b in zip(got[0], want[0])) and torch.equal(got[1], want[1])


def test_resume_restores_each_ranks_own_streams_at_the_same_world_size_and_reseeds_after_a_resize():
    states = []
    for rank in range(2):
        torch.manual_seed(100 + rank)
        states.append(random_state(CPU))
    point = ResumePoint(step=6, resumed_from=6, random_states=states)

    def draws(rank: int, world: int, p: ResumePoint = point) -> torch.Tensor:
        torch.manual_seed(0)  # what the loop did before restoring
        resume_random(p, rank, world, seed=3, device=CPU)
        return torch.rand(4)

    for rank in range(2):
        torch.manual_seed(100 + rank)
        want = torch.rand(4)
        assert torch.equal(draws(rank, 2), want)
    # three ranks where two were saved: new streams, one per rank, the same on every retry
    resized = [draws(r, 3) for r in range(3)]
    assert torch.equal(resized[0], draws(0, 3)) and not torch.equal(resized[0], resized[1])
    assert not any(torch.equal(resized[r], draws(r, 2)) for r in range(2))
    # a checkpoint written before the streams were saved: reseeded the same way
    old = ResumePoint(step=6, resumed_from=6)
    assert torch.equal(draws(1, 2, old), draws(1, 3))
    # a fresh start keeps the caller's seeding
    torch.manual_seed(0)
    want = torch.rand(4)
    assert torch.equal(draws(0, 1, ResumePoint()), want)
