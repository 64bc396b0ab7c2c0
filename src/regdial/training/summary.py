"""The end of a run in numbers: ``summary.json``, and the weight statistics of each epoch.

The summary says how the run ended and why, scores the final weights (and the best
epoch's, when they were kept) on the validation and test splits, and, where the data
knows its true support (``sparse-regression``), how well the features the model kept
match it. The best epoch's validation scores are its history row: the same weights,
not evaluated again.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from regdial.training.loop import Run

__all__ = ["selected_features", "summary", "support_scores", "weights_stats"]


def scored(run: Run, model: nn.Module, splits: tuple[str, ...]) -> dict[str, float]:
    """``model``'s scores on each of ``splits`` the run has, as ``{split}_{score}``."""
    scores: dict[str, float] = {}
    for name in splits:
        found = run.scores(model, name)
        for key, value in (found or {}).items():
            if key != "count":
                scores[f"{name}_{key}"] = value
    return scores


def summary(run: Run) -> dict[str, Any]:
    """What ``summary.json`` holds: the run's end, its scores, the best epoch and its setting."""
    best_epoch = run.best.best_epoch
    said: dict[str, Any] = {
        "task": run.history.meta.get("task"), "kind": run.history.kind, "status": run.loop.status,
        "reason": run.reason, "epochs_run": run.loop.epoch, "epochs": run.options.epochs, "best_epoch": best_epoch,
        "metric": run.metric, "monitor": run.monitor, "setting": run.setting.to_dict(),
        "device": str(run.device), "precision": run.precision.name,
        "seconds": sum(row.get("seconds", 0.0) for row in run.history.rows),
    }  # fmt: skip
    if "kept" in run.history.meta:
        said["kept"] = run.history.meta["kept"]
    if run.loop.status in ("diverged", "interrupted") or not run.history.rows:
        return said
    model = run.applied.eval_model
    said["final"] = scored(run, model, ("val", "test"))
    if run.best.best_state is not None and best_epoch is not None:
        row = next(r for r in run.history.rows if r["epoch"] == best_epoch)
        current = {k: v.detach().clone() for k, v in model.state_dict().items()}
        model.load_state_dict(run.best.best_state)
        said["best"] = {k: v for k, v in row.items() if k.startswith("val_")} | scored(run, model, ("test",))
        model.load_state_dict(current)
    if best_epoch in run.loop.settings:
        said["best_setting"] = run.loop.settings[best_epoch]
    support = run.source.true_support
    if support is not None:
        said["support"] = support_scores(selected_features(model), support)
    return said


def weights_stats(model: nn.Module, weights: list[Tensor], net: nn.Module) -> tuple[float, float]:
    """L2 norm and share of exact zeros of the regularized weights, measured on ``model``
    (the evaluated one: the EMA average when it is on, whose tensors mirror ``net``'s)."""
    if not weights:
        return 0.0, 0.0
    if model is not net:
        by_id = {id(p): name for name, p in net.named_parameters()}
        evaluated = dict(model.named_parameters())
        weights = [evaluated[by_id[id(w)]] for w in weights if by_id.get(id(w)) in evaluated]
    with torch.no_grad():
        squares = sum(float(w.detach().float().square().sum()) for w in weights)
        zeros = sum(int((w == 0).sum()) for w in weights)
        count = sum(w.numel() for w in weights)
    return math.sqrt(squares), zeros / max(count, 1)


def selected_features(model: nn.Module) -> list[int]:
    """Input features whose first-layer weights are not all exactly zero."""
    first = next((m for m in model.modules() if isinstance(m, nn.Linear)), None)
    if first is None:
        return []
    return [int(i) for i in torch.nonzero(first.weight.detach().abs().sum(dim=0)).flatten()]


def support_scores(selected: list[int], truth: tuple[int, ...]) -> dict[str, Any]:
    """How well the kept input features match the true support: precision, recall, F1."""
    chosen, actual = set(selected), set(truth)
    hits = len(chosen & actual)
    precision = hits / len(chosen) if chosen else 0.0
    recall = hits / len(actual) if actual else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "selected": len(chosen), "true": len(actual), "precision": precision, "recall": recall, "f1": f1,
        "features": sorted(chosen),
    }  # fmt: skip
