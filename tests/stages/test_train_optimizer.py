"""train.optimizer through the config: the default per student, AdamW still selectable, Eden's epoch, checkpoints."""

from __future__ import annotations

import contextlib
import math
from types import SimpleNamespace

import pytest
import torch

from spear.config import ConfigError, load_config
from spear.models.optim import Eden, ScaledAdam
from spear.stages.train_loop import (NonRetryableError, apply_update, build_objective, build_optimizer,
                                     eden_epoch_per_step, restore_checkpoint, save_checkpoint)

PLAN = SimpleNamespace(roles=["speech"], codebooks={"speech": 4}, frame_rates={"speech": 50.0},
                       seconds_by_domain={"speech": 1800.0, "audio": 1800.0})


def _train(sets=()):
    return load_config(None, ["train.student.size=tiny", "train.student.num_mel_bins=40", *sets]).train


def test_zipformer2_students_default_to_scaled_adam_with_eden_at_the_authors_base_lr():
    cfg = _train()
    assert cfg.optimizer is None and cfg.optimizer_kind == "scaled_adam"
    opt, sched, lr = build_optimizer(build_objective(cfg, PLAN), cfg, world=1, max_workers=1)
    assert isinstance(opt, ScaledAdam) and isinstance(sched, Eden) and lr == 0.045
    assert math.isclose(opt.param_groups[0]["lr"], 0.045 * 0.5)  # Eden's warm-up starts at half the base lr
    assert sched.lr_epochs == 75000 and sched.lr_batches == 7500 and sched.warmup_batches == cfg.warmup_steps


def test_adamw_stays_selectable_and_is_the_transformers_default():
    cfg = _train(["train.optimizer=adamw", "train.lr=0.002"])
    assert cfg.optimizer_kind == "adamw"
    opt, sched, lr = build_optimizer(build_objective(cfg, PLAN), cfg, world=1, max_workers=2)
    assert isinstance(opt, torch.optim.AdamW) and isinstance(sched, torch.optim.lr_scheduler.LambdaLR)
    assert lr == 0.001  # train.lr scaled by world / max_workers, as before
    assert _train(["train.student.architecture=transformer"]).optimizer_kind == "adamw"
    assert _train(["train.student.architecture=transformer", "train.optimizer=scaled_adam"]).optimizer_kind \
        == "scaled_adam"
    with pytest.raises(ConfigError, match="train.optimizer"):
        _train(["train.optimizer=sgd"])
    with pytest.raises(ConfigError, match="train.scaled_adam.warmup_start"):
        _train(["train.scaled_adam.warmup_start=2"])


def test_eden_epoch_counts_hours_of_the_effective_batch_or_passes_over_the_dataset():
    cfg = _train(["train.batch_seconds=60"])
    assert math.isclose(eden_epoch_per_step(cfg, PLAN, world=4), 4 * 60 / 3600)
    cfg = _train(["train.batch_seconds=60", "train.scaled_adam.lr_hours=0", "train.scaled_adam.lr_epochs=2"])
    assert math.isclose(eden_epoch_per_step(cfg, PLAN, world=4), 4 * 60 / 3600)  # the plan holds one hour
    _, sched, _ = build_optimizer(build_objective(cfg, PLAN), cfg, world=1, max_workers=1)
    assert sched.lr_epochs == 2


class _Checkpoint:
    def __init__(self, path):
        self.path = str(path)

    @contextlib.contextmanager
    def as_directory(self):
        yield self.path


def _steps(objective, opt, sched, kind, n, epoch_per_step=0.01):
    g = torch.Generator().manual_seed(0)
    for _ in range(n):
        feats, lengths = torch.randn(2, 120, 40, generator=g), torch.tensor([120, 100])
        frames = int(objective.encoder.output_lengths(lengths).max())
        targets = {"speech": torch.randint(0, 256, (2, frames, 4), generator=g)}
        out = objective(feats, lengths, targets)
        opt.zero_grad()
        out.loss.backward()
        apply_update(objective, opt, sched, kind, epoch_per_step, update=True)


def test_a_checkpoint_restores_scaled_adam_and_eden_and_refuses_another_optimizer(tmp_path):
    cfg = _train()
    torch.manual_seed(0)
    objective = build_objective(cfg, PLAN)
    opt, sched, lr = build_optimizer(objective, cfg, 1, 1)
    _steps(objective, opt, sched, "scaled_adam", 3)
    save_checkpoint(str(tmp_path), objective=objective, optimizer=opt, scheduler=sched, kind="scaled_adam",
                    metrics_rows=[{"step": 3}], state={"step": 3, "data_states": [], "world_sizes": [1]})

    torch.manual_seed(1)
    objective2 = build_objective(cfg, PLAN)
    opt2, sched2, _ = build_optimizer(objective2, cfg, 1, 1)
    start = restore_checkpoint(_Checkpoint(tmp_path), objective2, opt2, sched2, lr, "scaled_adam")
    assert start.step == 3 and (sched2.batch, sched2.epoch) == (sched.batch, sched.epoch)
    assert sched2.get_last_lr() == sched.get_last_lr()
    for o, op, sc in ((objective, opt, sched), (objective2, opt2, sched2)):
        torch.manual_seed(2)  # the same dropout masks (the training loop restores its RNG states too)
        _steps(o, op, sc, "scaled_adam", 2)
    for (name, a), b in zip(objective.named_parameters(), objective2.parameters()):
        assert torch.equal(a, b), name

    adamw = _train(["train.optimizer=adamw"])
    objective3 = build_objective(adamw, PLAN)
    opt3, sched3, lr3 = build_optimizer(objective3, adamw, 1, 1)
    with pytest.raises(NonRetryableError, match="train.optimizer=scaled_adam"):
        restore_checkpoint(_Checkpoint(tmp_path), objective3, opt3, sched3, lr3, "adamw")


@pytest.mark.parametrize("kind", ["adamw", "scaled_adam"])
def test_a_step_without_targets_moves_no_weight_but_the_schedule(kind):
    """An audio-only student's all-speech batch: zero gradients, and no optimiser step (AdamW's momentum
    and weight decay would otherwise move every weight); the schedule still advances."""
    cfg = _train([f"train.optimizer={kind}", "train.warmup_steps=10"])
    torch.manual_seed(0)
    objective = build_objective(cfg, PLAN)
    opt, sched, _ = build_optimizer(objective, cfg, 1, 1)
    _steps(objective, opt, sched, kind, 2)  # momentum to carry
    before = {n: p.detach().clone() for n, p in objective.named_parameters()}
    lr_before = sched.get_last_lr()[0]
    feats, lengths = torch.randn(2, 120, 40), torch.tensor([120, 100])
    frames = int(objective.encoder.output_lengths(lengths).max())
    out = objective(feats, lengths, {"speech": torch.full((2, frames, 4), -100)})
    opt.zero_grad()
    out.loss.backward()
    apply_update(objective, opt, sched, kind, 0.01, update=False)
    for n, p in objective.named_parameters():
        assert torch.equal(p, before[n]), n
    assert sched.get_last_lr()[0] != lr_before  # still in warm-up: the lr moved on
    apply_update(objective, opt, sched, kind, 0.01, update=True)  # the same zero gradients, stepped
    assert any(not torch.equal(p, before[n]) for n, p in objective.named_parameters())


def test_a_first_step_without_targets_advances_the_schedule_without_torchs_order_warning():
    """A run whose first batch has no target of the student's teachers steps the schedule before the
    optimiser ever stepped: torch would warn that the first learning rate was skipped, which is what
    the schedule is meant to do here (it counts consumed batches)."""
    import warnings

    cfg = _train(["train.optimizer=adamw", "train.warmup_steps=10"])
    objective = build_objective(cfg, PLAN)
    opt, sched, _ = build_optimizer(objective, cfg, 1, 1)
    lr_before = sched.get_last_lr()[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        apply_update(objective, opt, sched, "adamw", 0.01, update=False)
    assert sched.get_last_lr()[0] > lr_before  # warm-up moved on
