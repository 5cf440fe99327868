"""Outside weights in and out: Llama-family checkpoints (Hugging Face safetensors, GGUF)."""

from hmem.weights.hf import export_hf, export_run
from hmem.weights.run import import_checkpoint

__all__ = ['export_hf', 'export_run', 'import_checkpoint']
