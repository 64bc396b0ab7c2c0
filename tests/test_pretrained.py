"""The fine-tuning task: pre-trained weights made once and cached, and L2-SP anchored on them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from regdial import Regularization, fit
from regdial.training.pretrained import cache_directory, pretrained_weights, start_model
from regdial.training.tasks import load_task


@pytest.mark.slow
def test_pretrained_weights_are_made_once_then_read_from_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REGDIAL_CACHE", str(tmp_path))
    first = pretrained_weights("digits-transfer", "cnn")
    cached = list((tmp_path / "pretrained").glob("*.safetensors"))
    assert len(cached) == 1 and cache_directory() == tmp_path
    again = pretrained_weights("digits-transfer", "cnn")
    assert all(torch.equal(first[k], again[k]) for k in first)
    cached[0].write_bytes(b"damaged")
    remade = pretrained_weights("digits-transfer", "cnn")  # a damaged cache file is made again
    assert all(torch.equal(first[k], remade[k]) for k in first)


def test_the_pretrained_model_knows_the_source_and_l2sp_holds_it() -> None:
    data = load_task("digits-transfer")
    model = start_model("digits-transfer", "cnn", data, None, seed=0)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        accuracy = float((model.eval()(data.x_test).argmax(1) == data.y_test).float().mean())
    assert accuracy > 0.5  # pre-trained on the clean digits: far above chance on the shifted ones already
    history = fit("digits-transfer", Regularization(l2sp=1e6), epochs=2, progress=False, model=model)
    moved = max(float((model.state_dict()[k] - weights[k]).abs().max()) for k in weights if "weight" in k)
    assert moved < 1e-3  # an overwhelming L2-SP keeps the weights on the pre-trained ones
    assert history.meta["summary"]["final"]["test_accuracy"] > 0.5


def test_every_trial_of_a_search_starts_from_the_pretrained_weights() -> None:
    from regdial.dial.objective import FitObjective

    model = FitObjective(task="digits-transfer").build_model()
    weights = pretrained_weights("digits-transfer", "cnn")
    assert all(torch.equal(model.state_dict()[k], weights[k]) for k in weights)
