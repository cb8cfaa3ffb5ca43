"""Composing stages into jobs: configs, the decode / tokenize / train / evaluate jobs, the CLI."""
