"""Noise layers: rates, expectations, identities, and the dropout dials."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from regdial.blocks.noise import (
    DropBlock1d,
    DropBlock2d,
    DropConnect,
    DropPath,
    GaussianDropout,
    GaussianNoise,
    drop_block,
    drop_path,
    drop_path_rates,
    set_drop_path,
    set_dropout,
)
from regdial.schedules import Early


def test_drop_path_drops_whole_samples_at_rate_p() -> None:
    torch.manual_seed(0)
    x = torch.ones(20_000, 4, 3)
    out = drop_path(x, 0.3, training=True)
    per_sample = out.flatten(1)
    dropped = (per_sample == 0).all(dim=1)
    kept = (per_sample == 1 / 0.7).all(dim=1)
    assert bool((dropped | kept).all())  # each sample is all dropped or all kept
    assert abs(dropped.float().mean().item() - 0.3) < 0.015  # 4.6 standard errors
    assert abs(out.mean().item() - 1.0) < 0.03  # the expectation is kept


def test_drop_path_without_scaling_keeps_survivors_as_they_are() -> None:
    torch.manual_seed(0)
    out = drop_path(torch.ones(100, 2), 0.5, training=True, scale_by_keep=False)
    assert set(out.unique().tolist()) == {0.0, 1.0}


LAYERS = [
    lambda: DropPath(0.4),
    lambda: DropBlock2d(0.3, block_size=3),
    lambda: GaussianNoise(0.5),
    lambda: GaussianDropout(0.3),
]


@pytest.mark.parametrize("make", LAYERS)
def test_eval_mode_is_the_identity(make) -> None:
    layer = make().eval()
    x = torch.randn(4, 3, 8, 8)
    assert layer(x) is x


@pytest.mark.parametrize(
    "layer", [DropPath(0.0), DropBlock2d(0.0), GaussianNoise(0.0), GaussianDropout(0.0), DropBlock1d(0.0)]
)
def test_rate_zero_is_the_identity(layer: nn.Module) -> None:
    x = torch.randn(4, 3, 8) if isinstance(layer, DropBlock1d) else torch.randn(4, 3, 8, 8)
    assert layer.train()(x) is x


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_masks_follow_the_input_dtype(dtype: torch.dtype) -> None:
    x = torch.randn(8, 3, 16, 16, dtype=dtype)
    for layer in (DropPath(0.5), DropBlock2d(0.2, block_size=3), GaussianDropout(0.2), GaussianNoise(0.1)):
        assert layer.train()(x).dtype == dtype


def test_same_seed_same_numbers() -> None:
    x = torch.randn(16, 4, 12, 12)
    outputs = []
    for _ in range(2):
        torch.manual_seed(7)
        outputs.append(DropBlock2d(0.2, block_size=3).train()(x) + DropPath(0.3).train()(x))
    assert torch.equal(outputs[0], outputs[1])


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("rate", [1.0, 1.5, -0.1])
def test_drop_path_refuses_a_rate_outside_zero_to_one_as_the_module_does(rate: float, training: bool) -> None:
    # At rate 1 the survivors' scale 1/(1 - p) divides by zero (timm guards keep_prob > 0).
    with pytest.raises(ValueError, match=rf"^drop_path\.p must be in \[0, 1\), got {rate}$"):
        drop_path(torch.ones(4, 2), rate, training=training)
    with pytest.raises(ValueError, match=r"^DropPath\.p must be in \[0, 1\)"):
        DropPath(rate)


def test_drop_path_rates_rise_linearly() -> None:
    assert drop_path_rates(5, 0.2) == pytest.approx([0.0, 0.05, 0.1, 0.15, 0.2])
    assert drop_path_rates(1, 0.1) == [0.1]


@pytest.mark.parametrize(("p", "block_size"), [(0.1, 5), (0.2, 3), (0.05, 7)])
def test_drop_block_dropped_fraction_matches_the_rate(p: float, block_size: int) -> None:
    torch.manual_seed(0)
    x = torch.ones(64, 16, 32, 32)
    out = drop_block(x, p, block_size, training=True, scale_by_keep=False)
    fraction = (out == 0).float().mean().item()
    # The paper's gamma ignores overlapping blocks, which lowers the fraction slightly.
    assert p * 0.85 < fraction < p * 1.05


def test_drop_block_drops_contiguous_blocks() -> None:
    torch.manual_seed(1)
    out = drop_block(torch.ones(256, 1, 24, 24), 0.02, 5, training=True, scale_by_keep=False)
    single = [m for m in out[:, 0] if int((m == 0).sum()) == 25]
    assert len(single) > 20
    for feature_map in single:
        rows, cols = torch.nonzero(feature_map == 0, as_tuple=True)
        assert (rows.max() - rows.min() + 1, cols.max() - cols.min() + 1) == (5, 5)


def test_drop_block_scaling_keeps_the_mean() -> None:
    torch.manual_seed(0)
    out = drop_block(torch.ones(32, 8, 16, 16), 0.2, 3, training=True)
    assert out.mean().item() == pytest.approx(1.0, rel=1e-5)


def test_drop_block_1d_fraction() -> None:
    torch.manual_seed(0)
    out = DropBlock1d(0.15, block_size=5).train()
    out.scale_by_keep = False
    fraction = (out(torch.ones(128, 8, 200)) == 0).float().mean().item()
    assert 0.15 * 0.85 < fraction < 0.15 * 1.05


def test_drop_connect_drops_weights_not_activations() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(200, 100)
    layer = DropConnect(linear, p=0.4).train()
    effective = (layer(torch.eye(200)) - linear.bias).T  # rows of W' = W * mask / 0.6
    zeros = effective == 0
    assert abs(zeros.float().mean().item() - 0.4) < 0.02
    torch.testing.assert_close(effective[~zeros], (linear.weight / 0.6)[~zeros])
    layer.eval()
    x = torch.randn(3, 200)
    assert torch.equal(layer(x), linear(x))


def test_drop_connect_wraps_convolutions() -> None:
    conv = nn.Conv2d(3, 4, 3)
    layer = DropConnect(conv, p=0.5).train()
    assert layer(torch.randn(2, 3, 8, 8)).shape == (2, 4, 6, 6)


def test_gaussian_noise_and_dropout_moments() -> None:
    torch.manual_seed(0)
    x = torch.full((200_000,), 2.0)
    noisy = GaussianNoise(0.5).train()(x)
    assert noisy.mean().item() == pytest.approx(2.0, abs=0.01)
    assert noisy.std().item() == pytest.approx(0.5, rel=0.01)
    dropped = GaussianDropout(0.2).train()(x)
    assert dropped.mean().item() == pytest.approx(2.0, abs=0.01)
    assert dropped.var().item() == pytest.approx(4.0 * 0.2 / 0.8, rel=0.02)  # x^2 * p/(1 - p)


class HFAttention(nn.Module):  # shaped like transformers' LlamaAttention
    def __init__(self) -> None:
        super().__init__()
        self.attention_dropout = 0.0
        self.q_proj = nn.Linear(8, 8)


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.1, batch_first=True)
        self.attn = HFAttention()
        self.classifier = nn.Sequential(nn.Dropout(0.1), nn.Linear(8, 2))
        self.blocks = nn.ModuleList([DropPath(0.0) for _ in range(5)])


def test_set_dropout_turns_every_kind_of_dropout() -> None:
    model = Model()
    changed = set_dropout(model, 0.3)
    # TransformerEncoderLayer: 3 nn.Dropout + MultiheadAttention.dropout; HF attention; classifier.
    assert changed == 6
    assert all(m.p == 0.3 for m in model.modules() if isinstance(m, nn.Dropout))
    assert model.encoder.self_attn.dropout == 0.3
    assert model.attn.attention_dropout == 0.3
    assert set_dropout(model, 0.3) == 0  # already there


def test_set_dropout_restricts_to_matching_modules_and_follows_a_schedule() -> None:
    model = Model()
    assert set_dropout(model, Early(0.5, until=0.3), progress=0.1, modules="classifier.*") == 1
    assert model.classifier[0].p == 0.5
    assert model.encoder.dropout.p == 0.1
    set_dropout(model, Early(0.5, until=0.3), progress=0.6, modules="classifier.*")
    assert model.classifier[0].p == 0.0


class TimmDropPath(nn.Module):  # timm's attribute name
    def __init__(self) -> None:
        super().__init__()
        self.drop_prob = 0.0


TimmDropPath.__name__ = "DropPath"


def test_set_drop_path_linear_and_uniform_profiles() -> None:
    model = Model()
    assert set_drop_path(model, 0.2) == 4  # the first block stays at rate 0
    assert [b.p for b in model.blocks] == pytest.approx([0.0, 0.05, 0.1, 0.15, 0.2])
    set_drop_path(model, 0.1, profile="uniform")
    assert [b.p for b in model.blocks] == [0.1] * 5
    timm_like = nn.Sequential(TimmDropPath(), TimmDropPath())
    assert set_drop_path(timm_like, 0.3) == 1
    assert [m.drop_prob for m in timm_like] == [0.0, 0.3]


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: DropPath(1.0), r"^DropPath.p must be in \[0, 1\), got 1.0$"),
        (lambda: DropBlock2d(-0.1), r"^DropBlock2d.p must be in \[0, 1\), got -0.1$"),
        (
            lambda: DropBlock2d(0.1, block_size=0),
            r"^DropBlock2d.block_size must be an integer in \[1, inf\), got 0$",
        ),
        (lambda: GaussianNoise(-1.0), r"^GaussianNoise.std must be in \[0, inf\), got -1.0$"),
        (lambda: GaussianDropout(1.5), r"^GaussianDropout.p must be in \[0, 1\), got 1.5$"),
        (
            lambda: DropConnect(nn.ReLU(), 0.1),
            r"^DropConnect.module must be an nn.Linear or nn.ConvNd, got 'ReLU'$",
        ),
        (lambda: drop_path_rates(0, 0.1), r"^depth must be an integer in \[1, inf\), got 0$"),
        (lambda: set_dropout(Model(), 1.0), r"^dropout must be in \[0, 1\), got 1.0$"),
        (
            lambda: set_drop_path(Model(), 0.1, profile="cubic"),
            r"^profile must be one of 'linear', 'uniform'",
        ),
        (
            lambda: DropBlock2d(0.1).train()(torch.ones(2, 3, 4)),
            r"^x must be a 4-D batch for DropBlock2d, got shape",
        ),
    ],
)
def test_bad_values(make, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make()


def test_extra_repr_shows_the_rate() -> None:
    assert "p=0.2" in repr(DropPath(0.2))
    assert "p=0.1, block_size=5" in repr(DropBlock2d(0.1, 5))
