"""What every document embedder is: the interface, unit-norm rows, and the `embedder.json`
that records which one a directory holds (hmem.data.embed builds and reloads them)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from hmem.files import as_path, atomic_write

CONFIG_FILE = 'embedder.json'


class Embedder(Protocol):
  """Maps texts to [n, dim] float32 rows of unit L2 norm."""

  kind: str
  dim: int

  def embed(self, texts: Sequence[str], progress: bool = True) -> np.ndarray:
    """`progress`: a progress bar where embedding is slow enough to want one."""
    ...

  def identity(self) -> str:
    """A hex digest of everything the vectors depend on: equal digests, equal vectors."""
    ...

  def save(self, directory: str) -> None:
    """Writes what `load_embedder(directory)` needs to rebuild this embedder."""
    ...


def l2_normalize(x_NxD: np.ndarray) -> np.ndarray:
  """Rows scaled to unit norm; an all-zero row (a text with no known term) stays zero."""
  norms_Nx1 = np.linalg.norm(x_NxD, axis=1, keepdims=True)
  return (x_NxD / np.maximum(norms_Nx1, 1e-12)).astype(np.float32)


def write_config(directory: str | os.PathLike, config: dict) -> None:
  """Writes the `embedder.json` that `load_embedder` dispatches on (its `kind`)."""
  directory = as_path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  with atomic_write(directory / CONFIG_FILE, encoding='utf-8') as f:
    json.dump(config, f, indent=2)
    f.write('\n')
