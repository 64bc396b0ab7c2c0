"""Built-in models: sizes from the data, dropout and drop path to turn."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from regdial import Applied, DropPath, Regularization
from regdial.training.models import MODELS, build_model
from regdial.training.tasks import load_task

INPUTS = {"image": "digits-small", "signal": "waveforms", "tabular": "wine"}
FITS = {
    "linear": ["image", "signal", "tabular"],
    "mlp": ["image", "signal", "tabular"],
    "cnn": ["image"],
    "cnn1d": ["signal"],
    "resnet": ["image", "signal", "tabular"],
}


@pytest.mark.parametrize(("name", "kind"), [(n, k) for n, ks in FITS.items() for k in ks])
def test_models_take_their_sizes_from_the_data(name: str, kind: str) -> None:
    data = load_task(INPUTS[kind])
    model = build_model(name, data)
    assert model(data.x_train[:5]).shape == (5, data.outputs)


def test_dropout_and_drop_path_layers_are_there_to_turn() -> None:
    data = load_task("digits-small")
    for name in ("mlp", "cnn", "resnet"):
        model = build_model(name, data)
        assert any(isinstance(m, nn.Dropout) for m in model.modules())
    resnet = build_model("resnet", data, {"depth": 3})
    assert sum(isinstance(m, DropPath) for m in resnet.modules()) == 3
    Applied(Regularization(drop_path=0.2), resnet, lambda g: torch.optim.SGD(g, lr=0.1), num_classes=10)
    assert [m.p for m in resnet.modules() if isinstance(m, DropPath)] == pytest.approx([0.0, 0.1, 0.2])


def test_same_seed_same_initial_weights() -> None:
    data = load_task("wine")
    a, b = build_model("mlp", data, seed=3), build_model("mlp", data, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))


def test_batchnorm_option() -> None:
    model = build_model("mlp", load_task("wine"), {"batchnorm": True, "depth": 3, "width": 16})
    assert sum(isinstance(m, nn.BatchNorm1d) for m in model.modules()) == 3


@pytest.mark.parametrize(
    ("name", "task", "options", "message"),
    [
        (
            "cnn",
            "wine",
            {},
            r"^model must be a model for tabular inputs, not 'cnn' \(for image\), got 'cnn'$",
        ),
        (
            "mlp",
            "wine",
            {"heads": 4},
            r"^model.heads must be an option of mlp \(depth, width, batchnorm\), got an unknown option$",
        ),
        ("mlp", "wine", {"width": 0}, r"^model.width must be an integer in \[1, 65536\], got 0$"),
        ("vit", "wine", {}, r"^model must be one of 'linear', 'mlp', 'cnn', 'cnn1d', 'resnet', got 'vit'$"),
    ],
)
def test_bad_models(name: str, task: str, options, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_model(name, load_task(task), options)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_registered_model_builds_where_it_fits_and_refuses_elsewhere(name: str) -> None:
    for kind, task in INPUTS.items():
        data = load_task(task)
        if kind in FITS.get(name, []):
            assert build_model(name, data)(data.x_train[:2]).shape == (2, data.outputs)
        else:
            with pytest.raises(ValueError, match=rf"^model must be a model for {kind} inputs, not {name!r}"):
                build_model(name, data)
