"""What ``regdial.integrations.huggingface.hp_space`` returns: regdial's ranges as the
search space of Hugging Face's ``Trainer.hyperparameter_search``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from regdial._checks import Described, fail
from regdial.dial.space import Space
from regdial.setting import Regularization

__all__ = ["BUILT_ARGUMENTS", "TRAINING_ARGUMENTS", "suggester"]

BUILT_ARGUMENTS = ("label_smoothing_factor", "neftune_noise_alpha")
"""The TrainingArguments that the Trainer reads only when it is built (its label smoother, NEFTune)."""

TRAINING_ARGUMENTS = {"weight_decay": "weight_decay", "label_smoothing": "label_smoothing_factor",
                      "embedding_noise": "neftune_noise_alpha"}  # fmt: skip
"""The knobs that a ``TrainingArguments`` field holds, and that field."""


def suggester(space: Space, setting: Regularization | None) -> Callable[[Any], dict[str, float]]:
    """``hp_space``'s function of an Optuna trial, its knobs checked (see ``hp_space``);
    ``setting`` is the callback's (None: no callback)."""
    if not isinstance(space, Space):
        fail("space", "a regdial.Space", space)
    with_callback = setting is not None
    default, base = Regularization().to_dict(), space.base.to_dict()
    fixed = [f"{k}={v}" for k, v in base.items() if v != default.get(k)]
    if fixed:  # a trial's knobs travel in TrainingArguments, which hold no base
        fail("space.base", "unset for hp_space (the knobs held fixed go in the callback's setting: "
             "HuggingFaceCallback(Regularization(...)))", Described(", ".join(fixed)))  # fmt: skip
    for name in space.knobs:
        if setting is not None and getattr(setting, name):
            fail(f"regularization.{name}", f"0 when hp_space searches it (it would replace each trial's "
                 f"TrainingArguments.{TRAINING_ARGUMENTS.get(name, name)})", getattr(setting, name))  # fmt: skip
        if name not in TRAINING_ARGUMENTS:
            fail(f"tune.space.{name}", "a knob with a TrainingArguments field (" + ", ".join(TRAINING_ARGUMENTS)
                 + "); search the others with regdial.tune(objective)", Described("not one"))  # fmt: skip
        if not with_callback and TRAINING_ARGUMENTS[name] in BUILT_ARGUMENTS:
            fail(f"tune.space.{name}", "searched with the callback, hp_space(space, callback) (the Trainer reads "
                 f"{TRAINING_ARGUMENTS[name]} only when it is built, not at each trial)", Described("no callback"))  # fmt: skip

    def suggest(trial: Any) -> dict[str, float]:
        values: dict[str, float] = {}
        for name, r in space.knobs.items():
            if r.optional and not trial.suggest_categorical(f"{name}_on", [True, False]):
                values[TRAINING_ARGUMENTS[name]] = 0.0
                continue
            values[TRAINING_ARGUMENTS[name]] = trial.suggest_float(name, r.low, r.high, log=r.log)
        return values

    return suggest
