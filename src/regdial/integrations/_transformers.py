"""What the Hugging Face callback reads of transformers' own conventions: which models the
Trainer's label smoother shifts the labels of, the Trainer's batch form, the evaluations of
an ``eval_dataset`` dict, and what a search trial set in the ``TrainingArguments``."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from regdial._checks import Described, fail
from regdial.setting import Regularization

__all__ = ["labelled", "one_dataset", "shifts_labels", "trial_setting"]

logger = logging.getLogger(__name__)


def shifts_labels(model: nn.Module) -> bool | None:
    """Whether transformers' Trainer shifts the labels when it smooths this model's loss:
    its class is in ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`` (a peft model is asked of its base,
    as the Trainer does). None for a model that is not transformers'."""
    from transformers import PreTrainedModel
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    get_base = getattr(model, "get_base_model", None)
    base = get_base() if callable(get_base) else model
    if not isinstance(base, PreTrainedModel):
        return None
    if getattr(base.config, "is_encoder_decoder", False):
        return False  # seq2seq: the decoder's inputs are already shifted right
    return type(base).__name__ in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()  # what _get_name() returns


def labelled(batch: Any) -> tuple[dict[str, Any], Tensor]:
    """A Trainer batch (a dict with ``labels``) as the model's keyword arguments and its labels."""
    if not hasattr(batch, "keys") or "labels" not in batch:
        fail(
            "online_data",
            "batches of the Trainer's form (dicts with labels)",
            Described(type(batch).__name__),
        )
    return {k: v for k, v in batch.items() if k != "labels"}, batch["labels"]


def one_dataset(named: dict[str, float], chosen: str | None) -> tuple[dict[str, float] | None, str | None]:
    """An evaluation's metrics (``val_`` names) as one row of the record, and the dataset it
    reads. With an ``eval_dataset`` dict the Trainer evaluates each dataset in turn, its
    metrics named ``eval_<name>_loss``: the first dataset's are the record's (early
    stopping's, the online controller's), named without the prefix; another dataset's give
    None. Said once."""
    if "val_loss" in named:
        return named, chosen
    found = next((m.group(1) for k in named if (m := re.fullmatch(r"val_(\w+?)_loss", k))), None)
    if found is None:
        return named, chosen  # no loss at all: the session says what is missing
    if chosen is None:
        chosen = found
        logger.warning("regdial: eval_dataset holds several datasets: the record, early stopping and the online "
                       "controller read the first, %r (eval_%s_loss)", found, found)  # fmt: skip
    if found != chosen:
        return None, chosen
    prefix = f"val_{chosen}_"
    return {("val_" + k[len(prefix) :] if k.startswith(prefix) else k): v for k, v in named.items()}, chosen


def trial_setting(setting: Regularization, built: Mapping[str, Any], args: Any) -> Regularization:
    """The setting for this run: the callback's, with what a search trial set in the
    TrainingArguments that the Trainer read only when it was built (``built``: their values then)."""
    for field, knob in (
        ("label_smoothing_factor", "label_smoothing"),
        ("neftune_noise_alpha", "embedding_noise"),
    ):
        was, now = built.get(field), getattr(args, field, None)
        if now == was or (not now and not was):
            continue
        if was:
            fail(f"TrainingArguments.{field}", f"{was} in every trial, as when the Trainer was built (it reads "
                 "it once); build it with 0 for the callback to apply each trial's", now)  # fmt: skip
        if getattr(setting, knob):
            fail(f"regularization.{knob}", f"0 when a search trial sets TrainingArguments.{field}",
                 getattr(setting, knob))  # fmt: skip
        setting = setting.replace(**{knob: float(now or 0.0)})
    return setting
