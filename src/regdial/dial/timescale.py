"""The task's time scale: how long a moderately regularized model keeps improving.

Regularized models learn more slowly and end better (early epochs rank settings
backwards, see ``docs/ARCHITECTURE.md``), so a trial length fixed in advance cuts exactly
the trials that would win. Before it spends the budget, a search whose length is the
dial's to choose trains the practitioner's recipe (``recipe``: AdamW-style decay 0.05,
dropout 0.1, label smoothing 0.1, augmentation 0.5, input noise 0.1, drop path 0.1, an
EMA of 0.99, NEFTune alpha 5: those of its knobs the space searches) for the task's usual
length, a whole cosine schedule, and while it is still improving at its end (its best
epoch in the last fifth) continues that run from its checkpoint to twice the length, up to
a cap of eight times the usual length (``Search._probe``): one run, whose length doubles
while it pays. A run stopped by patience under a long schedule would read the plateau of
its high learning rate, not the gain of annealing, as the end. From its validation curve:

- ``epochs``, a trial's length: 1.25 times the epoch the probe validated best at, at least
  the task's usual length and at most the cap;
- ``patience``, early stopping's inside trials, from the curve's own noise: the epochs the
  late slope of the curve needs to climb three times its epoch-to-epoch noise
  (``3 * noise / slope``: a best-so-far is itself a high draw of the noise), between a
  quarter and a half of ``epochs`` (at least 5). A noisy curve (a small validation split)
  waits longer; a clean, steep one stops sooner;
- ``seconds_per_epoch``, so the budget can be said in minutes on this machine.

Hyperband and ASHA (Li et al. 2018), freeze-thaw BO (Swersky et al. 2014) and DyHPO
(Wistuba et al. 2022) exist because learning curves cross; this is their cheapest form: one
curve, of the setting practitioners start from, sets how long every trial may run.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass
from typing import Any

from regdial.dial.space import Space
from regdial.setting import Regularization
from regdial.training.history import History, higher_is_better

__all__ = [
    "RECIPE",
    "TimeScale",
    "improving_at_end",
    "noise_and_slope",
    "patience_for",
    "recipe",
    "recipe_params",
]

RECIPE: dict[str, float] = {
    "weight_decay": 0.05,  # AdamW's decay in DeiT and ConvNeXt (Touvron et al. 2021; Liu et al. 2022)
    "dropout": 0.1,  # the transformer default (Vaswani et al. 2017; BERT)
    "drop_path": 0.1,  # DeiT-S's stochastic depth (Touvron et al. 2021)
    "label_smoothing": 0.1,  # Szegedy et al. 2016 (Inception v3)
    "augment": 0.5,  # half strength of regdial's preset for the kind of data
    "noise": 0.1,  # input noise at a tenth of the standardized inputs' scale
    "embedding_noise": 5.0,  # NEFTune's alpha for instruction fine-tuning (Jain et al. 2023)
    "ema": 0.99,  # a weight average for evaluation (Polyak & Juditsky 1992), short runs' decay
}
"""The settings the best practitioners start from, by knob, with where each comes from."""


def recipe(space: Space) -> Regularization:
    """The practitioner's recipe for ``space``: ``RECIPE``'s value of each knob it
    searches, kept inside its range; a knob the recipe does not cover at its weakest (off
    when its range is optional, else the range's low end: the same setting the recipe's
    trial takes, since a trial's value lies inside its range)."""
    values = {}
    for name, r in space.knobs.items():
        if name in RECIPE:
            values[name] = min(max(RECIPE[name], r.low), r.high)
        else:
            values[name] = 0.0 if r.optional else r.low
    return space.setting(values)


def recipe_params(space: Space) -> dict[str, Any]:
    """``recipe(space)`` as the Optuna parameters of a trial of ``space`` (to enqueue it)."""
    setting = recipe(space)
    params: dict[str, Any] = {}
    for name, r in space.knobs.items():
        value = float(getattr(setting, name) or 0.0)
        if r.optional:
            params[f"{name}_on"] = value > 0.0
            if value <= 0.0:
                continue
        params[name] = min(max(value, r.low), r.high)
    return params


@dataclass(frozen=True)
class TimeScale:
    """What the probe read from its curve (see the module docstring)."""

    epochs: int
    patience: int
    seconds_per_epoch: float
    best_epoch: int
    probe_epochs: int
    noise: float
    slope: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def read(cls, history: History, metric: str, *, reference: int, cap: int) -> TimeScale:
        """The time scale of the probe's ``history`` (its ``metric`` per epoch)."""
        values = [
            float(row[metric]) for row in history.rows if math.isfinite(float(row.get(metric, math.nan)))
        ]
        sign = 1.0 if higher_is_better(metric) else -1.0
        scores = [sign * v for v in values]  # higher is better from here on
        best_epoch = 1 + max(range(len(scores)), key=lambda i: (scores[i], -i)) if scores else 1
        epochs = min(cap, max(reference, math.ceil(1.25 * best_epoch)))
        noise, slope = noise_and_slope(scores[:best_epoch])
        seconds = [float(row.get("seconds", 0.0)) for row in history.rows]
        return cls(
            epochs=epochs, patience=patience_for(noise, slope, epochs),
            seconds_per_epoch=statistics.fmean(seconds) if seconds else 0.0, best_epoch=best_epoch,
            probe_epochs=len(history.rows), noise=noise, slope=slope,
        )  # fmt: skip


def improving_at_end(history: History, metric: str, length: int) -> bool:
    """Whether a run of ``length`` epochs ran them all and validated best in their last fifth."""
    rows = [r for r in history.rows if math.isfinite(float(r.get(metric, math.nan)))]
    if len(history.rows) < length or not rows:
        return False
    pick = max if higher_is_better(metric) else min
    best = int(pick(rows, key=lambda r: (float(r[metric]), r["epoch"]))["epoch"])
    return best > length - max(1, math.ceil(0.2 * length))


def noise_and_slope(scores: list[float]) -> tuple[float, float]:
    """The epoch-to-epoch noise of a curve and its late slope, both per epoch.

    The noise is the spread of each epoch's score around the median of its five-epoch
    neighbourhood (a robust 1.4826 * MAD); the slope is the median's rise per epoch over
    the second half of ``scores`` (to the last epoch with a whole neighbourhood). (0, 0)
    for fewer than 6 epochs.
    """
    if len(scores) < 6:
        return 0.0, 0.0
    smooth = [statistics.median(scores[max(0, i - 2) : i + 3]) for i in range(len(scores))]
    residuals = [s - m for s, m in zip(scores, smooth, strict=True)]
    center = statistics.median(residuals)
    noise = 1.4826 * statistics.median(abs(r - center) for r in residuals)
    half, last = len(smooth) // 2, len(smooth) - 3  # the last epoch with a whole neighbourhood
    slope = (smooth[last] - smooth[half]) / (last - half) if last > half else 0.0
    return noise, max(slope, 0.0)


def patience_for(noise: float, slope: float, epochs: int) -> int:
    """Early stopping's patience for trials of ``epochs``: ``3 * noise / slope`` epochs,
    the time the curve needs to climb out of its own noise, between ``max(5, epochs/2)``
    and ``max(5, epochs)`` (the module docstring says why not less)."""
    low, high = max(5, epochs // 2), max(5, epochs)
    if slope <= 0.0:
        return high if noise > 0.0 else low
    return int(min(high, max(low, math.ceil(3.0 * noise / slope))))
