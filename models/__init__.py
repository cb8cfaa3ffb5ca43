"""Pure torch: fbank frontend, teacher adapters, MVQ quantiser, student encoder, losses. Never imports Ray."""
