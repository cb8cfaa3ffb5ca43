"""Multi-codebook vector quantisation (MVQ) of teacher embeddings."""
