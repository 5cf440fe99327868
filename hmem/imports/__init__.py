"""Outside weights in and out: Llama-family checkpoints (Hugging Face safetensors, GGUF)."""

from hmem.imports.hf import export_hf, export_run
from hmem.imports.run import import_checkpoint

__all__ = ['export_hf', 'export_run', 'import_checkpoint']
