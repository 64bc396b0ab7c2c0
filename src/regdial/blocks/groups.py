"""Which parameters get weight decay: ``param_groups`` for any torch optimizer.

Decay (and any penalty attached with ``attach_prox``) is meant for the weights that
multiply inputs. By default it spares:

- biases: they shift, not scale, and shrinking them only moves the activations;
- every parameter of a normalization layer (BatchNorm*, LayerNorm, GroupNorm,
  InstanceNorm*, RMSNorm, and any module whose class name ends in "Norm", such as
  Hugging Face's ``LlamaRMSNorm``): decaying a norm's gain fights the normalization;
- embeddings (``nn.Embedding``, ``nn.EmbeddingBag``): rows of rare tokens get few
  gradient updates, so decay erases them (the reasoning behind nanoGPT's and BERT's
  choices);
- whatever a timm-style model lists in its ``no_weight_decay()`` method.

``exclude`` and ``include`` are ``fnmatch`` patterns over parameter names that move
parameters either way; ``exclude`` is applied last, so it wins over ``include``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from fnmatch import fnmatchcase
from typing import Any

from torch import Tensor, nn

from regdial._checks import Described, check_range, fail
from regdial._tensors import tensor_list

__all__ = ["is_normalization", "no_decay_reason", "param_groups", "transposed_ids", "transposed_weights"]

logger = logging.getLogger(__name__)

_NORMS: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,  # BatchNorm*, InstanceNorm*, SyncBatchNorm
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    nn.RMSNorm,
)
_EMBEDDINGS: tuple[type[nn.Module], ...] = (nn.Embedding, nn.EmbeddingBag)


def is_normalization(module: nn.Module) -> bool:
    """True for torch's normalization layers and any class whose name ends in "Norm"."""
    return isinstance(module, _NORMS) or type(module).__name__.endswith("Norm")


def no_decay_reason(module: nn.Module, param_name: str) -> str | None:
    """Why a module's own parameter gets no decay by default, or None if it does."""
    if is_normalization(module):
        return "normalization"
    if isinstance(module, _EMBEDDINGS):
        return "embedding"
    if param_name == "bias":
        return "bias"
    return None


def transposed_weights(model: nn.Module) -> list[Tensor]:
    """The weights stored ``(in, out)``, transposed from ``nn.Linear``'s ``(out, in)``:
    transformers' ``Conv1D`` (GPT-2, GPT-1), recognized by its class name and its ``nf``
    (output features) attribute, so that transformers need not be imported. A unit's
    incoming weights are a column of these: ``max_norm`` and group lasso's ``"rows"``
    take their slices along dim 1 (``MaxNorm(transposed=)``, ``GroupLasso(transposed=)``)."""
    found: list[Tensor] = []
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if (
            type(module).__name__ == "Conv1D"
            and isinstance(weight, Tensor)
            and weight.dim() == 2
            and getattr(module, "nf", None) == weight.shape[1]
        ):
            found.append(weight)
    return found


def transposed_ids(weights: Iterable[Tensor], field: str) -> frozenset[int]:
    """The ids of the 2-D tensors among ``weights`` (checked as ``field``; none is fine):
    what ``MaxNorm``, ``GroupLasso`` and ``attach_prox`` look a weight up in."""
    given = list(weights)
    return frozenset(id(t) for t in (tensor_list(given, field) if given else []) if t.dim() == 2)


def _check_patterns(field: str, patterns: object) -> tuple[str, ...]:
    if isinstance(patterns, str):
        patterns = (patterns,)
    if not isinstance(patterns, Iterable) or not all(isinstance(p, str) for p in patterns):
        fail(field, "a sequence of fnmatch patterns over parameter names", patterns)
    return tuple(patterns)


def param_groups(
    model: nn.Module,
    weight_decay: float,
    *,
    exclude: Iterable[str] = (),
    include: Iterable[str] = (),
) -> list[dict[str, Any]]:
    """Split ``model``'s trainable parameters into a decayed and an undecayed group.

    Returns a plain list for any torch optimizer::

        [{"params": [...], "weight_decay": weight_decay, "regularize": True},
         {"params": [...], "weight_decay": 0.0, "regularize": False}]

    ``"regularize"`` tells ``attach_prox`` which group its penalties apply to; torch
    optimizers keep extra keys and ignore them. Empty groups are left out. A parameter
    shared by several modules (tied embeddings) appears once; frozen parameters
    (``requires_grad=False``) are left out. A pattern that matches no parameter is an
    error, since a typo there would silently change nothing.
    """
    if not isinstance(model, nn.Module):
        fail("model", "an nn.Module", model)
    weight_decay = check_range("weight_decay", weight_decay, low=0.0)
    excludes = _check_patterns("exclude", exclude)
    includes = _check_patterns("include", include)
    no_weight_decay = getattr(model, "no_weight_decay", None)
    listed: set[str] = set(no_weight_decay()) if callable(no_weight_decay) else set()

    decay: list[Tensor] = []
    spared: list[Tensor] = []
    seen: set[int] = set()
    used: set[str] = set()
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            if id(param) in seen or not param.requires_grad:
                continue
            seen.add(id(param))
            name = f"{module_name}.{param_name}" if module_name else param_name
            decayed = no_decay_reason(module, param_name) is None and name not in listed
            for pattern in includes:
                if fnmatchcase(name, pattern):
                    decayed = True
                    used.add(f"include:{pattern}")
            for pattern in excludes:
                if fnmatchcase(name, pattern):
                    decayed = False
                    used.add(f"exclude:{pattern}")
            (decay if decayed else spared).append(param)

    for kind, patterns in (("include", includes), ("exclude", excludes)):
        for pattern in patterns:
            if f"{kind}:{pattern}" not in used:
                fail(
                    kind,
                    "patterns that match a parameter name",
                    Described(f"{pattern!r}, which matches none"),
                )
    if not decay and not spared:
        fail("model", "a module with trainable parameters", type(model).__name__)

    def count(ps: list[Tensor]) -> int:
        return sum(p.numel() for p in ps)

    logger.info(
        "param_groups: weight_decay=%g on %d tensors (%d parameters); none on %d tensors (%d parameters)",
        weight_decay,
        len(decay),
        count(decay),
        len(spared),
        count(spared),
    )
    groups: list[dict[str, Any]] = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay, "regularize": True})
    if spared:
        groups.append({"params": spared, "weight_decay": 0.0, "regularize": False})
    return groups
