"""Arrow schemas for segments, shards, manifests and artefacts, with their version numbers."""
