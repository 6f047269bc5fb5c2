"""Ingest stage: download, validation, fingerprints and de-duplication of candidate images."""
