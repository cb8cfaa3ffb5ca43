"""Fitting MVQ codebooks to frames: the settings (:class:`FitSettings`) and the steps.

:func:`fit_codebooks` is the procedure behind :meth:`MultiCodebookQuantizer.fit
<spear.models.mvq.MultiCodebookQuantizer.fit>`: check the frames, split off held-out and
validation rows (seeded), normalise, initialise by residual k-means with a beam, refine jointly
(least-squares update + re-encoding, a pass kept only when the validation loss falls) and
describe the fit in the metadata. It returns the tensors; the quantiser is built from them.

Example::

    >>> import torch
    >>> from spear.models.mvq.fitting import FitSettings, fit_codebooks
    >>> fitted = fit_codebooks(torch.randn(512, 8), FitSettings(num_codebooks=2, codebook_size=16, refine_iters=1),
    ...                        device="cpu")
    >>> fitted.codebooks.shape, fitted.meta["fit"]["refine_iters"]
    (torch.Size([2, 16, 8]), 1)
"""

from __future__ import annotations

import datetime as _dt
import time
from dataclasses import dataclass, replace
from typing import Any, Callable, Optional, Union

import torch

from spear.models.device import default_device
from spear.models.mvq import kernels
from spear.models.mvq.checks import ArrayLike, as_float_tensor, check_codebook_size, check_finite
from spear.models.mvq.usage import codebook_usage

# A training sample needs this many rows per codebook entry at least (k-means on fewer is noise).
MIN_ROWS_PER_ENTRY = 4


@dataclass(frozen=True)
class FitSettings:
    """How :meth:`~spear.models.mvq.MultiCodebookQuantizer.fit` fits codebooks; the defaults are the pipeline's.

    Example::

        >>> FitSettings(num_codebooks=4, codebook_size=16, refine_iters=2).beam_size
        8

    Attributes:
        num_codebooks: C, bytes per frame (1..64).
        codebook_size: K, a power of two in 2..256 (codes are uint8).
        seed: fixes the splits and the k-means; the same seed and data give bit-identical
            codebooks on the same machine and thread count.
        normalize: per-dimension mean/std normalisation with statistics from the training frames.
        init_beam_size: partial encodings kept per frame during the initialisation (1 = greedy
            residual k-means; faiss' ResidualQuantizer calls it max_beam_size).
        init_beam_tolerance: codebook c's k-means trains on the residuals of every kept partial
            encoding whose error is within this fraction of the frame's best one. On noisy,
            high-dimensional frames the near-ties act as augmentation and the codebooks fit
            held-out frames better; clearly worse encodings (clean, clustered data) stay out.
        kmeans_iters, progressive_dim_steps, max_points_per_centroid: the k-means of the
            initialisation (faiss ``ProgressiveDimClustering``: PCA dims grow over
            ``progressive_dim_steps`` steps of ``kmeans_iters`` iterations; 0 steps = plain
            k-means; each k-means trains on at most max_points_per_centroid x K rows).
        kmeans_backend: "faiss" (faiss-gpu when it sees a GPU) or "torch" (the same progressive
            k-means in torch on the fitting device); default: faiss where it runs on the fitting
            device, else torch (:func:`~spear.models.mvq.kernels.default_kmeans_backend`). The
            metadata records the one used.
        refine_iters: joint refinement passes at most (0 = initialisation only).
        validation_fraction: share of the frames held back to accept or reject refinement passes
            (0 = accept every pass, fit on all rows).
        train_beam_size, train_icm_sweeps: the encoder of training frames during refinement
            (default beam: ``beam_size``); each row also keeps its previous codes if better.
        ridge: weight pulling the least-squares update towards the previous codebooks
            (keeps unused entries and the singular directions in place).
        beam_size, icm_sweeps: the encoder of the fitted quantiser (:meth:`~spear.models.mvq.MultiCodebookQuantizer.encode`).
        time_budget_s: skip refinement passes that would end after this many seconds from the
            start (the initialisation always runs).
        heldout_fraction: share of the frames (seeded random rows) kept out of fitting to measure
            the held-out loss on, when no held-out frames are given.
        num_threads: torch/faiss intra-op threads while fitting (default: leave as set).
        chunk_size: frames per encoder chunk (default: from a 256 MiB budget).
    """

    num_codebooks: int = 16
    codebook_size: int = 256
    seed: int = 0
    normalize: bool = True
    init_beam_size: int = 5
    init_beam_tolerance: float = 0.3
    kmeans_iters: int = 10
    progressive_dim_steps: int = 10
    max_points_per_centroid: int = 256
    kmeans_backend: Optional[str] = None
    refine_iters: int = 4
    validation_fraction: float = 0.05
    train_beam_size: Optional[int] = None
    train_icm_sweeps: int = 1
    ridge: float = 1.0
    beam_size: int = 8
    icm_sweeps: int = 0
    time_budget_s: Optional[float] = None
    heldout_fraction: float = 0.0
    num_threads: Optional[int] = None
    chunk_size: Optional[int] = None

    @property
    def min_rows(self) -> int:
        """Fewest training frames a fit accepts (:data:`MIN_ROWS_PER_ENTRY` per codebook entry)."""
        return MIN_ROWS_PER_ENTRY * self.codebook_size

    def check(self) -> None:
        """Raise ValueError for settings no fit can use."""
        check_codebook_size(self.codebook_size)
        if not (1 <= self.num_codebooks <= 64):
            raise ValueError(f"num_codebooks must be in 1..64, got {self.num_codebooks}")
        for name in ("heldout_fraction", "validation_fraction"):
            frac = getattr(self, name)
            if not (0.0 <= frac < 0.5):
                raise ValueError(f"{name} must be in [0, 0.5), got {frac}")

    def record(self, refined: "Refinement", device: torch.device, seconds: float) -> dict[str, Any]:
        """The ``fit`` entry of the metadata: these settings as fitting used them, and how refinement ended."""
        return {"seed": self.seed, "init_beam_size": self.init_beam_size,
                "init_beam_tolerance": self.init_beam_tolerance, "kmeans_iters": self.kmeans_iters,
                "progressive_dim_steps": self.progressive_dim_steps,
                "max_points_per_centroid": self.max_points_per_centroid, "kmeans_backend": self.kmeans_backend,
                "refine_iters": self.refine_iters,
                "refine_iters_done": refined.iters_done, "refine_stop": refined.stop if self.refine_iters else None,
                "train_beam_size": self.train_beam, "train_icm_sweeps": self.train_icm_sweeps, "ridge": self.ridge,
                "device": str(device), "seconds": round(seconds, 2)}

    @property
    def train_beam(self) -> int:
        """The beam that encodes training frames during refinement."""
        return self.beam_size if self.train_beam_size is None else self.train_beam_size


@dataclass
class Refinement:
    """How refinement ended: accepted passes, why it stopped, the best validation loss (None without validation)."""

    iters_done: int
    stop: str
    best_val: Optional[float]


@dataclass
class FittedCodebooks:
    """What :func:`fit_codebooks` produced: the codebooks [C, K, D] and the normalisation (float32,
    on ``device``), the held-out frames (given or split off; None without), and the metadata of the fit."""

    codebooks: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    heldout: Optional[torch.Tensor]
    meta: dict[str, Any]
    device: torch.device


def fit_codebooks(x: ArrayLike, settings: FitSettings, *, heldout: Optional[ArrayLike] = None,
                  teacher_id: Optional[str] = None, layer: Optional[int] = None,
                  extra: Optional[dict[str, Any]] = None, device: Union[str, torch.device, None] = None,
                  log: Optional[Callable[[str], None]] = None, t_start: Optional[float] = None) -> FittedCodebooks:
    """Fit codebooks to the frames ``x`` [N, D] (see the module docstring); ``t_start`` is when the
    caller's fit began (the time budget and the reported seconds count from it). Run it under
    :func:`~spear.models.device.torch_threads` and ``torch.no_grad()``, as the quantiser's ``fit`` does."""
    st = settings
    t_start = time.time() if t_start is None else t_start
    say = log or (lambda s: None)
    st.check()
    dev = default_device() if device is None else torch.device(device)
    gen = torch.Generator().manual_seed(st.seed)  # draws the held-out rows, then the validation rows
    x, heldout = _fit_inputs(x, heldout, st, gen)
    # Normalisation statistics come from every frame given for fitting.
    mean32, std32 = _normalisation(x, st.normalize)
    xn = _normalised_rows(x, mean32, std32, st.normalize, dev)
    xn, xval = _validation_split(xn, st, gen)
    st = replace(st, kmeans_backend=st.kmeans_backend or kernels.default_kmeans_backend(dev))
    books, codes = kernels.residual_kmeans_init(
        xn, st.num_codebooks, st.codebook_size, niter=st.kmeans_iters, seed=st.seed,
        max_points_per_centroid=st.max_points_per_centroid, progressive_steps=st.progressive_dim_steps,
        beam=st.init_beam_size, beam_tolerance=st.init_beam_tolerance, kmeans_backend=st.kmeans_backend, log=log)
    total = float(((xn - xn.mean(0)) ** 2).sum())
    say(f"initialised {st.num_codebooks} x {st.codebook_size} codebooks in {time.time() - t_start:.1f}s")
    books, refined = _refine(xn, xval, books, codes, total, st, t_start, say)
    train_codes, train_err = kernels.encode_rows(xn, kernels.codebook_tables(books), st.beam_size, st.icm_sweeps,
                                                 st.chunk_size)
    meta: dict[str, Any] = {
        "teacher_id": teacher_id, "layer": layer, "extra": extra,
        "training_frames": xn.shape[0],
        "validation_frames": 0 if xval is None else int(xval.shape[0]),
        "train_relative_loss": train_err / total,
        "validation_relative_loss": refined.best_val,
        "perplexity": [round(p, 3) for p in codebook_usage(train_codes, st.codebook_size).perplexity],
        "heldout_frames": None if heldout is None else int(heldout.shape[0]),
        "heldout_relative_loss": None,
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "fit": st.record(refined, dev, time.time() - t_start),
    }
    return FittedCodebooks(books, mean32, std32, heldout, meta, dev)


def _fit_inputs(x: ArrayLike, heldout: Optional[ArrayLike], st: FitSettings, gen: torch.Generator
                ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Check the training (and held-out) frames; split ``heldout_fraction`` of ``x`` off as held-out frames."""
    x = as_float_tensor(x, "training frames")
    if x.ndim != 2:
        raise ValueError(f"training frames must be a 2-D [N, D] array, got shape {list(x.shape)}")
    check_finite(x, "training frames")
    if st.heldout_fraction > 0:
        perm = torch.randperm(x.shape[0], generator=gen)
        n_held = int(round(st.heldout_fraction * x.shape[0]))
        heldout, x = x[perm[:n_held]], x[perm[n_held:]]
    if x.shape[0] < st.min_rows:
        raise ValueError(f"too few training frames: got {x.shape[0]}, need at least {st.min_rows} "
                         f"({MIN_ROWS_PER_ENTRY} x codebook_size={st.codebook_size})")
    if heldout is not None:
        heldout = as_float_tensor(heldout, "held-out frames")
        if heldout.ndim != 2 or heldout.shape[1] != x.shape[1]:
            raise ValueError(f"held-out frames must be [n, {x.shape[1]}], got shape {list(heldout.shape)}")
        check_finite(heldout, "held-out frames")
    return x, heldout


def _normalisation(x: torch.Tensor, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension (mean, std) of ``x`` as float32 (float64 sums, chunked); (0, 1) without normalisation."""
    d = x.shape[1]
    if normalize:
        s1 = torch.zeros(d, dtype=torch.float64)
        s2 = torch.zeros(d, dtype=torch.float64)
        for s in range(0, x.shape[0], 65536):
            xs = x[s : s + 65536].to("cpu", torch.float64)
            s1 += xs.sum(0)
            s2 += (xs * xs).sum(0)
        mean = s1 / x.shape[0]
        std = (s2 / x.shape[0] - mean * mean).clamp_min(0.0).sqrt()
        # A constant dimension carries nothing: leave it unscaled instead of dividing by ~0.
        std = torch.where(std > 1e-8 * max(float(std.max()), 1e-30), std, torch.ones_like(std))
    else:
        mean, std = torch.zeros(d, dtype=torch.float64), torch.ones(d, dtype=torch.float64)
    return mean.to(torch.float32), std.to(torch.float32)


def _normalised_rows(x: torch.Tensor, mean32: torch.Tensor, std32: torch.Tensor, normalize: bool,
                     dev: torch.device) -> torch.Tensor:
    """``x`` in the codebooks' space on ``dev``: exactly the float32 transform :meth:`encode` applies."""
    m_dev, s_dev = mean32.to(dev), std32.to(dev)
    xn = torch.empty(x.shape, dtype=torch.float32, device=dev)
    for s in range(0, x.shape[0], 65536):
        xs = x[s : s + 65536].to(dev, torch.float32)
        xn[s : s + 65536] = (xs - m_dev) / s_dev if normalize else xs
    return xn


def _validation_split(xn: torch.Tensor, st: FitSettings, gen: torch.Generator
                      ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(training rows, validation rows or None): ``validation_fraction`` of the rows, when refinement
    runs and enough rows stay for fitting."""
    n_val = int(round(st.validation_fraction * xn.shape[0])) if st.refine_iters > 0 else 0
    if n_val > 0 and xn.shape[0] - n_val >= st.min_rows:
        perm = torch.randperm(xn.shape[0], generator=gen).to(xn.device)
        return xn[perm[n_val:]], xn[perm[:n_val]]
    return xn, None


def _refine(xn: torch.Tensor, xval: Optional[torch.Tensor], books: torch.Tensor, codes: torch.Tensor, total: float,
            st: FitSettings, t_start: float, say: Callable[[str], None]) -> tuple[torch.Tensor, Refinement]:
    """Joint refinement: alternate the least-squares update of all codebooks and re-encoding the
    training rows; with validation rows, a pass that does not lower their loss is rejected and ends it."""

    def val_loss(b: torch.Tensor) -> float:
        _, e = kernels.encode_rows(xval, kernels.codebook_tables(b), st.beam_size, st.icm_sweeps, st.chunk_size)
        return e / float(((xval - xval.mean(0)) ** 2).sum())

    best_val = val_loss(books) if xval is not None else None
    iters_done, last_iter_s, stop = 0, 0.0, "all passes run"
    for it in range(st.refine_iters):
        if st.time_budget_s is not None and time.time() - t_start + last_iter_s > st.time_budget_s:
            stop = f"time budget {st.time_budget_s:.0f}s"
            break
        t_it = time.time()
        cand = kernels.least_squares_update(xn, codes, books, st.ridge)
        if xval is not None:
            v = val_loss(cand)
            if v >= best_val:
                stop = f"validation loss {v:.4f} >= {best_val:.4f}: pass {it + 1} rejected"
                break
            best_val = v
        books = cand
        codes, err = kernels.encode_rows(xn, kernels.codebook_tables(books), st.train_beam, st.train_icm_sweeps,
                                  st.chunk_size, init_codes=codes)
        iters_done += 1
        last_iter_s = time.time() - t_it
        say(f"refinement pass {it + 1}/{st.refine_iters}: train loss {err / total:.4f}, validation loss "
            f"{best_val if best_val is None else round(best_val, 4)} ({last_iter_s:.1f}s)")
    if st.refine_iters:
        say(f"refinement stopped after {iters_done} accepted passes ({stop})")
    return books, Refinement(iters_done, stop, best_val)
