"""Device choice, precision, random state and one trial per device, on the CPU.

CUDA and MPS are stood in for by patching what torch reports (is_available, device
counts, bf16 support): the choices regdial makes from those answers are what is tested.
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from regdial import Regularization, Space, fit, tune
from regdial.training.devices import Precision, check_device_name, resolve_device, rng_state, set_rng_state


@pytest.fixture
def fake_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)


@pytest.mark.parametrize("name", ["cpu", "cuda", "cuda:1", "mps", "auto", "cpu:3"])
def test_device_names_regdial_trains_on(name: str) -> None:
    assert check_device_name("device", name) == name


@pytest.mark.parametrize("name", ["gpu", "cuda:", "cuda:x", "CUDA", "", "cuda:0,cuda:1", 0, None])
def test_other_device_names_are_one_line_errors(name: object) -> None:
    with pytest.raises(
        ValueError, match=r"^device must be one of auto, cpu, cuda, cuda:N, mps, got "
    ) as error:
        check_device_name("device", name)
    assert "\n" not in str(error.value)


def test_auto_picks_cuda_then_mps_then_cpu(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with caplog.at_level("INFO", logger="regdial.training.devices"):
        assert resolve_device("auto") == torch.device("cpu")
    assert "device auto: training on cpu" in caplog.text  # it says which
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert resolve_device("auto") == torch.device("cuda", 1)


@pytest.mark.usefixtures("fake_cuda")
def test_cuda_indices_are_checked_against_the_devices_present() -> None:
    assert resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ValueError, match=r"^device must be a CUDA device index below 2, got 'cuda:2'$"):
        resolve_device("cuda:2")


def test_a_device_not_here_is_a_one_line_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(
        ValueError, match=r"^device must be a device available here, got 'cuda' \(torch sees no CUDA"
    ):
        resolve_device("cuda")
    with pytest.raises(ValueError, match=r"torch sees no MPS device"):
        resolve_device("mps")


def test_precision_defaults_to_bf16_where_the_gpu_has_it(monkeypatch: pytest.MonkeyPatch) -> None:
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert Precision.choose("auto", cuda).name == "bf16"
    assert Precision.choose("auto", cpu).name == "fp32"  # the CPU: plain fp32 unless asked
    assert Precision.choose("bf16", cpu).dtype is torch.bfloat16
    fp16 = Precision.choose("fp16", cuda)
    with warnings.catch_warnings():  # "CUDA is not available": the scaler is made, not used
        warnings.simplefilter("ignore", UserWarning)
        scaler = fp16.scaler()
    assert fp16.dtype is torch.float16 and isinstance(scaler, torch.amp.GradScaler)  # fp16 needs a scaler
    assert Precision.choose("bf16", cuda).scaler() is None and Precision.choose("fp32", cuda).scaler() is None
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert Precision.choose("auto", cuda).name == "fp32"
    with pytest.raises(
        ValueError, match=r"^precision must be fp16 or fp32 on this GPU \(it has no bf16\), got 'bf16'$"
    ):
        Precision.choose("bf16", cuda)
    with pytest.raises(ValueError, match=r"^precision must be bf16 or fp32 on the CPU"):
        Precision.choose("fp16", cpu)
    with pytest.raises(
        ValueError, match=r"^precision must be one of 'auto', 'fp32', 'bf16', 'fp16', got 'fp8'$"
    ):
        Precision.choose("fp8", cpu)


def test_bf16_autocast_trains_the_matmuls_in_bf16_and_keeps_fp32_weights() -> None:
    torch.manual_seed(0)
    x, y = torch.randn(64, 6), torch.randint(0, 3, (64,))
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    seen: list[torch.dtype] = []
    model[0].register_forward_hook(lambda m, i, out: seen.append(out.dtype) if m.training else None)
    history = fit(model, Regularization(weight_decay=0.01), train=loader, val=loader, num_classes=3, epochs=2,
                  precision="bf16", progress=False)  # fmt: skip
    assert set(seen) == {torch.bfloat16}
    assert all(p.dtype is torch.float32 for p in model.parameters())
    assert history.meta["precision"] == "bf16" and history.meta["device"] == "cpu"
    assert all(torch.isfinite(torch.tensor(row["train_loss"])) for row in history.rows)


def test_random_state_carries_cuda_when_on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    saved: dict[str, object] = {}
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: torch.arange(4, dtype=torch.uint8))
    monkeypatch.setattr(
        torch.cuda, "set_rng_state", lambda state, device: saved.update(state=state, device=device)
    )
    cuda = torch.device("cuda", 1)
    state = rng_state(cuda)
    assert set(state) == {"cpu", "cuda"} and set(rng_state(torch.device("cpu"))) == {"cpu"}
    before = torch.rand(3)
    set_rng_state(state, cuda)
    assert torch.equal(torch.rand(3), before)  # the CPU part back
    assert torch.equal(saved["state"], torch.arange(4, dtype=torch.uint8)) and saved["device"] == cuda


def _cli(*arguments: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "regdial", *arguments], cwd=cwd, capture_output=True, text=True,
                          timeout=120, check=False)  # fmt: skip


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the answer on a machine without CUDA")
def test_cli_device_and_precision_flags(tmp_path: Path) -> None:
    gone = _cli("run", "--task", "wine", "--device", "cuda", "--out", "x", cwd=tmp_path)
    assert gone.returncode == 2 and gone.stdout.count("\n") + gone.stderr.count("\n") == 1
    assert "device must be a device available here, got 'cuda' (torch sees no CUDA device)" in gone.stderr
    fp16 = _cli("run", "--task", "wine", "--precision", "fp16", "--out", "y", cwd=tmp_path)
    assert fp16.returncode == 2 and "precision must be bf16 or fp32 on the CPU" in fp16.stderr
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()  # refused before writing
    done = _cli("run", "--task", "wine", "--epochs", "2", "--precision", "bf16", "--deterministic", "--out", "z",
                "--quiet", cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr
    config = (tmp_path / "z" / "config.toml").read_text()
    assert 'precision = "bf16"' in config and "deterministic = true" in config
    summary = json.loads((tmp_path / "z" / "summary.json").read_text())
    assert summary["device"] == "cpu" and summary["precision"] == "bf16"


@pytest.mark.slow
def test_one_worker_per_device_and_each_trial_on_its_workers_device(tmp_path: Path) -> None:
    import optuna

    result = tune("wine", Space({"weight_decay": (1e-4, 1e-1)}), epochs=4, budget="6 trials", strategy="random",
                  devices=["cpu:0", "cpu:1"], run_dir=tmp_path, retrain=False, report=False)  # fmt: skip
    study = optuna.load_study(study_name=None, storage=f"sqlite:///{tmp_path / 'study.db'}")
    trials = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len(trials) >= 6
    device_of: dict[int, str] = {}
    for trial in trials:
        worker, device = trial.user_attrs["worker"], trial.user_attrs["device"]
        assert device_of.setdefault(worker, device) == device  # a worker keeps its device
    assert sorted(device_of.values()) == ["cpu:0", "cpu:1"]  # two workers, one device each
    # trials.csv says where each trained (a trial past the budget fails before training: no device)
    ran = [row for row in result.trials if row["state"] == "complete"]
    assert {row["device"] for row in ran} == {"cpu:0", "cpu:1"}
    assert all(row["device"] is None for row in result.trials if row["state"] == "fail")
    with pytest.raises(
        ValueError, match=r"^tune\.workers must be 2, one per device \(cpu:0, cpu:1\), got 3$"
    ):
        tune("wine", devices=["cpu:0", "cpu:1"], workers=3, budget="1 trials")
