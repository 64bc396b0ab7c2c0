"""Mixup, CutMix, label smoothing: soft targets that sum to 1 and match torch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from regdial.blocks.mixing import (
    CutMix,
    Mixup,
    MixupOrCutMix,
    smooth_targets,
    soft_cross_entropy,
    soft_targets,
)


@pytest.mark.parametrize("batch", [8, 5, 2])
def test_mixup_mixes_inputs_and_targets_with_the_same_lambda(batch: int) -> None:
    torch.manual_seed(0)
    x = torch.randn(batch, 3, 4)
    y = torch.arange(batch) % 3
    mixer = Mixup(0.4, num_classes=3)
    mixed, targets = mixer(x, y)
    lam = mixer.last_lam
    assert 0.0 < lam < 1.0
    torch.testing.assert_close(mixed, lam * x + (1 - lam) * x.flip(0))
    torch.testing.assert_close(targets.sum(dim=1), torch.ones(batch))
    expected = lam * F.one_hot(y, 3).float() + (1 - lam) * F.one_hot(y.flip(0), 3).float()
    torch.testing.assert_close(targets, expected)
    if batch % 2:  # an odd batch: the middle sample pairs with itself
        middle = batch // 2
        torch.testing.assert_close(mixed[middle], x[middle])


def test_alpha_zero_is_the_identity() -> None:
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 2, 1])
    mixed, targets = Mixup(0.0, num_classes=3)(x, y)
    assert mixed is x
    assert torch.equal(targets, F.one_hot(y, 3).float())


def test_cutmix_pastes_a_box_and_mixes_targets_by_area() -> None:
    torch.manual_seed(3)
    x = torch.stack([torch.full((1, 16, 16), float(i)) for i in range(4)])
    y = torch.tensor([0, 1, 2, 3])
    mixer = CutMix(1.0, num_classes=4)
    mixed, targets = mixer(x, y)
    pasted = (mixed[0] != x[0]).float().mean().item()
    assert 0.0 < pasted < 1.0
    assert mixer.last_lam == pytest.approx(1.0 - pasted)
    torch.testing.assert_close(targets[0], torch.tensor([mixer.last_lam, 0.0, 0.0, 1 - mixer.last_lam]))
    torch.testing.assert_close(targets.sum(dim=1), torch.ones(4))


def test_cutmix_on_sequences() -> None:
    torch.manual_seed(0)
    x = torch.stack([torch.full((2, 50), float(i)) for i in range(3)])
    mixer = CutMix(1.0, num_classes=3)
    mixed, _ = mixer(x, torch.tensor([0, 1, 2]))
    assert mixer.last_lam == pytest.approx(1.0 - (mixed[0] != 0).float().mean().item())


def test_label_smoothing_helper_equals_torch() -> None:
    torch.manual_seed(0)
    logits, y = torch.randn(6, 5), torch.tensor([0, 4, 2, 2, 1, 3])
    ours = soft_cross_entropy(logits, smooth_targets(y, 5, 0.1))
    torch.testing.assert_close(ours, F.cross_entropy(logits, y, label_smoothing=0.1))


def test_soft_cross_entropy_is_the_formula() -> None:
    torch.manual_seed(0)
    logits = torch.randn(4, 3)
    targets = torch.softmax(torch.randn(4, 3), dim=1)
    expected = -(targets * torch.log_softmax(logits, dim=1)).sum(dim=1).mean()
    torch.testing.assert_close(soft_cross_entropy(logits, targets), expected)


def test_smoothing_composes_with_mixup() -> None:
    torch.manual_seed(0)
    x, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    _, mixed = Mixup(0.4, num_classes=3)(x, y)
    logits = torch.randn(6, 3)
    torch.testing.assert_close(
        soft_cross_entropy(logits, mixed, label_smoothing=0.2),
        soft_cross_entropy(logits, smooth_targets(mixed, smoothing=0.2)),
    )


@pytest.mark.parametrize(("switch_prob", "expected"), [(0.0, "mixup"), (1.0, "cutmix")])
def test_switch(switch_prob: float, expected: str) -> None:
    torch.manual_seed(0)
    x = torch.stack([torch.full((1, 8, 8), float(i)) for i in range(4)])
    mixer = MixupOrCutMix(0.4, 1.0, switch_prob=switch_prob, num_classes=4)
    mixed, _ = mixer(x, torch.arange(4))
    values = set(mixed[0].unique().tolist())
    is_cutmix = values <= {0.0, 3.0}
    assert is_cutmix == (expected == "cutmix")


def test_same_seed_same_mix() -> None:
    x, y = torch.randn(8, 1, 8, 8), torch.arange(8) % 2
    results = []
    for _ in range(2):
        torch.manual_seed(5)
        results.append(MixupOrCutMix(0.4, 1.0, num_classes=2)(x, y))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])


def test_float_targets_mix_as_they_are() -> None:
    torch.manual_seed(0)
    mixer = Mixup(0.4)
    _, targets = mixer(torch.randn(4, 2), torch.tensor([1.0, 2.0, 3.0, 4.0]))
    torch.testing.assert_close(
        targets,
        mixer.last_lam * torch.tensor([1.0, 2, 3, 4]) + (1 - mixer.last_lam) * torch.tensor([4.0, 3, 2, 1]),
    )
    soft = torch.tensor([0.5])
    assert soft_targets(soft) is soft


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: Mixup(-0.1), r"^Mixup.alpha must be in \[0, inf\), got -0.1$"),
        (lambda: CutMix(1.0, prob=1.5), r"^CutMix.prob must be in \[0, 1\], got 1.5$"),
        (
            lambda: Mixup(0.2)(torch.randn(2, 3), torch.tensor([0, 1])),
            r"^num_classes must be the number of classes",
        ),
        (
            lambda: Mixup(0.2, num_classes=2)(torch.randn(3, 3), torch.tensor([0, 1])),
            r"^targets must be one per sample \(3\), got 2$",
        ),
        (lambda: smooth_targets(torch.tensor([0]), 2, 1.0), r"^smoothing must be in \[0, 1\), got 1.0$"),
        (
            lambda: CutMix(1.0, num_classes=2)(torch.randn(2, 3), torch.tensor([0, 1])),
            r"^x must be \(N, C, L\) sequences",
        ),
    ],
)
def test_bad_values(make, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make()
