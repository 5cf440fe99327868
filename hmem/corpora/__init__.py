"""Benchmark and quickstart corpora, apart from the preparation pipeline (hmem.data)."""
