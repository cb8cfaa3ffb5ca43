"""Helpers shared by the tests (real audio files, corpora)."""
