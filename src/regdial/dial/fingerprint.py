"""What a search's trials trained on, as a short hash in its identity: a rerun into the
directory resumes (or reads back) only a search of the same model and data.

The search's identity named the task, the model's import path or factory name and the
seed; a rerun after the data or the model changed (other rows, another width) read the old
result back as this one's. The fingerprint adds:

- the model: ``repr`` of a fresh one (its modules and their sizes and rates) and every
  parameter's name and shape;
- a data file: its size and the SHA-256 of its first ``FILE_BYTES``;
- loaders: each one's dataset's type and length, and the bytes of its tensors where it holds
  them (``TensorDataset``'s ``tensors``). Other datasets are not read item by item: an
  augmenting ``__getitem__`` would draw a new fingerprint each time. Changing such a
  dataset's contents at its same length goes unseen.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["FILE_BYTES", "TENSOR_BYTES", "fingerprint"]

FILE_BYTES = 64 * 2**20
"""A data file's bytes hashed (its size is hashed whole)."""

TENSOR_BYTES = 64 * 2**20
"""A dataset's tensor bytes hashed, at most, per tensor (its shape is hashed whole)."""


def fingerprint(model: nn.Module, data_path: str | None, loaders: tuple[Any, ...] | None) -> str:
    """16 hex digits of SHA-256 over the model's structure and the data (module docstring)."""
    digest = hashlib.sha256(repr(model).encode())
    for name, parameter in model.named_parameters():
        digest.update(f"{name}{tuple(parameter.shape)}".encode())
    if data_path is not None:
        path = Path(data_path)
        digest.update(str(path.stat().st_size).encode())
        with path.open("rb") as file:
            digest.update(file.read(FILE_BYTES))
    for loader in loaders or ():
        dataset = getattr(loader, "dataset", loader)
        digest.update(type(dataset).__qualname__.encode())
        try:
            digest.update(str(len(dataset)).encode())
        except TypeError:  # an iterable dataset: no length
            digest.update(b"-")
        for tensor in getattr(dataset, "tensors", ()):
            if isinstance(tensor, torch.Tensor):
                digest.update(f"{tuple(tensor.shape)}{tensor.dtype}".encode())
                flat = tensor.detach().reshape(-1)
                kept = flat[: max(1, TENSOR_BYTES // max(tensor.element_size(), 1))]
                digest.update(kept.cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]
