"""Multi-codebook vector quantisation (MVQ) of teacher embeddings.

- :class:`MultiCodebookQuantizer`: fit (faiss residual k-means + joint refinement, settings in
  :class:`FitSettings`, steps in :mod:`.fitting`), encode to uint8 tokens, decode (:mod:`.kernels`);
  :func:`~spear.models.mvq.version.content_hash` is its version. Artefacts on storage:
  :mod:`spear.stages.artefacts`, their format :mod:`spear.schemas.codebooks`.
- :func:`codebook_usage`, :func:`plot_codebook_usage`: usage statistics for reports.
"""

from spear.models.mvq.fitting import FitSettings
from spear.models.mvq.quantizer import MultiCodebookQuantizer
from spear.models.mvq.usage import CodebookUsage, codebook_usage, plot_codebook_usage

__all__ = ["CodebookUsage", "FitSettings", "MultiCodebookQuantizer", "codebook_usage", "plot_codebook_usage"]
