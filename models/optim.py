"""ScaledAdam and the Eden learning-rate schedule: the optimiser Zipformer2 was designed around.

Written from the Zipformer paper (Yao et al., arXiv 2310.11230, section 4: "ScaledAdam" and
"Eden") and from the behaviour of icefall's implementation; the code is this project's own.

**ScaledAdam** is Adam whose step for each tensor is measured relative to that tensor's size:

- a non-scalar tensor ``p`` moves by ``lr * rms(p) * m / (sqrt(v) + eps)`` (``m``: momentum of the
  normalised gradient, ``v``: Adam's second moment, bias-corrected). ``rms(p)`` is refreshed every
  ``size_update_period`` steps and clamped to ``[param_min_rms, param_max_rms]``, so a tensor ten
  times larger takes steps ten times larger: the *relative* change per step is the same for every
  tensor, whatever its initial scale;
- the scale of each tensor is learned too, as if ``p = exp(s) * p0``: the gradient for ``s`` is
  ``sum(p * grad)``; every ``size_update_period`` steps ``s`` takes an Adam step of rate
  ``lr * scalar_lr_scale`` on the sum of those gradients, limited so that ``rms(p)`` never goes
  above ``param_max_rms`` (nor shrinks when already below ``param_min_rms``). This replaces weight
  decay;
- a tensor of one element is updated by plain Adam at rate ``lr * scalar_lr_scale`` and kept
  within ``[-scalar_max, scalar_max]``;
- one momentum buffer ``delta`` per tensor carries all of it (``delta = beta1 * delta + (1 - beta1) *
  update``; no first-moment bias correction: the first steps are smaller, which helps stability);
- gradient clipping by a running median: the norm of the gradient *as the update sees it*
  (each tensor's gradient times its rms; scalars times ``scalar_lr_scale``) is recorded every
  step; the threshold is ``clipping_scale`` times the median of the recorded norms, estimated
  at steps 10, 20 and 40 (twice as loose: the norms still move fast) and then every
  ``clipping_update_period`` steps. A step whose norm is above it has its gradients scaled down
  to it. Clipping and its statistics are per parameter group.

Every setting is per parameter group (``ScaledAdam([{"params": ..., "lr": ...}, ...])``).

**Eden** sets each group's lr from its ``base_lr`` (default: the group's lr at construction)::

    lr = base_lr * ((batch**2 + lr_batches**2) / lr_batches**2) ** -0.25
                 * ((epoch**2 + lr_epochs**2) / lr_epochs**2) ** -0.25
                 * warmup,   warmup = warmup_start + (1 - warmup_start) * batch / warmup_batches
                                      until batch reaches warmup_batches, then 1

``batch`` counts optimiser steps taken; ``epoch`` is whatever the caller measures progress in
(passes over the data, or hours of audio seen: the SPEAR runs use ``lr_epochs`` = 75,000 hours).
The lr is flat at first and then falls as ``batch**-0.5`` and ``epoch**-0.5``.

Both keep all their state in ``state_dict()``: a run restored from one continues bit for bit
as if it had never stopped.

Example::

    >>> import torch
    >>> model = torch.nn.Linear(4, 2)
    >>> opt = ScaledAdam(model.parameters(), lr=0.045)
    >>> sched = Eden(opt, lr_batches=7500, lr_epochs=3.5, warmup_batches=500)
    >>> round(opt.param_groups[0]["lr"], 6)               # warm-up starts at half the base lr
    0.0225
    >>> model(torch.randn(3, 4)).square().sum().backward()
    >>> opt.step(); sched.step()
    >>> sched.batch, round(sched.get_last_lr()[0], 6)
    (1, 0.022545)
    >>> round(eden_lr(0.045, batch=7500, epoch=3.5, lr_batches=7500, lr_epochs=3.5), 6)  # 0.045 / sqrt(2)
    0.03182
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

import torch

#: Steps at which the clipping threshold is first estimated, before a whole period is recorded.
EARLY_ESTIMATES = (10, 20, 40)


class ScaledAdam(torch.optim.Optimizer):
    """Adam with updates proportional to each tensor's rms, learned tensor scales and median-based clipping.

    Args:
        params: parameters or parameter groups (dicts that may override any setting below).
        lr: the learning rate (Eden sets it each step from ``base_lr``); the authors use 0.045.
        betas: momentum of the update and decay of the squared-gradient average.
        eps: added to the root of the second moment.
        scalar_lr_scale: lr factor for learning the tensor scales and for one-element tensors.
        param_min_rms, param_max_rms: the range a tensor's rms is clamped to in its update, and the
            limits its learned scale respects.
        scalar_max: one-element parameters are kept within [-scalar_max, scalar_max].
        size_update_period: steps between refreshes of each tensor's rms and updates of its scale.
        clipping_scale: clip to this multiple of the median gradient norm; None: no clipping.
        clipping_update_period: steps between estimates of the median (and the norms it is taken over).
    """

    def __init__(self, params: Iterable, lr: float = 0.045, *, betas: tuple[float, float] = (0.9, 0.98),
                 eps: float = 1e-8, scalar_lr_scale: float = 0.1, param_min_rms: float = 1e-5,
                 param_max_rms: float = 3.0, scalar_max: float = 10.0, size_update_period: int = 4,
                 clipping_scale: Optional[float] = 2.0, clipping_update_period: int = 100):
        if lr < 0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        if not 0 < param_min_rms <= param_max_rms:
            raise ValueError(f"need 0 < param_min_rms <= param_max_rms, got {param_min_rms}, {param_max_rms}")
        if size_update_period < 1 or clipping_update_period < 1:
            raise ValueError("size_update_period and clipping_update_period must be >= 1")
        if clipping_scale is not None and clipping_scale <= 0:
            raise ValueError(f"clipping_scale must be > 0 or None, got {clipping_scale}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, scalar_lr_scale=scalar_lr_scale,
                        param_min_rms=param_min_rms, param_max_rms=param_max_rms, scalar_max=scalar_max,
                        size_update_period=size_update_period, clipping_scale=clipping_scale,
                        clipping_update_period=clipping_update_period)
        super().__init__(params, defaults)

    # ------------------------------------------------------------------ state

    def _init_state(self, p: torch.Tensor, group: dict) -> dict:
        state = self.state[p]
        state["step"] = 0
        state["delta"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if p.numel() > 1:
            state["param_rms"] = _rms(p.detach())
            state["scale_grads"] = torch.zeros(group["size_update_period"], dtype=p.dtype, device=p.device)
            state["scale_exp_avg_sq"] = torch.zeros((), dtype=p.dtype, device=p.device)
        return state

    def _clip_state(self, index: int, group: dict, device: torch.device) -> dict:
        # Group-level statistics live under a string key of self.state: Optimizer.state_dict saves such
        # keys as they are, and load_state_dict puts them back.
        key = f"clipping_group_{index}"
        if key not in self.state:
            self.state[key] = {"step": 0, "norms": torch.zeros(group["clipping_update_period"], device=device),
                               "threshold": None, "num_clipped": 0, "last_scale": 1.0}
        cs = self.state[key]
        if cs["norms"].device != device:  # restored with map_location="cpu" for a model on a GPU
            cs["norms"] = cs["norms"].to(device)
        return cs

    # ------------------------------------------------------------------ clipping

    def _clipping_scale(self, index: int, group: dict, params: list[torch.Tensor]) -> Any:
        """1.0, or a 0-dim tensor <= 1 to multiply this group's gradients by."""
        if group["clipping_scale"] is None:
            return 1.0
        cs = self._clip_state(index, group, params[0].device)
        step, period = cs["step"], group["clipping_update_period"]
        sq = []
        for p in params:
            g = p.grad
            if p.numel() == 1:
                sq.append((g.float() * group["scalar_lr_scale"]).square().sum())
            else:
                sq.append((g.float() * self.state[p]["param_rms"]).square().sum())
        norm = torch.stack(sq).sum().sqrt()
        cs["step"] = step + 1
        if step == 0:
            return 1.0  # the rms of every tensor has only just been measured: record nothing yet
        cs["norms"][step % period] = norm
        if step in EARLY_ESTIMATES and step < period:
            recorded = cs["norms"][1: step + 1]  # steps 1..step; step 0 was not recorded
            cs["threshold"] = 2.0 * group["clipping_scale"] * float(recorded.median())
            cs["num_clipped"] = 0
        elif step % period == 0:
            cs["threshold"] = group["clipping_scale"] * float(cs["norms"].median())
            cs["num_clipped"] = 0
        if cs["threshold"] is None:
            return 1.0
        scale = (cs["threshold"] / (norm + 1e-20)).clamp(max=1.0)
        scale = torch.where(torch.isfinite(scale), scale, torch.zeros_like(scale))
        cs["last_scale"] = scale
        # kept as a tensor: no device-to-host copy per step on a GPU
        cs["num_clipped"] = cs["num_clipped"] + (scale < 1.0).long()
        return scale

    # ------------------------------------------------------------------ the step

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for index, group in enumerate(self.param_groups):
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            for p in params:
                if p.grad.is_sparse:
                    raise RuntimeError("ScaledAdam does not support sparse gradients")
                if len(self.state[p]) == 0:
                    self._init_state(p, group)
            clip = self._clipping_scale(index, group, params)
            for p in params:
                grad = p.grad if isinstance(clip, float) and clip == 1.0 else p.grad * clip
                self._update(p, grad, group, self.state[p])
        return loss

    def _update(self, p: torch.Tensor, grad: torch.Tensor, group: dict, state: dict) -> None:
        beta1, beta2 = group["betas"]
        step = state["step"]
        delta = state["delta"]
        delta.mul_(beta1)
        # Adam's second moment, bias-corrected (the first moment is not: see the module docstring)
        exp_avg_sq = state["exp_avg_sq"]
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = (exp_avg_sq / (1 - beta2 ** (step + 1))).sqrt_().add_(group["eps"])
        if p.numel() == 1:
            delta.add_(grad / denom, alpha=-group["lr"] * group["scalar_lr_scale"] * (1 - beta1))
            p.clamp_(-group["scalar_max"], group["scalar_max"])
        else:
            period = group["size_update_period"]
            state["scale_grads"][step % period] = (p * grad).sum()
            if step % period == period - 1:
                state["param_rms"].copy_(_rms(p))
                self._update_scale(p, group, state, (step + 1) // period)
            rms = state["param_rms"].clamp(group["param_min_rms"], group["param_max_rms"])
            delta.add_(grad / denom * (rms * (-group["lr"] * (1 - beta1))))
        p.add_(delta)
        state["step"] = step + 1

    def _update_scale(self, p: torch.Tensor, group: dict, state: dict, n: int) -> None:
        """An Adam step on the log-scale of ``p`` from the last period's gradients (the n-th such step)."""
        beta1, beta2 = group["betas"]
        period = group["size_update_period"]
        beta2_period = beta2 ** period  # the second moment sees one value per period: decay per period
        grads = state["scale_grads"]
        v = state["scale_exp_avg_sq"]
        v.mul_(beta2_period).add_(grads.square().mean(), alpha=1 - beta2_period)
        v_hat = v / (1 - beta2_period ** n)
        step = -group["lr"] * group["scalar_lr_scale"] * grads.sum() / (v_hat.sqrt() + group["eps"])
        rms = state["param_rms"]
        # a tensor already below param_min_rms may grow but not shrink; none may grow past param_max_rms
        step = torch.where(rms < group["param_min_rms"], step.clamp(min=0.0), step)
        step = torch.minimum(step, (group["param_max_rms"] - rms) / rms.clamp(min=1e-20))
        state["delta"].add_(p * step, alpha=1 - beta1)

    # ------------------------------------------------------------------ reporting

    def clipping_stats(self) -> dict[str, float]:
        """Per group: the current threshold and the latest step's gradient scale (1.0 = not clipped)."""
        out: dict[str, float] = {}
        for i, _ in enumerate(self.param_groups):
            cs = self.state.get(f"clipping_group_{i}")
            if cs is not None:
                out[f"group{i}/clip_threshold"] = float("nan") if cs["threshold"] is None else float(cs["threshold"])
                out[f"group{i}/clip_scale"] = float(cs["last_scale"])
        return out


def _rms(x: torch.Tensor) -> torch.Tensor:
    return x.float().square().mean().sqrt().to(x.dtype)


def eden_lr(base_lr: float, *, batch: float, epoch: float, lr_batches: float, lr_epochs: float,
            warmup_batches: float = 500.0, warmup_start: float = 0.5) -> float:
    """The Eden learning rate after ``batch`` steps at ``epoch`` (see the module docstring)."""
    factor = ((batch ** 2 + lr_batches ** 2) / lr_batches ** 2) ** -0.25 * \
             ((epoch ** 2 + lr_epochs ** 2) / lr_epochs ** 2) ** -0.25
    warmup = 1.0 if batch >= warmup_batches else warmup_start + (1.0 - warmup_start) * batch / warmup_batches
    return base_lr * factor * warmup


class Eden:
    """Sets every group's ``lr`` to :func:`eden_lr` of its ``base_lr`` at the current (batch, epoch).

    ``step(epoch=...)`` counts one optimiser step and, when given, moves the epoch (a float: a
    fraction of a pass, or hours of audio seen); ``set_epoch`` moves the epoch alone.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, *, lr_batches: float, lr_epochs: float,
                 warmup_batches: float = 500.0, warmup_start: float = 0.5):
        if lr_batches <= 0 or lr_epochs <= 0:
            raise ValueError(f"lr_batches and lr_epochs must be > 0, got {lr_batches}, {lr_epochs}")
        if warmup_batches < 0 or not 0 <= warmup_start <= 1:
            raise ValueError(f"need warmup_batches >= 0 and 0 <= warmup_start <= 1, got {warmup_batches}, "
                             f"{warmup_start}")
        self.optimizer = optimizer
        self.lr_batches, self.lr_epochs = float(lr_batches), float(lr_epochs)
        self.warmup_batches, self.warmup_start = float(warmup_batches), float(warmup_start)
        for group in optimizer.param_groups:
            group.setdefault("base_lr", group["lr"])
        self.batch = 0
        self.epoch = 0.0
        self._apply()

    def lr_for(self, base_lr: float) -> float:
        return eden_lr(base_lr, batch=self.batch, epoch=self.epoch, lr_batches=self.lr_batches,
                       lr_epochs=self.lr_epochs, warmup_batches=self.warmup_batches, warmup_start=self.warmup_start)

    def _apply(self) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_for(group["base_lr"])

    def step(self, epoch: Optional[float] = None) -> None:
        self.batch += 1
        if epoch is not None:
            self.epoch = float(epoch)
        self._apply()

    def set_epoch(self, epoch: float) -> None:
        self.epoch = float(epoch)
        self._apply()

    def get_last_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        # the settings travel too, so a restore can tell a changed schedule from a resumed one
        return {"batch": self.batch, "epoch": self.epoch, "lr_batches": self.lr_batches, "lr_epochs": self.lr_epochs,
                "warmup_batches": self.warmup_batches, "warmup_start": self.warmup_start}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores the position (batch, epoch); the schedule's settings stay those it was built with."""
        self.batch = int(state["batch"])
        self.epoch = float(state["epoch"])
        self._apply()

