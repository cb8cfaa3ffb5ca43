"""Student encoders (Zipformer2, Transformer/Conformer) and the masked multi-codebook prediction objective."""
