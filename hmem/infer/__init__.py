"""Inference: generation and evaluation with a trained memory."""
