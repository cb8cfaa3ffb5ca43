"""Frozen teacher models behind one interface."""
