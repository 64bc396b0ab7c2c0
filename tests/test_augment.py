"""Augmentation presets: identity at strength 0 and in eval mode, and what strength 1 does."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from regdial.blocks.augment import (
    EmbeddingNoise,
    ImageAugment,
    SignalAugment,
    TabularAugment,
    TokenAugment,
    augmentation,
)
from regdial.schedules import Linear

CASES = [
    (lambda s: ImageAugment(s), lambda: torch.rand(6, 3, 16, 16)),
    (lambda s: ImageAugment(s, flip=False), lambda: torch.rand(6, 1, 8, 8)),
    (lambda s: SignalAugment(s), lambda: torch.randn(6, 2, 100)),
    (lambda s: SignalAugment(s), lambda: torch.randn(6, 100)),
    (lambda s: TabularAugment(s), lambda: torch.randn(32, 5)),
    (lambda s: TokenAugment(s, vocab_size=50, mask_id=1, pad_id=0), lambda: torch.randint(2, 50, (6, 40))),
    (lambda s: EmbeddingNoise(s), lambda: torch.randn(6, 10, 16)),
]


@pytest.mark.parametrize(("make", "batch"), CASES)
def test_strength_zero_and_eval_mode_are_the_identity(make, batch) -> None:
    x = batch()
    assert make(0.0).train()(x) is x
    assert make(1.0).eval()(x) is x


@pytest.mark.parametrize(("make", "batch"), CASES)
def test_strength_one_changes_the_batch_but_not_its_shape(make, batch) -> None:
    torch.manual_seed(0)
    x = batch()
    out = make(1.0).train()(x)
    assert out.shape == x.shape
    assert out.dtype == x.dtype
    assert not torch.equal(out, x)


def test_image_augment_caches_one_pipeline_per_shape() -> None:
    augment = ImageAugment(0.5).train()
    augment(torch.rand(2, 3, 16, 16))
    augment(torch.rand(2, 3, 16, 16))
    augment(torch.rand(2, 1, 8, 8))
    assert len(augment._pipelines) == 2


def test_token_augment_leaves_padding_and_hits_the_rates() -> None:
    torch.manual_seed(0)
    x = torch.randint(2, 1000, (200, 200))
    x[:, -20:] = 0
    out = TokenAugment(1.0, vocab_size=1000, mask_id=1, pad_id=0, dropout=0.1, replace=0.2).train()(x)
    assert bool((out[:, -20:] == 0).all())
    body, original = out[:, :-20], x[:, :-20]
    masked = (body == 1).float().mean().item()
    assert masked == pytest.approx(0.1, abs=0.005)
    changed = (body != original).float().mean().item()
    assert changed == pytest.approx(0.1 + 0.2 * (1 - 1 / 998), abs=0.006)


def test_embedding_noise_scale_and_hook() -> None:
    torch.manual_seed(0)
    noise = EmbeddingNoise(1.0, max_alpha=10.0)
    x = torch.zeros(4, 25, 16)
    out = noise.train()(x)
    bound = 10.0 / math.sqrt(25 * 16)
    assert out.abs().max().item() <= bound
    assert out.abs().max().item() > 0.9 * bound
    embedding = nn.Embedding(10, 16)
    handle = noise.attach(embedding)
    ids = torch.tensor([[1, 2, 3]])
    assert not torch.equal(embedding(ids), embedding.weight[ids])
    embedding.eval()
    assert torch.equal(embedding(ids), embedding.weight[ids])
    handle.remove()
    embedding.train()
    assert torch.equal(embedding(ids), embedding.weight[ids])


def test_tabular_noise_is_scaled_per_feature() -> None:
    torch.manual_seed(0)
    x = torch.zeros(50_000, 3)
    std = torch.tensor([[1.0, 10.0, 0.1]])
    out = TabularAugment(1.0, noise=0.1, feature_dropout=0.0, feature_std=std).train()(x)
    torch.testing.assert_close(out.std(dim=0), 0.1 * std[0], rtol=0.02, atol=0)


def test_scheduled_strength() -> None:
    augment = SignalAugment(Linear(0.0, 1.0)).train()
    x = torch.randn(4, 50)
    assert augment(x) is x  # progress 0: strength 0
    augment.set_progress(0.5)
    assert augment.current_strength == 0.5
    assert not torch.equal(augment(x), x)


def test_same_seed_same_numbers() -> None:
    x = torch.randn(8, 2, 64)
    outputs = []
    for _ in range(2):
        torch.manual_seed(3)
        outputs.append(SignalAugment(0.7).train()(x))
    assert torch.equal(outputs[0], outputs[1])


def test_factory() -> None:
    assert isinstance(augmentation("signal", 0.3), SignalAugment)
    assert isinstance(augmentation("tokens", 0.3, vocab_size=10), TokenAugment)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (
            lambda: augmentation("audio"),
            r"^augment kind must be one of 'image', 'signal', 'tabular', 'tokens', 'embeddings', got 'audio'$",
        ),
        (lambda: SignalAugment(1.5), r"^SignalAugment.strength must be in \[0, 1\], got 1.5$"),
        (
            lambda: ImageAugment(0.5).train()(torch.rand(3, 8, 8)),
            r"^x must be a 4-D batch for ImageAugment, got shape \(3, 8, 8\)$",
        ),
        (
            lambda: TokenAugment(0.5, vocab_size=0),
            r"^TokenAugment.vocab_size must be an integer in \[1, inf\), got 0$",
        ),
        (
            lambda: TokenAugment(0.5, vocab_size=5).train()(torch.rand(2, 3)),
            r"^x must be integer token ids, got dtype torch.float32$",
        ),
    ],
)
def test_bad_values(make, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make()
