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

import copy
import time
from typing import Any, Callable, Optional, Union

import numpy as np
import torch

from spear.models.device import default_device
from spear.models.mvq import kernels
from spear.models.mvq.checks import ArrayLike, as_float_tensor, check_codebook_size, check_finite
from spear.models.device import torch_threads
from spear.models.mvq.fitting import FitSettings, fit_codebooks
from spear.models.mvq.version import content_hash


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
        check_codebook_size(K)
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
        with torch_threads(st.num_threads, faiss=True), torch.no_grad():
            fitted = fit_codebooks(x, st, heldout=heldout, teacher_id=teacher_id, layer=layer, extra=extra,
                                   device=device, log=log, t_start=t_start)
            q = cls(fitted.codebooks, fitted.mean, fitted.std, normalize=st.normalize, beam_size=st.beam_size,
                    icm_sweeps=st.icm_sweeps, metadata=fitted.meta, device=fitted.device)
            if fitted.heldout is not None and fitted.heldout.shape[0] > 0:
                q._meta["heldout_relative_loss"] = q.relative_reconstruction_loss(fitted.heldout,
                                                                                  chunk_size=st.chunk_size)
            held = q._meta["heldout_relative_loss"]
            say(f"fitted in {time.time() - t_start:.1f}s: train loss {fitted.meta['train_relative_loss']:.4f}, "
                f"held-out loss {'n/a' if held is None else f'{held:.4f}'}")
        return q

    # ------------------------------------------------------------------ encode / decode

    def _get_tables(self) -> kernels.CodebookTables:
        if self._tables is None:
            self._tables = kernels.codebook_tables(self._codebooks)
        return self._tables

    def _prepare(self, x: ArrayLike, what: str = "frames") -> torch.Tensor:
        x = as_float_tensor(x, what)
        if x.ndim == 0 or x.shape[-1] != self.dim:
            got = "a scalar" if x.ndim == 0 else f"{x.shape[-1]} (shape {list(x.shape)})"
            raise ValueError(f"{what}: expected dimension {self.dim} on the last axis, got {got}")
        check_finite(x, what)
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
            codes, _ = kernels.encode_rows(rows, self._get_tables(), beam, sweeps, chunk_size, transform=self._normalised)
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
        when ``normalize`` is on, in the original space otherwise. ``mean(x)`` is the mean of the
        given frames, so this is the share of *their* variance left unexplained: 0 is perfect,
        predicting their mean scores 1. multi_quantization divides by ``sum ||x||^2`` of the
        normalised frames instead (their spread about the training mean), which is lower on a
        held-out set from few segments, whose frames vary less among themselves (150 frames of one
        or two segments: 0.98 here against 0.72 that way).
        """
        rows = self._prepare(x)
        if rows.shape[0] == 0:
            raise ValueError("relative_reconstruction_loss needs at least one frame")
        with torch.no_grad():
            _, err = kernels.encode_rows(rows, self._get_tables(), self._beam_size, self._icm_sweeps, chunk_size,
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


