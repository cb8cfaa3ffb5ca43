"""Every on-storage format of spear, and the rows that travel between stages, with their versions.

One module per format; readers and writers elsewhere (stages/, pipeline/) use these definitions:

- :mod:`~spear.schemas.catalog`: listed source objects (the input of decode and of the ledger diff);
- :mod:`~spear.schemas.segments`: decoded 16 kHz segments, the decode stage's rows, ``SAMPLE_RATE``;
- :mod:`~spear.schemas.quarantine`: objects set aside, partial objects;
- :mod:`~spear.schemas.decode_record`: the `spear decode` output layout and ``decode.json``;
- :mod:`~spear.schemas.write_summary`: the writer's per-file summary rows;
- :mod:`~spear.schemas.shards`: token shards, token versions, the token dataset layout;
- :mod:`~spear.schemas.ledger`: ledger entries, manifests and ``version.json`` of a token version;
- :mod:`~spear.schemas.codebooks`: the MVQ codebook artefact;
- :mod:`~spear.schemas.train_metrics`: a training run's per-step ``metrics.csv``;
- :mod:`~spear.schemas.student_export`: an exported student;
- :mod:`~spear.schemas.versioning`: the version check readers make, and :class:`FormatError`.
"""
