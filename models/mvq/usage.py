"""Codebook usage for the fit stage's report: per-codebook counts, perplexity and a plot.

Example::

    >>> import torch
    >>> from spear.models.mvq.usage import codebook_usage, plot_codebook_usage
    >>> codes = torch.randint(0, 256, (1000, 16), dtype=torch.uint8)
    >>> usage = codebook_usage(codes, codebook_size=256)
    >>> usage.counts.shape, len(usage.perplexity)
    (torch.Size([16, 256]), 16)
    >>> _ = plot_codebook_usage(codes, "/tmp/spear-doc/usage.png")
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
import torch


@dataclass(frozen=True)
class CodebookUsage:
    """How often each entry of each codebook is used in a set of codes."""

    counts: torch.Tensor  # [C, K] int64
    perplexity: list[float]  # per codebook, exp(entropy); K when all entries are equally used
    unused: list[int]  # entries never used, per codebook

    @property
    def num_frames(self) -> int:
        return int(self.counts[0].sum()) if self.counts.numel() else 0

    def as_dict(self) -> dict:
        return {"num_frames": self.num_frames, "perplexity": self.perplexity, "unused": self.unused}


def codebook_usage(codes: Union[torch.Tensor, np.ndarray], codebook_size: int = 256) -> CodebookUsage:
    """Counts and perplexity of ``codes`` [N, C] (uint8 tokens or any integer type)."""
    if isinstance(codes, np.ndarray):
        codes = torch.from_numpy(np.ascontiguousarray(codes))
    if codes.ndim != 2:
        raise ValueError(f"codes must be [N, num_codebooks], got shape {list(codes.shape)}")
    codes = codes.detach().to("cpu").long()
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= codebook_size):
        raise ValueError(f"codes must lie in 0..{codebook_size - 1}, got values up to {int(codes.max())}")
    C = codes.shape[1]
    counts = torch.stack([torch.bincount(codes[:, c], minlength=codebook_size) for c in range(C)]) if C else \
        torch.zeros(0, codebook_size, dtype=torch.long)
    perplexity, unused = [], []
    for c in range(C):
        p = counts[c].to(torch.float64)
        p = p / p.sum().clamp_min(1)
        nz = p[p > 0]
        perplexity.append(float(torch.exp(-(nz * nz.log()).sum())) if nz.numel() else 0.0)
        unused.append(int((counts[c] == 0).sum()))
    return CodebookUsage(counts=counts, perplexity=perplexity, unused=unused)


def plot_codebook_usage(codes: Union[torch.Tensor, np.ndarray], path: str, codebook_size: int = 256,
                        title: Optional[str] = None) -> CodebookUsage:
    """Write a PNG (matplotlib Agg) to ``path``: per-codebook perplexity (bars) and the sorted entry
    frequencies of every codebook (lines, log scale). Returns the :class:`CodebookUsage`."""
    import matplotlib  # optional and slow to import: only reports plot

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    usage = codebook_usage(codes, codebook_size)
    C = usage.counts.shape[0]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.bar(np.arange(C), usage.perplexity, color="tab:blue")
    ax1.axhline(codebook_size, color="gray", ls="--", lw=1, label=f"uniform ({codebook_size})")
    ax1.set_xlabel("codebook")
    ax1.set_ylabel("perplexity")
    ax1.set_ylim(0, codebook_size * 1.05)
    ax1.legend(loc="lower right")
    freq = usage.counts.to(torch.float64) / max(usage.num_frames, 1)
    for c in range(C):
        ax2.plot(np.sort(freq[c].numpy())[::-1], lw=0.8, alpha=0.7)
    ax2.axhline(1.0 / codebook_size, color="gray", ls="--", lw=1)
    ax2.set_yscale("log")
    ax2.set_xlabel("entry rank")
    ax2.set_ylabel("frequency")
    fig.suptitle(title or f"codebook usage over {usage.num_frames} frames ({C} x {codebook_size})")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return usage
