"""Pre-trained weights for fine-tuning tasks, made by regdial and cached.

A built-in task with a ``source`` (``digits-transfer``) fine-tunes a model that was first
trained on its source data, as a user fine-tunes a downloaded checkpoint. Nothing can be
downloaded here, so regdial pre-trains it itself, once: the task's model trains on the
source for ``pretrain_epochs`` epochs (AdamW, lr 1e-3, batches of 32, seed 0: the same
weights on every machine and for every run seed) and the weights are cached as
safetensors in the user's cache directory: ``$REGDIAL_CACHE``, else
``$XDG_CACHE_HOME/regdial``, else ``~/.cache/regdial``. A damaged cache file is made
again; a cache directory that cannot be written leaves the weights in memory only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from regdial._io import DamagedFileError
from regdial.training.checkpoint import load_weights, save_weights
from regdial.training.models import build_model
from regdial.training.tasks import TASKS, Dataset

__all__ = ["VERSION", "cache_directory", "pretrained_weights", "start_model"]

logger = logging.getLogger(__name__)

VERSION = 1
"""Bumped when pre-training changes, so that old cache files are not reused."""


def cache_directory() -> Path:
    """Where regdial caches what it makes once (pre-trained weights)."""
    if os.environ.get("REGDIAL_CACHE"):
        return Path(os.environ["REGDIAL_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "regdial"


def _pretrain(model: nn.Module, source: Dataset, epochs: int) -> None:
    """A plain loop: the weights depend only on the source, the model and seed 0."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        model.train()
        for _ in range(epochs):
            for rows in torch.split(torch.randperm(len(source.x_train)), 32):
                loss = F.cross_entropy(model(source.x_train[rows]), source.y_train[rows])
                optimizer.zero_grad()
                loss.backward()  # type: ignore[no-untyped-call]
                optimizer.step()
    model.eval()


def pretrained_weights(
    task: str, model_name: str, options: Mapping[str, Any] | None = None
) -> dict[str, Tensor]:
    """The task's model pre-trained on its source: from the cache, or trained and cached."""
    spec = TASKS[task]
    if spec.source is None:
        raise LookupError(f"task {task!r} has no source to pre-train on")  # a bug, not bad input
    source = spec.source()
    recipe = json.dumps({"task": task, "model": model_name, "options": dict(options or {}), "version": VERSION,
                         "epochs": spec.pretrain_epochs, "shape": list(source.input_shape)}, sort_keys=True)  # fmt: skip
    path = (
        cache_directory()
        / "pretrained"
        / f"{task}-{model_name}-{hashlib.sha256(recipe.encode()).hexdigest()[:12]}.safetensors"
    )
    if path.is_file():
        try:
            return load_weights(path)
        except DamagedFileError:
            logger.warning("pre-trained weights in %s are damaged: training them again", path)
    model = build_model(model_name, source, dict(options or {}), seed=0)
    logger.info("pre-training %s on %s's source (%d images, %d epochs), once", model_name, task,
                len(source.x_train), spec.pretrain_epochs)  # fmt: skip
    _pretrain(model, source, spec.pretrain_epochs)
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    try:
        save_weights(path, weights)
    except OSError as error:
        logger.warning(
            "cannot cache pre-trained weights in %s (%s): keeping them in memory", path, error.strerror
        )
    return weights


def start_model(
    task: object, model_name: str, data: Dataset, options: Mapping[str, Any] | None, seed: int
) -> nn.Module:
    """The model a run starts from: built for ``data``, and pre-trained if the task fine-tunes."""
    model = build_model(model_name, data, dict(options or {}), seed=seed)
    spec = TASKS.get(task) if isinstance(task, str) else None
    if spec is not None and spec.source is not None:
        model.load_state_dict(pretrained_weights(task, model_name, options))  # type: ignore[arg-type]
    return model
