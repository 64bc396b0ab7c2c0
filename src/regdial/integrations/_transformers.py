"""What the Hugging Face callback reads of transformers' own conventions: which models the
Trainer's label smoother shifts the labels of, and the Trainer's batch form."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from regdial._checks import Described, fail

__all__ = ["labelled", "shifts_labels"]


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
