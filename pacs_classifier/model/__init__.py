"""Inference: model bundles, the registry, and the serving runtimes."""
