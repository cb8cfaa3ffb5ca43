"""Evaluation: probe tasks, feature extraction, probes, the report and the HEAR API."""
