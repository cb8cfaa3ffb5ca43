"""One module per pipeline stage: Ray Data callables (catalog, decode, teacher, quantise, shard writer) and the Ray Train loop;
model artefacts on storage (``artefacts``: checkpoints, codebooks, student exports) and teachers built from their config
(``teacher_loading``)."""
