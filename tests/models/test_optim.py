"""ScaledAdam and Eden (spear.models.optim): update sizes, the schedule's numbers, exact resume, clipping."""

from __future__ import annotations

import io
import math

import pytest
import torch

from spear.models.optim import Eden, ScaledAdam, eden_lr

LR, BETA1 = 0.045, 0.9


def _param(shape, rms: float, seed: int) -> torch.nn.Parameter:
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    return torch.nn.Parameter(x * (rms / x.square().mean().sqrt()))


def _rms(x: torch.Tensor) -> float:
    return float(x.square().mean().sqrt())


def test_first_step_moves_every_element_by_lr_times_the_tensor_rms_clamped():
    # Step 1: Adam's bias-corrected second moment is grad**2, so grad / sqrt(v) = sign(grad) and
    # every element moves by exactly lr * (1 - beta1) * clamp(rms, min, max), whatever the gradient's scale.
    rms_values = [1.0, 0.01, 10.0, 1e-7]   # the last two are clamped to param_max_rms=3 and param_min_rms=1e-5
    params = [_param((16, 8), r, i) for i, r in enumerate(rms_values)]
    opt = ScaledAdam(params, lr=LR, clipping_scale=None)
    before = [p.detach().clone() for p in params]
    for i, p in enumerate(params):
        p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(100 + i)) * 10.0 ** (i - 2)
    opt.step()
    for p, b, r in zip(params, before, rms_values):
        moved = (p.detach() - b).abs()
        want = LR * (1 - BETA1) * min(max(r, 1e-5), 3.0)
        assert torch.allclose(moved, torch.full_like(moved, want), rtol=1e-4), (r, float(moved.mean()), want)
        # and against the gradient's sign
        assert torch.all(torch.sign(p.detach() - b) == -torch.sign(p.grad))


def test_updates_stay_proportional_to_each_tensor_rms_over_many_steps():
    # two tensors of rms 1 and 0.01 under the same kind of noisy gradients: the relative change per step is
    # the same for both (AdamW would move both by the same absolute amount: 100x too much for the small one)
    big, small = _param((32, 16), 1.0, 0), _param((32, 16), 0.01, 1)
    opt = ScaledAdam([big, small], lr=LR, clipping_scale=None, size_update_period=10**9)  # no scale learning
    g = torch.Generator().manual_seed(5)
    moves = {"big": [], "small": []}
    for _ in range(20):
        prev = [big.detach().clone(), small.detach().clone()]
        big.grad = torch.randn(big.shape, generator=g)
        small.grad = torch.randn(small.shape, generator=g) * 3.0
        opt.step()
        moves["big"].append(_rms(big.detach() - prev[0]) / _rms(prev[0]))
        moves["small"].append(_rms(small.detach() - prev[1]) / _rms(prev[1]))
    ratio = sum(moves["big"]) / sum(moves["small"])
    assert 0.8 < ratio < 1.25, ratio
    adamw_like = LR * 0.1  # an Adam first step moves elements by lr * (1-beta1) here, whatever the rms
    assert moves["small"][0] < adamw_like / 0.01 / 50


def _scale_run(scalar_lr_scale: float, sign: float, steps: int = 300) -> list[float]:
    # gradient = sign * 0.05 * p + unit noise: per element the noise dominates (Adam's elementwise steps
    # barely see the pull), but summed over the tensor (the scale's gradient, sum(p * grad)) it is clear
    p = _param((64, 64), 1.0, 3)
    opt = ScaledAdam([p], lr=LR, clipping_scale=None, scalar_lr_scale=scalar_lr_scale, param_max_rms=3.0)
    g = torch.Generator().manual_seed(4)
    rms = []
    for _ in range(steps):
        p.grad = sign * 0.05 * p.detach() + torch.randn(p.shape, generator=g)
        opt.step()
        rms.append(_rms(p.detach()))
    return rms


def test_the_scale_of_a_tensor_is_learned_and_capped_at_param_max_rms():
    grow, grow_without = _scale_run(0.1, -1.0), _scale_run(0.0, -1.0)
    shrink, shrink_without = _scale_run(0.1, 1.0), _scale_run(0.0, 1.0)
    # scale learning (rate lr * scalar_lr_scale) moves the whole tensor's size much faster than the elementwise steps
    assert grow[99] > 1.8 and grow_without[99] < 1.5, (grow[99], grow_without[99])
    assert shrink[99] < 0.75 and shrink_without[99] > 0.85, (shrink[99], shrink_without[99])
    # and it stops at param_max_rms (3.0): held there, not past it by more than a step's overshoot
    assert max(grow) < 3.0 * 1.1 and abs(grow[-1] - 3.0) < 0.15, (max(grow), grow[-1])


def test_a_scalar_parameter_takes_plain_adam_steps_at_the_scalar_lr_and_is_kept_within_scalar_max():
    s = torch.nn.Parameter(torch.tensor(9.99))
    opt = ScaledAdam([s], lr=LR, clipping_scale=None, scalar_max=10.0)
    s.grad = torch.tensor(-3.0)
    opt.step()
    assert math.isclose(float(s.detach()), 9.99 + LR * 0.1 * (1 - BETA1), rel_tol=1e-6)
    for _ in range(200):
        s.grad = torch.tensor(-3.0)
        opt.step()
    assert float(s.detach()) <= 10.0 + 1.0  # clamped before each step: at most one momentum step past the bound


@pytest.mark.parametrize("batch,epoch,want", [
    # base 0.045, lr_batches 7500, lr_epochs 3.5, warm-up 500 batches from 0.5, computed by hand:
    (0, 0.0, 0.0225),                     # 0.045 * 0.5
    (250, 0.0, 0.0337406),                # 0.045 * 0.75 * (1 + 250**2/7500**2) ** -0.25 = 0.045 * 0.75 * 0.999722
    (500, 0.0, 0.0449501),                # 0.045 * (1 + 1/225) ** -0.25 = 0.045 * 0.998892
    (7500, 3.5, 0.0318198),               # 0.045 * 2**-0.25 * 2**-0.25 = 0.045 / sqrt(2)
    (22500, 10.5, 0.01423025),            # 0.045 * 10**-0.25 * 10**-0.25 = 0.045 / sqrt(10)
    (7500, 0.0, 0.0378403),               # 0.045 * 2**-0.25 = 0.045 * 0.840896
])
def test_eden_lr_at_given_steps_and_epochs(batch, epoch, want):
    got = eden_lr(0.045, batch=batch, epoch=epoch, lr_batches=7500, lr_epochs=3.5, warmup_batches=500,
                  warmup_start=0.5)
    assert math.isclose(got, want, rel_tol=2e-6), (got, want)


def test_eden_sets_every_group_from_its_own_base_lr_as_it_steps():
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    opt = ScaledAdam([{"params": [a]}, {"params": [b], "lr": 0.0045}], lr=0.045)
    sched = Eden(opt, lr_batches=7500, lr_epochs=3.5, warmup_batches=500)
    assert [round(x, 7) for x in sched.get_last_lr()] == [0.0225, 0.00225]
    for i in range(7500):
        sched.step(epoch=3.5 * (i + 1) / 7500)
    assert sched.batch == 7500 and math.isclose(sched.epoch, 3.5, rel_tol=1e-9)
    assert math.isclose(opt.param_groups[0]["lr"], 0.0318198, rel_tol=2e-6)
    assert math.isclose(opt.param_groups[1]["lr"], 0.00318198, rel_tol=2e-6)


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Tanh(), torch.nn.Linear(12, 3))
    m.register_parameter("gain", torch.nn.Parameter(torch.tensor(0.7)))  # a scalar parameter too
    return m


def _train(m, opt, sched, steps: range) -> None:
    for step in steps:
        g = torch.Generator().manual_seed(1000 + step)  # the data depends on the step only
        x, y = torch.randn(8, 6, generator=g), torch.randn(8, 3, generator=g)
        loss = (m(x) * m.gain - y).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step(epoch=sched.epoch + 0.01)


def _build(m):
    # short periods so that a 33-step run crosses scale updates and clipping estimates on both sides of the cut
    opt = ScaledAdam(m.parameters(), lr=0.045, clipping_update_period=8, size_update_period=3)
    return opt, Eden(opt, lr_batches=20, lr_epochs=0.1, warmup_batches=5)


def test_save_and_restore_continue_exactly_as_an_uninterrupted_run():
    m = _model(0)
    opt, sched = _build(m)
    _train(m, opt, sched, range(33))

    m2 = _model(0)
    opt2, sched2 = _build(m2)
    _train(m2, opt2, sched2, range(13))
    buf = io.BytesIO()
    torch.save({"model": m2.state_dict(), "optimizer": opt2.state_dict(), "scheduler": sched2.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)  # what a checkpoint reader does
    m3 = _model(1)  # other initial weights: everything must come from the checkpoint
    opt3, sched3 = _build(m3)
    m3.load_state_dict(saved["model"])
    opt3.load_state_dict(saved["optimizer"])
    sched3.load_state_dict(saved["scheduler"])
    _train(m3, opt3, sched3, range(13, 33))

    for (name, a), b in zip(m.named_parameters(), m3.parameters()):
        assert torch.equal(a, b), name
    assert sched3.batch == sched.batch == 33 and sched3.get_last_lr() == sched.get_last_lr()
    assert opt3.clipping_stats() == opt.clipping_stats()


def test_clipping_scales_down_an_outlier_gradient_to_the_running_median():
    def run(clipping_scale):
        p = _param((32, 32), 1.0, 7)
        opt = ScaledAdam([p], lr=LR, clipping_scale=clipping_scale, clipping_update_period=20)
        g = torch.Generator().manual_seed(8)
        for _ in range(60):
            p.grad = torch.randn(p.shape, generator=g)
            opt.step()
        before = p.detach().clone()
        p.grad = torch.randn(p.shape, generator=g) * 100.0  # a 100x outlier
        opt.step()
        return _rms(p.detach() - before), opt

    clipped, opt = run(2.0)
    unclipped, _ = run(None)
    stats = opt.clipping_stats()
    assert stats["group0/clip_scale"] < 0.05, stats  # scaled to about 2 x median / (100 x median)
    assert math.isclose(stats["group0/clip_threshold"], 2.0 * 32, rel_tol=0.1), stats  # 2 x rms 1 x sqrt(1024)
    assert clipped < 0.5 * unclipped, (clipped, unclipped)


def test_no_clipping_before_the_first_estimate_and_bad_settings_are_refused():
    p = _param((4, 4), 1.0, 0)
    opt = ScaledAdam([p], clipping_update_period=100)
    for _ in range(10):
        p.grad = torch.ones(4, 4) * 1e6
        opt.step()
    assert opt.clipping_stats()["group0/clip_scale"] == 1.0  # steps 1-9 record, step 10 estimates (2 x median)
    with pytest.raises(ValueError, match="param_min_rms"):
        ScaledAdam([p], param_min_rms=1.0, param_max_rms=0.5)
    with pytest.raises(ValueError, match="lr_batches"):
        Eden(opt, lr_batches=0, lr_epochs=1)
