"""Resume state: the loop's own state saves itself and comes back field by field; a damaged
part of a checkpoint is named in one line; a bug while restoring keeps its own type."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from regdial import Regularization, fit
from regdial._io import DamagedFileError
from regdial.training.loop_state import LoopState

SETTING = Regularization(l1=0.001, dropout=0.1)


def run_fit(run_dir: Path, **kwargs: Any) -> Any:
    return fit("wine", SETTING, epochs=2, run_dir=run_dir, progress=False, **kwargs)


# -- LoopState ---------------------------------------------------------------------------


def test_loop_state_round_trips_through_json() -> None:
    state = LoopState(epoch=3, batch=2, step=17, running={"loss": 1.25, "seen": 64.0}, status="stopped early",
                      settings={1: {"l1": 0.1}, 3: {"l1": 0.2, "dropout": 0.1}})  # fmt: skip
    saved = json.loads(json.dumps(state.state_dict()))  # what last.json holds
    assert saved["settings"] == {"1": {"l1": 0.1}, "3": {"l1": 0.2, "dropout": 0.1}}
    back = LoopState()
    back.load_state_dict(saved)
    assert back == state


@pytest.mark.parametrize(
    ("saved", "resumed"),
    [("running", "running"), ("interrupted", "running"), ("diverged", "running"), ("completed", "completed"),
     ("stopped early", "stopped early"), ("pruned", "pruned")],
)  # fmt: skip
def test_an_interrupted_loop_runs_on_and_a_finished_one_stays_finished(saved: str, resumed: str) -> None:
    state = LoopState(epoch=2, status=saved).state_dict()
    back = LoopState()
    back.load_state_dict(state)
    assert back.status == resumed and back.epoch == 2


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("step", "three", r"loop\.step: not an integer"),
        ("epoch", 2.0, r"loop\.epoch: not an integer"),
        ("batch", True, r"loop\.batch: not an integer"),
        ("batch", -1, r"loop\.batch: -1, below 0"),
        ("running", [1.0, 2.0], r"loop\.running: not a table \(a list\)"),
        ("running", {"loss": "x", "seen": 1.0}, r"loop\.running\.loss: not a number"),
        ("running", {"loss": 1.0}, r"loop\.running\.seen: missing"),
        ("status", "sleeping", r"loop\.status: 'sleeping', not one of running"),
        ("settings", {"one": {}}, r"loop\.settings\.one: not an epoch number"),
        ("settings", {"1": 0.5}, r"loop\.settings\.1: not a table"),
        ("epoch", None, r"loop\.epoch: not an integer"),
    ],
)
def test_a_damaged_loop_field_is_named(field: str, value: object, message: str) -> None:
    state = LoopState(epoch=1, settings={1: {}}).state_dict()
    state[field] = value
    loop = LoopState()
    with pytest.raises(DamagedFileError, match=message):
        loop.load_state_dict(state)
    assert loop == LoopState()  # nothing half-loaded


def test_a_missing_loop_field_is_named() -> None:
    state = LoopState().state_dict()
    del state["step"]
    with pytest.raises(DamagedFileError, match=r"loop\.step: missing"):
        LoopState().load_state_dict(state)


# -- a checkpoint on disk, one part damaged -------------------------------------------------


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    run_fit(run_dir)
    return run_dir


@pytest.fixture
def copy(finished: Path, tmp_path: Path) -> Path:
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    return run_dir


def edit_state(run_dir: Path, change: Callable[[dict[str, Any]], None]) -> None:
    path = run_dir / "checkpoints" / "last.json"
    document = json.loads(path.read_text())
    change(document["state"])
    path.write_text(json.dumps(document))


def _set(*keys: str, value: object) -> Callable[[dict[str, Any]], None]:
    def change(state: dict[str, Any]) -> None:
        for key in keys[:-1]:
            state = state[key]
        state[keys[-1]] = value

    return change


def _drop_one_weight(state: dict[str, Any]) -> None:
    state["model"].pop(sorted(state["model"])[0])


def _rename_one_weight(state: dict[str, Any]) -> None:
    name = sorted(state["model"])[0]
    state["model"]["renamed.weight"] = state["model"].pop(name)


DAMAGED_PARTS = [
    pytest.param(_set("loop", "step", value="three"), r"got loop\.step: not an integer", id="loop.step"),
    pytest.param(_set("loop", "running", value=None), r"got loop\.running: not a table \(a NoneType\)", id="loop.running"),
    pytest.param(_set("loop", "rng", "cpu", value=[1, 2, 3]), r"got loop\.rng\.cpu: not a tensor", id="loop.rng.cpu"),
    pytest.param(_set("loop", "rng", value={}), r"got loop\.rng: no CPU random state", id="loop.rng"),
    pytest.param(_set("model", value="weights"), r"got model: not a table \(a str\)", id="model not a table"),
    pytest.param(_drop_one_weight, r"\(the model config\.toml describes\), got model: Missing key\(s\) in state_dict: ", id="model missing a weight"),
    pytest.param(_rename_one_weight, r"got model: Missing key\(s\) in state_dict: ", id="model renamed weight"),
    pytest.param(_set("optimizer", "param_groups", value=[]), r"got optimizer: loaded state dict has a different number", id="optimizer groups"),
    pytest.param(_set("applied", "progress", value="half"), r"got applied: could not convert string to float", id="applied.progress"),
    pytest.param(_set("applied", "setting", value={"l1": -1}), r"got applied: regularization\.l1", id="applied.setting"),
    pytest.param(lambda state: state["applied"].pop("setting"), r"got applied: no 'setting'", id="applied no setting"),
    pytest.param(_set("best", "wait", value=[2]), r"got best: ", id="best.wait"),
    pytest.param(lambda state: state["best"].pop("epoch"), r"got best: no 'epoch'", id="best no epoch"),
    pytest.param(_set("history", value=[]), r"must be a history written by regdial", id="history"),
    pytest.param(lambda state: state.pop("model"), r"got model: missing", id="no model"),
]  # fmt: skip


@pytest.mark.parametrize(("damage", "message"), DAMAGED_PARTS)
def test_a_damaged_part_of_a_checkpoint_is_named_in_one_line(
    copy: Path, damage: Callable[[dict[str, Any]], None], message: str
) -> None:
    edit_state(copy, damage)
    with pytest.raises(DamagedFileError, match=message) as raised:
        run_fit(copy, resume=True)
    text = str(raised.value)
    assert "\n" not in text and len(text) < 520
    assert text.startswith(f"{copy / 'checkpoints' / 'last.json'} must be a checkpoint of this run") or (
        "history" in message
    )


def test_an_undamaged_checkpoint_resumes(copy: Path) -> None:
    history = run_fit(copy, resume=True)
    assert history.meta["status"] == "completed" and len(history) == 2


# -- a bug is a bug --------------------------------------------------------------------------


def _raise(error: BaseException) -> Callable[..., None]:
    def load(*args: object, **kwargs: object) -> None:
        raise error

    return load


@pytest.mark.parametrize(
    ("target", "error"),
    [
        (
            "regdial.applied.Applied.load_state_dict",
            AttributeError("'Applied' object has no attribute 'emaa'"),
        ),
        ("regdial.blocks.stopping.EarlyStopping.load_state_dict", IndexError("list index out of range")),
        ("regdial.training.loop_state.LoopState.load_state_dict", AttributeError("a bug in the loop state")),
        ("regdial.training.resume.set_rng_state", ZeroDivisionError("a bug in the random state")),
        ("regdial.training.history.History.from_dict", RuntimeError("a bug in the history")),
    ],
)
def test_a_bug_while_restoring_keeps_its_own_type(
    copy: Path, monkeypatch: pytest.MonkeyPatch, target: str, error: Exception
) -> None:
    monkeypatch.setattr(target, _raise(error))
    with pytest.raises(type(error), match=str(error)) as raised:
        run_fit(copy, resume=True)
    assert not isinstance(raised.value, DamagedFileError)
