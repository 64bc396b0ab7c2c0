"""Where a run trains and in what precision; the random state of every device it uses.

``resolve_device("auto")`` picks CUDA, then Apple's MPS, then the CPU, and logs which.
``Precision`` decides the autocast dtype: ``auto`` is bf16 on a CUDA device that supports
it and fp32 elsewhere; ``fp16`` adds a gradient scaler (its range is too narrow for raw
gradients). Weights stay fp32 either way; autocast runs the matmuls and convolutions in
the lower precision.

Exact resume needs the random state of every generator a run draws from: the CPU's and,
on CUDA, the device's (dropout masks and augmentation draw there). ``rng_state`` and
``set_rng_state`` carry both; ``deterministic`` asks torch for deterministic kernels
(``torch.use_deterministic_algorithms``), which on CUDA costs speed (some kernels have no
deterministic version and fall back to slower ones, and cuBLAS needs a fixed workspace).
"""

from __future__ import annotations

import logging
import os
import re
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from regdial._checks import Described, fail

__all__ = [
    "Precision",
    "check_device_name",
    "resolve_device",
    "rng_state",
    "set_rng_state",
    "use_deterministic",
]

logger = logging.getLogger(__name__)

_NAME = re.compile(r"auto|mps|(cpu|cuda)(:\d{1,3})?")
"""``cpu:N`` is the CPU (torch ignores the index): a stand-in that lets a device list
(``tune --devices``) be tried on a machine without GPUs."""


def check_device_name(field: str, name: object) -> str:
    """``name`` if it names a device regdial can train on (available or not)."""
    if isinstance(name, torch.device):
        name = str(name)
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        fail(field, "one of auto, cpu, cuda, cuda:N, mps", name)
    return name


def resolve_device(name: str | torch.device = "auto", field: str = "device") -> torch.device:
    """The device to train on; ``auto`` is CUDA, then MPS, then the CPU. A device that is
    not available here is a one-line error saying so."""
    name = check_device_name(field, name)
    if name == "auto":
        if torch.cuda.is_available():
            chosen = torch.device("cuda", torch.cuda.current_device())
        elif _mps_available():
            chosen = torch.device("mps")
        else:
            chosen = torch.device("cpu")
        logger.info("device auto: training on %s", chosen)
        return chosen
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            fail(field, "a device available here", Described(f"{name!r} (torch sees no CUDA device)"))
        count = torch.cuda.device_count()
        index: int | None = device.index
        if index is not None and index >= count:
            fail(field, f"a CUDA device index below {count}", name)
        device = torch.device("cuda", torch.cuda.current_device() if index is None else index)
    if device.type == "mps" and not _mps_available():
        fail(field, "a device available here", Described(f"{name!r} (torch sees no MPS device)"))
    return device


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


@dataclass(frozen=True)
class Precision:
    """The autocast dtype (None: plain fp32) and whether gradients need a scaler."""

    name: str
    dtype: torch.dtype | None
    device: torch.device

    @classmethod
    def choose(cls, precision: str, device: torch.device, field: str = "precision") -> Precision:
        if precision == "auto":
            if device.type == "cuda" and torch.cuda.is_bf16_supported():
                return cls("bf16", torch.bfloat16, device)
            return cls("fp32", None, device)
        if precision == "fp32":
            return cls("fp32", None, device)
        if precision == "bf16":
            if device.type == "cuda" and not torch.cuda.is_bf16_supported():
                fail(field, "fp16 or fp32 on this GPU (it has no bf16)", precision)
            return cls("bf16", torch.bfloat16, device)
        if precision == "fp16":
            if device.type == "cpu":
                fail(field, "bf16 or fp32 on the CPU (fp16 autocast needs a GPU)", precision)
            return cls("fp16", torch.float16, device)
        fail(field, "one of 'auto', 'fp32', 'bf16', 'fp16'", precision)

    def autocast(self) -> AbstractContextManager[Any]:
        """The context the forward pass and loss run in."""
        if self.dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def scaler(self) -> torch.amp.GradScaler | None:
        """A gradient scaler for fp16 (None otherwise)."""
        if self.dtype is not torch.float16:
            return None
        return torch.amp.GradScaler(self.device.type)


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """The random state of the CPU and, on CUDA, of ``device``."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    """Put back what ``rng_state`` saved (the CUDA part only on a CUDA device)."""
    torch.set_rng_state(state["cpu"].to("cpu", torch.uint8))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].to("cpu", torch.uint8), device)


def use_deterministic(enabled: bool) -> None:
    """Ask torch for deterministic kernels (and cuBLAS for a fixed workspace)."""
    if not enabled:
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
