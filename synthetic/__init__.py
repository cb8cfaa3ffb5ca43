"""Synthetic corpora: the demo corpus generator (espeak-ng speech, synthesised sound events)."""
