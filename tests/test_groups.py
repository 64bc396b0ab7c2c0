"""param_groups: which parameters get weight decay."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from regdial import param_groups


class LlamaRMSNorm(nn.Module):  # a user norm, recognized by its class name
    def __init__(self, size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.conv = nn.Conv1d(8, 8, 3)
        self.bn = nn.BatchNorm1d(8)
        self.ln = nn.LayerNorm(8)
        self.gn = nn.GroupNorm(2, 8)
        self.inorm = nn.InstanceNorm1d(8, affine=True)
        self.rms = nn.RMSNorm(8)
        self.custom = LlamaRMSNorm(8)
        self.fc = nn.Linear(8, 10)
        self.fc.weight = self.embed.weight  # tied: must appear once
        self.frozen = nn.Linear(8, 8)
        self.frozen.requires_grad_(False)


def names_in(groups, model: nn.Module) -> list[set[str]]:
    by_id = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), name)
    return [{by_id[id(p)] for p in g["params"]} for g in groups]


def test_default_decays_only_weights_that_multiply_inputs() -> None:
    model = Net()
    groups = param_groups(model, 0.05)
    decay, spared = names_in(groups, model)
    assert decay == {"conv.weight"}
    assert spared == {
        "embed.weight",  # also fc.weight, tied: listed once under its first name
        "conv.bias",
        "bn.weight",
        "bn.bias",
        "ln.weight",
        "ln.bias",
        "gn.weight",
        "gn.bias",
        "inorm.weight",
        "inorm.bias",
        "rms.weight",
        "custom.weight",
        "fc.bias",
    }
    assert groups[0]["weight_decay"] == 0.05 and groups[0]["regularize"] is True
    assert groups[1]["weight_decay"] == 0.0 and groups[1]["regularize"] is False
    all_params = [p for g in groups for p in g["params"]]
    assert len(all_params) == len({id(p) for p in all_params})
    torch.optim.AdamW(groups, lr=1e-3)  # a plain list any optimizer takes


def test_patterns_move_parameters_and_exclude_wins() -> None:
    model = Net()
    groups = param_groups(model, 0.1, include=["*norm*.weight", "ln.*"], exclude=["conv.*", "ln.bias"])
    decay, spared = names_in(groups, model)
    assert decay == {"ln.weight", "inorm.weight"}
    assert {"conv.weight", "conv.bias", "ln.bias"} <= spared


def test_timm_no_weight_decay_is_honoured() -> None:
    class ViTish(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pos_embed = nn.Parameter(torch.zeros(1, 4, 8))
            self.proj = nn.Linear(8, 8)

        def no_weight_decay(self) -> set[str]:
            return {"pos_embed"}

    model = ViTish()
    decay, spared = names_in(param_groups(model, 0.1), model)
    assert decay == {"proj.weight"} and spared == {"pos_embed", "proj.bias"}


def test_empty_groups_are_left_out() -> None:
    groups = param_groups(nn.Linear(3, 3, bias=False), 0.1)
    assert len(groups) == 1 and groups[0]["regularize"] is True


def test_logs_the_split(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="regdial"):
        param_groups(nn.Linear(4, 3), 0.01)
    assert "weight_decay=0.01 on 1 tensors (12 parameters); none on 1 tensors (3 parameters)" in caplog.text


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"weight_decay": -1.0}, r"^weight_decay must be in \[0, inf\), got -1.0$"),
        (
            {"weight_decay": 0.1, "exclude": ["head.*"]},
            r"^exclude must be patterns that match a parameter name, got 'head.\*', which matches none$",
        ),
        ({"weight_decay": 0.1, "include": [3]}, r"^include must be a sequence of fnmatch patterns"),
    ],
)
def test_bad_arguments(kwargs, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        param_groups(nn.Linear(2, 2), **kwargs)


def test_model_without_trainable_parameters() -> None:
    with pytest.raises(ValueError, match=r"^model must be a module with trainable parameters, got 'ReLU'$"):
        param_groups(nn.ReLU(), 0.1)
