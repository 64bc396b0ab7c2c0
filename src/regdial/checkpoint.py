"""Checkpoints: tensors as safetensors, everything else as JSON, written atomically.

A checkpoint is ``checkpoints/state-NNNNNN.safetensors`` (the model, optimizer, weight
average and best weights, under ``group/name`` keys) and ``checkpoints/last.json`` (epoch,
position in the epoch, RNG state, early-stopping counters, history so far, and which
tensor file goes with it). The tensor file is written first, under a new name; then
``last.json`` is replaced atomically; then older tensor files are removed. A crash at any
moment leaves ``last.json`` pointing at a complete tensor file. Nothing is pickled.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from regdial._checks import Described, fail
from regdial._io import atomic_write, write_json

__all__ = [
    "load_checkpoint",
    "load_optimizer_state",
    "load_weights",
    "optimizer_state",
    "rng_from_text",
    "rng_to_text",
    "save_checkpoint",
    "save_weights",
]


def _flat(tensors: Mapping[str, Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """Flatten groups to ``group/name`` keys, on the CPU and contiguous.

    safetensors refuses tensors that share storage (tied weights, a view of a buffer);
    every tensor after the first on a storage is cloned apart.
    """
    flat: dict[str, Tensor] = {}
    storages: set[int] = set()
    for group, items in tensors.items():
        for name, tensor in items.items():
            t = tensor.detach().to("cpu")
            if t.numel():
                pointer = t.untyped_storage().data_ptr()
                if pointer in storages:
                    t = t.clone()
                storages.add(pointer)
            flat[f"{group}/{name}"] = t.contiguous()
    return flat


def save_weights(path: Path, tensors: Mapping[str, Tensor]) -> None:
    """Write one state dict as safetensors, atomically."""
    from safetensors.torch import save_file

    flat = {key.split("/", 1)[1]: t for key, t in _flat({"weights": tensors}).items()}
    atomic_write(path, lambda tmp: save_file(flat, str(tmp)))


def load_weights(path: Path) -> dict[str, Tensor]:
    """Read a state dict written by ``save_weights``."""
    from safetensors.torch import load_file

    if not path.is_file():
        fail("weights", "an existing .safetensors file", str(path))
    return dict(load_file(str(path)))


def rng_to_text(state: Tensor) -> str:
    return base64.b64encode(state.numpy().tobytes()).decode("ascii")


def rng_from_text(text: str) -> Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8).clone()


def optimizer_state(optimizer: Optimizer) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """An optimizer's state split into tensors (for safetensors) and plain values (JSON)."""
    state = optimizer.state_dict()
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, Any] = {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if isinstance(value, Tensor):
                tensors[f"{index}.{key}"] = value
            else:
                scalars[f"{index}.{key}"] = value
    groups = [
        {k: (v.item() if isinstance(v, Tensor) else v) for k, v in g.items()} for g in state["param_groups"]
    ]
    return tensors, {"scalars": scalars, "param_groups": groups}


def load_optimizer_state(
    optimizer: Optimizer, tensors: Mapping[str, Tensor], plain: Mapping[str, Any]
) -> None:
    """Inverse of ``optimizer_state``."""
    state: dict[int, dict[str, Any]] = {}
    for source in (tensors, plain["scalars"]):
        for key, value in source.items():
            index, name = key.split(".", 1)
            state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": plain["param_groups"]})


def save_checkpoint(
    directory: Path, tensors: Mapping[str, Mapping[str, Tensor]], state: dict[str, Any]
) -> None:
    """Write a checkpoint: the tensor file first, then the ``last.json`` pointer."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    previous = _current(directory)
    number = 0 if previous is None else int(previous.stem.split("-")[1]) + 1
    target = directory / f"state-{number:06d}.safetensors"
    flat = _flat(tensors)
    atomic_write(target, lambda tmp: save_file(flat, str(tmp)))
    write_json(directory / "last.json", {**state, "tensors": target.name})
    for old in directory.glob("state-*.safetensors"):
        if old != target:
            old.unlink(missing_ok=True)


def _current(directory: Path) -> Path | None:
    pointer = directory / "last.json"
    if not pointer.is_file():
        return None
    try:
        name = str(json.loads(pointer.read_text(encoding="utf-8"))["tensors"])
    except (json.JSONDecodeError, KeyError):
        return None
    return directory / name


def load_checkpoint(directory: Path) -> tuple[dict[str, dict[str, Tensor]], dict[str, Any]]:
    """The last checkpoint in ``directory``: tensors by group, and the JSON state."""
    from safetensors.torch import load_file

    pointer = directory / "last.json"
    if not pointer.is_file():
        fail("resume", "a run directory with a checkpoint (checkpoints/last.json)", str(directory.parent))
    try:
        state = json.loads(pointer.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        fail(str(pointer), "a checkpoint written by regdial", Described(f"unreadable JSON ({error})"))
    tensor_file = directory / state["tensors"]
    if not tensor_file.is_file():
        fail(str(pointer), "a checkpoint whose tensor file exists", Described(f"missing {tensor_file.name}"))
    grouped: dict[str, dict[str, Tensor]] = {}
    for key, tensor in load_file(str(tensor_file)).items():
        group, name = key.split("/", 1)
        grouped.setdefault(group, {})[name] = tensor
    return grouped, state
