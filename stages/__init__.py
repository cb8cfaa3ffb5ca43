"""One module per pipeline stage: Ray Data callables (catalog, decode, teacher, quantise, shard writer) and the Ray Train loop."""
