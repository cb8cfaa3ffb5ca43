"""Synthetic corpora: the labelled demo corpus (espeak-ng speech, procedural sound events).

Start at :func:`spear.synthetic.corpus.generate_demo_corpus`; the modules beside it hold the
speech (``speech``), the sound events (``events``), the plan of every clip (``plan``), rendering
(``render``), the file formats (``formats``) and small signal helpers (``signal``).
"""
