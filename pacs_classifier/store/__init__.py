"""Storing: crash-safe files under ``storage.root`` and the ingest transaction."""
