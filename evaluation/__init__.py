"""Evaluation: probe tasks, feature extraction, probes, the report and the HEAR API.

Modules, in the order an evaluation uses them (:mod:`spear.pipeline.evaluate_job` composes
them into `spear evaluate`):

- :mod:`.tasks`: the probe tasks (built-in ones from the demo corpus' labels, user manifests),
  their splits and the frame grid;
- :mod:`.clips`: every clip the tasks name, decoded once;
- :mod:`.features`: one extractor per model kind (student layers, random student, teachers,
  raw fbank) and the extraction over the clips;
- :mod:`.probes`: the linear probe (logistic regression, L2 chosen on a validation carve,
  bootstrap confidence intervals);
- :mod:`.results`: probe rows per (task, model, layer), each model's layer chosen on validation, the summary;
- :mod:`.report`: ``index.html`` with plots and ``results.json``, and the CLI's text table;
- :mod:`.hear`: an exported student behind the HEAR 2021 API and as an s3prl-style upstream.
"""
