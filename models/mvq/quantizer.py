"""Multi-codebook vector quantiser (MVQ): teacher embeddings -> C bytes per frame.

An additive quantiser: a frame ``x`` (after per-dimension normalisation) is approximated by
the sum of one entry from each of C codebooks, ``x_hat = sum_c codebooks[c, i_c]``, and stored
as the C indexes (uint8). The model is the one of k2-fsa's ``multi_quantization``; the fitting
and the encoder differ:

- initialisation: residual k-means (codebook c is the k-means of what codebooks < c leave),
  with faiss' progressive-dimension clustering (PCA dims grow 2, 4, ... D; faiss-gpu when it
  sees a GPU, plain torch k-means when faiss is missing);
- refinement: alternate (a) encoding every training frame with the joint encoder and (b) the
  exact least-squares update of all codebooks jointly for those codes; neither step can raise
  the training loss;
- encoder: beam search over the codebooks in order (beam 1 = greedy residual) followed by
  sweeps of iterated conditional modes (each codebook in turn takes its best entry given the
  others), all on precomputed inner products; vectorised torch, chunked over frames.

Example::

    >>> import torch
    >>> from spear.models.mvq import FitSettings, MultiCodebookQuantizer
    >>> x = torch.randn(4096, 64)
    >>> q = MultiCodebookQuantizer.fit(x, FitSettings(num_codebooks=4, codebook_size=16, seed=0, refine_iters=2))
    >>> codes = q.encode(x[:10])            # torch.uint8 [10, 4]
    >>> x_hat = q.decode(codes)             # float32 [10, 64], original space
    >>> MultiCodebookQuantizer.from_state(q.codebooks, q.mean, q.std, q.metadata).version == q.version
    True

Saving and loading the versioned artefact (local or s3://) is :mod:`spear.stages.artefacts`
(``save_quantizer`` / ``load_quantizer``); its format is :mod:`spear.schemas.codebooks`.
"""

from __future__ import annotations

import contextlib
import copy
import datetime as _dt
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Union

import numpy as np
import torch

from spear.models.device import default_device
from spear.models.mvq import kernels
from spear.models.mvq.usage import codebook_usage
from spear.models.mvq.version import content_hash

ArrayLike = Union[torch.Tensor, np.ndarray]

# A training sample needs this many rows per codebook entry at least (k-means on fewer is noise).
MIN_ROWS_PER_ENTRY = 4
# Memory the encoder may use per chunk for its [rows, C, K] score tables (chunk_size=None).
_CHUNK_BYTES = 256 << 20


@contextlib.contextmanager
def _threads(num_threads: Optional[int]) -> Iterator[None]:
    """Run torch (and faiss) with ``num_threads`` intra-op threads, restoring the old setting."""
    if not num_threads:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        import faiss  # optional: GPU machines may have no faiss wheel
    except ImportError:
        faiss = None
    old_faiss = faiss.omp_get_max_threads() if faiss is not None else 0
    if faiss is not None:
        faiss.omp_set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(old)
        if faiss is not None:
            faiss.omp_set_num_threads(old_faiss)


def _as_tensor(x: ArrayLike, what: str) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{what} must be a torch tensor or numpy array, got {type(x).__name__}")
    if not torch.is_floating_point(x):
        raise ValueError(f"{what} must be floating point, got dtype {x.dtype}")
    return x


def _check_finite(x: torch.Tensor, what: str) -> None:
    bad = ~torch.isfinite(x).all(dim=-1)
    if bool(bad.any()):
        rows = torch.nonzero(bad.reshape(-1)).flatten()
        raise ValueError(f"{what}: {rows.numel()} of {bad.numel()} rows contain NaN or inf values "
                         f"(first bad row: {int(rows[0])}); drop or repair them before quantising")


class MultiCodebookQuantizer:
    """C codebooks of K entries over D-dim frames; tokens are ``torch.uint8`` [N, C].

    Build one with :meth:`fit` or :meth:`from_state`. The codebooks live in the normalised space
    ``(x - mean) / std`` (identity when fitted with ``normalize=False``); :meth:`encode` and
    :meth:`decode` take and return frames in the original space.

    Attributes set at construction define the codes (and enter :attr:`version`): the codebooks,
    the normalisation and the encoder settings (``beam_size``, ``icm_sweeps``).
    """

    def __init__(self, codebooks: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, *, normalize: bool,
                 beam_size: int = 8, icm_sweeps: int = 0, metadata: Optional[dict[str, Any]] = None,
                 device: Union[str, torch.device, None] = None):
        if codebooks.ndim != 3:
            raise ValueError(f"codebooks must be [num_codebooks, codebook_size, dim], "
                             f"got shape {list(codebooks.shape)}")
        M, K, D = codebooks.shape
        _check_codebook_size(K)
        if tuple(mean.shape) != (D,) or tuple(std.shape) != (D,):
            raise ValueError(f"mean and std must be [{D}], got {list(mean.shape)} and {list(std.shape)}")
        self._device = default_device() if device is None else torch.device(device)
        self._codebooks = codebooks.detach().to(self._device, torch.float32).contiguous()
        self._mean = mean.detach().to(self._device, torch.float32).contiguous()
        self._std = std.detach().to(self._device, torch.float32).contiguous()
        self._normalize = bool(normalize)
        self._beam_size = int(beam_size)
        self._icm_sweeps = int(icm_sweeps)
        meta = dict(metadata or {})
        meta.update(dim=D, num_codebooks=M, codebook_size=K,
                    normalize=self._normalize, encoder={"beam_size": self._beam_size, "icm_sweeps": self._icm_sweeps})
        for k in ("teacher_id", "layer", "training_frames", "validation_frames", "train_relative_loss",
                  "validation_relative_loss", "heldout_frames", "heldout_relative_loss", "perplexity", "created_at",
                  "fit", "extra"):
            meta.setdefault(k, None)
        meta["version"] = content_hash(self._codebooks, self._mean, self._std, meta)
        self._meta = meta
        self._tables: Optional[kernels.CodebookTables] = None

    # ------------------------------------------------------------------ properties

    @property
    def num_codebooks(self) -> int:
        return self._codebooks.shape[0]

    @property
    def codebook_size(self) -> int:
        return self._codebooks.shape[1]

    @property
    def dim(self) -> int:
        return self._codebooks.shape[2]

    @property
    def normalize(self) -> bool:
        return self._normalize

    @property
    def version(self) -> str:
        """Content hash (sha256 hex) of the tensors and the fields that define the codes."""
        return self._meta["version"]

    @property
    def metadata(self) -> dict[str, Any]:
        """A copy of the metadata (the fields of :mod:`spear.schemas.codebooks`' meta.json, less the format)."""
        return copy.deepcopy(self._meta)

    @property
    def codebooks(self) -> torch.Tensor:
        """[C, K, D] float32, in the normalised space."""
        return self._codebooks

    @property
    def mean(self) -> torch.Tensor:
        return self._mean

    @property
    def std(self) -> torch.Tensor:
        return self._std

    @property
    def device(self) -> torch.device:
        return self._device

    def to(self, device: Union[str, torch.device]) -> "MultiCodebookQuantizer":
        """Move the codebooks (the computation of encode/decode) to ``device``, in place."""
        self._device = torch.device(device)
        self._codebooks = self._codebooks.to(self._device)
        self._mean, self._std = self._mean.to(self._device), self._std.to(self._device)
        self._tables = None
        return self

    def __repr__(self) -> str:
        return (f"MultiCodebookQuantizer(num_codebooks={self.num_codebooks}, codebook_size={self.codebook_size}, "
                f"dim={self.dim}, normalize={self.normalize}, teacher_id={self._meta.get('teacher_id')!r}, "
                f"layer={self._meta.get('layer')!r}, version={self.version[:12]})")

    # ------------------------------------------------------------------ fitting

    @classmethod
    def fit(cls, x: ArrayLike, settings: Optional[FitSettings] = None, *, heldout: Optional[ArrayLike] = None,
            teacher_id: Optional[str] = None, layer: Optional[int] = None, extra: Optional[dict[str, Any]] = None,
            device: Union[str, torch.device, None] = None,
            log: Optional[Callable[[str], None]] = None) -> "MultiCodebookQuantizer":
        """Fit ``settings.num_codebooks`` codebooks of ``settings.codebook_size`` entries to the frames ``x`` [N, D].

        Stages: (1) residual k-means initialisation with a beam of partial encodings per frame
        (``init_beam_size``, ``init_beam_tolerance``; faiss k-means); (2) up to ``refine_iters``
        joint refinement passes, each an exact least-squares update of all codebooks for the
        current codes followed by re-encoding the training frames; a pass is kept only if it lowers the loss on a
        validation split (``validation_fraction`` of ``x``, never used for fitting): with few
        frames per codebook entry the joint update overfits, with many it helps.

        Args:
            x: training frames (torch or numpy, any float dtype), [N, D] with N >= 4 x codebook_size.
            settings: how to fit (:class:`FitSettings`; None = its defaults).
            heldout: frames to measure the held-out relative reconstruction loss on (stored in
                the metadata); or ``settings.heldout_fraction``: share of ``x`` (seeded random rows) kept for it.
            teacher_id, layer, extra: metadata stored in the artefact (teacher_id and layer also
                enter the version, so artefacts of different teachers never share one).
            device: where to compute (default: CUDA when available, else CPU).
            log: callable receiving progress lines (e.g. ``print`` or ``logger.info``).
        """
        st = settings or FitSettings()
        t_start = time.time()
        say = log or (lambda s: None)
        st.check()
        dev = default_device() if device is None else torch.device(device)
        gen = torch.Generator().manual_seed(st.seed)  # draws the held-out rows, then the validation rows
        x, heldout = _fit_inputs(x, heldout, st, gen)
        with _threads(st.num_threads), torch.no_grad():
            # Normalisation statistics come from every frame given for fitting.
            mean32, std32 = _normalisation(x, st.normalize)
            xn = _normalised_rows(x, mean32, std32, st.normalize, dev)
            xn, xval = _validation_split(xn, st, gen)
            books, codes = kernels.residual_kmeans_init(
                xn, st.num_codebooks, st.codebook_size, niter=st.kmeans_iters, seed=st.seed,
                max_points_per_centroid=st.max_points_per_centroid, progressive_steps=st.progressive_dim_steps,
                beam=st.init_beam_size, beam_tolerance=st.init_beam_tolerance, kmeans_backend=st.kmeans_backend,
                log=log)
            total = float(((xn - xn.mean(0)) ** 2).sum())
            say(f"initialised {st.num_codebooks} x {st.codebook_size} codebooks in {time.time() - t_start:.1f}s")
            books, refined = _refine(xn, xval, books, codes, total, st, t_start, say)
            train_codes, train_err = _encode_rows(xn, kernels.codebook_tables(books), st.beam_size, st.icm_sweeps,
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
            q = cls(books, mean32, std32, normalize=st.normalize, beam_size=st.beam_size, icm_sweeps=st.icm_sweeps,
                    metadata=meta, device=dev)
            if heldout is not None and heldout.shape[0] > 0:
                q._meta["heldout_relative_loss"] = q.relative_reconstruction_loss(heldout, chunk_size=st.chunk_size)
            say(f"fitted in {time.time() - t_start:.1f}s: train loss {meta['train_relative_loss']:.4f}, "
                f"held-out loss {q._meta['heldout_relative_loss']}")
        return q

    # ------------------------------------------------------------------ encode / decode

    def _get_tables(self) -> kernels.CodebookTables:
        if self._tables is None:
            self._tables = kernels.codebook_tables(self._codebooks)
        return self._tables

    def _prepare(self, x: ArrayLike, what: str = "frames") -> torch.Tensor:
        x = _as_tensor(x, what)
        if x.ndim == 0 or x.shape[-1] != self.dim:
            got = "a scalar" if x.ndim == 0 else f"{x.shape[-1]} (shape {list(x.shape)})"
            raise ValueError(f"{what}: expected dimension {self.dim} on the last axis, got {got}")
        _check_finite(x, what)
        return x.reshape(-1, self.dim)

    def _normalised(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self._device, torch.float32)
        return (x - self._mean) / self._std if self._normalize else x

    def encode(self, x: ArrayLike, *, chunk_size: Optional[int] = None, beam_size: Optional[int] = None,
               icm_sweeps: Optional[int] = None) -> torch.Tensor:
        """Tokens of frames ``x`` [..., D] -> ``torch.uint8`` [..., C] on ``x``'s device.

        Computed on :attr:`device` in chunks of ``chunk_size`` frames (memory stays bounded);
        the codes do not depend on the chunk size. ``beam_size`` / ``icm_sweeps`` override the
        artefact's encoder settings (tokens then differ from the versioned ones).
        """
        out_device = x.device if isinstance(x, torch.Tensor) else torch.device("cpu")
        lead = tuple(x.shape[:-1])
        rows = self._prepare(x)
        beam = self._beam_size if beam_size is None else int(beam_size)
        sweeps = self._icm_sweeps if icm_sweeps is None else int(icm_sweeps)
        with torch.no_grad():
            codes, _ = _encode_rows(rows, self._get_tables(), beam, sweeps, chunk_size, transform=self._normalised)
        return codes.to(torch.uint8).reshape(*lead, self.num_codebooks).to(out_device)

    def decode(self, codes: ArrayLike) -> torch.Tensor:
        """Frames (float32, original space) [..., D] from tokens [..., C], on ``codes``' device."""
        if isinstance(codes, np.ndarray):
            codes = torch.from_numpy(np.ascontiguousarray(codes))
        if not isinstance(codes, torch.Tensor) or torch.is_floating_point(codes) or codes.dtype == torch.bool:
            raise ValueError("codes must be an integer tensor or array (uint8 tokens from encode)")
        if codes.ndim == 0 or codes.shape[-1] != self.num_codebooks:
            raise ValueError(f"codes: expected {self.num_codebooks} codebooks on the last axis, got shape "
                             f"{list(codes.shape)}")
        out_device = codes.device
        lead = tuple(codes.shape[:-1])
        flat = codes.reshape(-1, self.num_codebooks).to(self._device).long()
        if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= self.codebook_size):
            raise ValueError(f"codes must lie in 0..{self.codebook_size - 1}, got values in "
                             f"{int(flat.min())}..{int(flat.max())}")
        with torch.no_grad():
            xn = kernels.decode_codes(flat, self._codebooks)
            x = xn * self._std + self._mean if self._normalize else xn
        return x.reshape(*lead, self.dim).to(out_device)

    def relative_reconstruction_loss(self, x: ArrayLike, *, chunk_size: Optional[int] = None) -> float:
        """sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 over the frames ``x`` [..., D].

        Measured in the space the codebooks are fit in: after the per-dimension normalisation
        when ``normalize`` is on (as multi_quantization reports it for the normalised features
        it is trained on), in the original space otherwise. ``mean(x)`` is the mean of the given
        frames. 0 is perfect; predicting the mean scores 1.
        """
        rows = self._prepare(x)
        if rows.shape[0] == 0:
            raise ValueError("relative_reconstruction_loss needs at least one frame")
        with torch.no_grad():
            _, err = _encode_rows(rows, self._get_tables(), self._beam_size, self._icm_sweeps, chunk_size,
                                  transform=self._normalised)
            total = 0.0
            mu = torch.zeros(self.dim, dtype=torch.float64, device=self._device)
            for s in range(0, rows.shape[0], 65536):
                mu += self._normalised(rows[s : s + 65536]).to(torch.float64).sum(0)
            mu /= rows.shape[0]
            for s in range(0, rows.shape[0], 65536):
                total += float(((self._normalised(rows[s : s + 65536]).to(torch.float64) - mu) ** 2).sum())
        return float(err) / max(total, 1e-30)

    # ------------------------------------------------------------------ state

    @classmethod
    def from_state(cls, codebooks: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, metadata: dict[str, Any],
                   device: Union[str, torch.device, None] = None) -> "MultiCodebookQuantizer":
        """Rebuild a quantiser from its tensors and :attr:`metadata` (e.g. as stored in an artefact).

        The normalisation and encoder settings come from the metadata; :attr:`version` is
        recomputed from what the quantiser now holds, so a caller compares it with the stored one.
        Reading and writing artefacts on storage: :mod:`spear.stages.artefacts`.
        """
        enc = metadata.get("encoder") or {}
        return cls(codebooks, mean, std, normalize=bool(metadata["normalize"]),
                   beam_size=int(enc.get("beam_size", 8)), icm_sweeps=int(enc.get("icm_sweeps", 0)),
                   metadata=metadata, device=device)

    def check_compatible(self, *, teacher_id: Optional[str] = None, layer: Optional[int] = None,
                         dim: Optional[int] = None, num_codebooks: Optional[int] = None,
                         codebook_size: Optional[int] = None, version: Optional[str] = None) -> None:
        """Raise ValueError unless this quantiser matches every given field.

        Example: ``q.check_compatible(teacher_id="wavlm-large", layer=21, dim=1024)`` before
        tokenising a teacher's embeddings with ``q``.
        """
        expected = {"teacher_id": teacher_id, "layer": layer, "dim": dim, "num_codebooks": num_codebooks,
                    "codebook_size": codebook_size, "version": version}
        wrong = [f"{k}: artefact has {self._meta.get(k)!r}, expected {v!r}"
                 for k, v in expected.items() if v is not None and self._meta.get(k) != v]
        if wrong:
            raise ValueError(f"MVQ codebooks {self.version[:12]} (teacher {self._meta.get('teacher_id')!r}, layer "
                             f"{self._meta.get('layer')!r}) do not fit this use: " + "; ".join(wrong))


def _check_codebook_size(k: int) -> None:
    if not isinstance(k, (int, np.integer)) or k < 2 or k > 256 or (k & (k - 1)):
        raise ValueError(f"codebook_size must be a power of two between 2 and 256 (tokens are uint8), got {k!r}")


@dataclass(frozen=True)
class FitSettings:
    """How :meth:`MultiCodebookQuantizer.fit` fits codebooks; the defaults are the pipeline's.

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
        kmeans_backend: "faiss" (default when installed; faiss-gpu when it sees a GPU) or
            "torch" (same progressive k-means in torch on the fitting device; used without faiss).
        refine_iters: joint refinement passes at most (0 = initialisation only).
        validation_fraction: share of the frames held back to accept or reject refinement passes
            (0 = accept every pass, fit on all rows).
        train_beam_size, train_icm_sweeps: the encoder of training frames during refinement
            (default beam: ``beam_size``); each row also keeps its previous codes if better.
        ridge: weight pulling the least-squares update towards the previous codebooks
            (keeps unused entries and the singular directions in place).
        beam_size, icm_sweeps: the encoder of the fitted quantiser (:meth:`MultiCodebookQuantizer.encode`).
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
        _check_codebook_size(self.codebook_size)
        if not (1 <= self.num_codebooks <= 64):
            raise ValueError(f"num_codebooks must be in 1..64, got {self.num_codebooks}")
        for name in ("heldout_fraction", "validation_fraction"):
            frac = getattr(self, name)
            if not (0.0 <= frac < 0.5):
                raise ValueError(f"{name} must be in [0, 0.5), got {frac}")

    def record(self, refined: "_Refinement", device: torch.device, seconds: float) -> dict[str, Any]:
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
class _Refinement:
    """How refinement ended: accepted passes, why it stopped, the best validation loss (None without validation)."""

    iters_done: int
    stop: str
    best_val: Optional[float]


def _fit_inputs(x: ArrayLike, heldout: Optional[ArrayLike], st: FitSettings, gen: torch.Generator
                ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Check the training (and held-out) frames; split ``heldout_fraction`` of ``x`` off as held-out frames."""
    x = _as_tensor(x, "training frames")
    if x.ndim != 2:
        raise ValueError(f"training frames must be a 2-D [N, D] array, got shape {list(x.shape)}")
    _check_finite(x, "training frames")
    if st.heldout_fraction > 0:
        perm = torch.randperm(x.shape[0], generator=gen)
        n_held = int(round(st.heldout_fraction * x.shape[0]))
        heldout, x = x[perm[:n_held]], x[perm[n_held:]]
    if x.shape[0] < st.min_rows:
        raise ValueError(f"too few training frames: got {x.shape[0]}, need at least {st.min_rows} "
                         f"({MIN_ROWS_PER_ENTRY} x codebook_size={st.codebook_size})")
    if heldout is not None:
        heldout = _as_tensor(heldout, "held-out frames")
        if heldout.ndim != 2 or heldout.shape[1] != x.shape[1]:
            raise ValueError(f"held-out frames must be [n, {x.shape[1]}], got shape {list(heldout.shape)}")
        _check_finite(heldout, "held-out frames")
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
            st: FitSettings, t_start: float, say: Callable[[str], None]) -> tuple[torch.Tensor, _Refinement]:
    """Joint refinement: alternate the least-squares update of all codebooks and re-encoding the
    training rows; with validation rows, a pass that does not lower their loss is rejected and ends it."""

    def val_loss(b: torch.Tensor) -> float:
        _, e = _encode_rows(xval, kernels.codebook_tables(b), st.beam_size, st.icm_sweeps, st.chunk_size)
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
        codes, err = _encode_rows(xn, kernels.codebook_tables(books), st.train_beam, st.train_icm_sweeps,
                                  st.chunk_size, init_codes=codes)
        iters_done += 1
        last_iter_s = time.time() - t_it
        say(f"refinement pass {it + 1}/{st.refine_iters}: train loss {err / total:.4f}, validation loss "
            f"{best_val if best_val is None else round(best_val, 4)} ({last_iter_s:.1f}s)")
    if st.refine_iters:
        say(f"refinement stopped after {iters_done} accepted passes ({stop})")
    return books, _Refinement(iters_done, stop, best_val)


def _chunk_rows(chunk_size: Optional[int], tables: kernels.CodebookTables, beam: int, device: torch.device) -> int:
    """Frames per encoder chunk, a multiple of the matmul row block (see kernels.unary_costs)."""
    blk = kernels.row_block(device)
    if chunk_size is None:
        per_row = 4 * tables.num_codebooks * tables.codebook_size * 2 + 4 * beam * tables.codebook_size * 3
        chunk_size = max(blk, _CHUNK_BYTES // per_row)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return int(math.ceil(chunk_size / blk) * blk)


def _encode_rows(x: torch.Tensor, tables: kernels.CodebookTables, beam: int, sweeps: int,
                 chunk_size: Optional[int], init_codes: Optional[torch.Tensor] = None,
                 transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
                 ) -> tuple[torch.Tensor, float]:
    """Encode rows chunk by chunk: (codes [N, C] int64 on the tables' device, total squared error)."""
    dev = tables.flat.device
    step = _chunk_rows(chunk_size, tables, beam, dev)
    n = x.shape[0]
    codes = torch.empty(n, tables.num_codebooks, dtype=torch.long, device=dev)
    err = 0.0
    for s in range(0, n, step):
        xs = x[s : s + step]
        xs = transform(xs) if transform is not None else xs.to(dev, torch.float32)
        init = None if init_codes is None else init_codes[s : s + step].to(dev)
        c, row_err = kernels.encode_chunk(xs, tables, beam, sweeps, init_codes=init)
        codes[s : s + step] = c
        err += float(row_err.to(torch.float64).sum())
    return codes, err
