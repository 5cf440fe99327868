"""Inference: route new text down the tree, read a trained bank, export and edit bundles,
generate and evaluate."""
