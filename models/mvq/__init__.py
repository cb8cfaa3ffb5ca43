"""Multi-codebook vector quantisation (MVQ) of teacher embeddings.

- :class:`MultiCodebookQuantizer`: fit (faiss residual k-means + joint refinement), encode to
  uint8 tokens, decode, save/load the versioned artefact (local paths and s3:// URIs).
- :func:`codebook_usage`, :func:`plot_codebook_usage`: usage statistics for reports.
"""

from spear.models.mvq.artefact import ArtefactError
from spear.models.mvq.quantizer import MultiCodebookQuantizer
from spear.models.mvq.usage import CodebookUsage, codebook_usage, plot_codebook_usage

__all__ = ["ArtefactError", "CodebookUsage", "MultiCodebookQuantizer", "codebook_usage", "plot_codebook_usage"]
