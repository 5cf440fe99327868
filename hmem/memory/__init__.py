"""Hierarchical parametric memory: the bank, the fetch, and its row-sparse optimizer."""
