"""The Python API under attack: a bad argument is the one-line ``InputError``, nothing else.

Two parts. The attack of ``benchmarks/api_attack.py`` case by case (bad input refused in
one line naming the real cause, good input as people write it accepted, the user's own
bug kept as theirs and labelled). Then Hypothesis: for each public entry point
(``Regularization``, ``Space``, ``Trial.report``, ``tune`` in its three forms, ``fit``) one
argument replaced by a value drawn from junk (wrong types, out-of-range numbers, NaN,
nested containers); the call either works or raises the one-line ``InputError``. Values are
drawn so that an accepted one trains at most one epoch of a 4-feature model.
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import regdial
from regdial._checks import InputError
from regdial.knobs import KNOBS

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import api_attack

CASES = api_attack.cases()


@pytest.fixture(autouse=True, scope="module")
def _in_a_scratch_directory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Drawn text can be a run_dir: it lands in a scratch directory, not the checkout."""
    with contextlib.chdir(tmp_path_factory.mktemp("api")):
        yield


@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}: {c[2]}" for c in CASES])
def test_the_attack_gets_the_right_answer(case: api_attack.Case) -> None:
    _, expectation, name, call = case
    verdict, text = api_attack.judge(expectation, call, api_attack.WORDS.get(name, ""))
    assert verdict == "right", f"{expectation} input got {verdict}: {text}"


def test_the_users_own_bug_keeps_its_type_and_names_the_trial() -> None:
    def train(setting: regdial.Regularization, trial: regdial.Trial) -> None:
        raise ZeroDivisionError("my bug")

    with pytest.raises(ZeroDivisionError, match="my bug") as caught:
        regdial.tune(train, **api_attack.quick())
    assert any("trial 0" in note and "Regularization(" in note for note in caught.value.__notes__)


JUNK = st.one_of(
    st.integers(min_value=-3, max_value=0),
    st.just(2**70),
    st.floats(max_value=0.0) | st.sampled_from([math.nan, math.inf, -math.inf, 1e300]),
    st.text(max_size=6),
    st.booleans(),
    st.none(),
    st.lists(st.integers(-2, 2), max_size=3),
    st.dictionaries(st.text(max_size=4), st.integers(-2, 2) | st.text(max_size=3), max_size=2),
    st.sampled_from([torch.zeros(2), torch.tensor(float("nan")), object(), b"bytes", (0.1,), (1, "a"), 1j]),
)
SETTINGS = settings(
    max_examples=15, deadline=None, database=None, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)  # fmt: skip

PER_ARGUMENT = settings(SETTINGS, max_examples=5)  # each argument of tune and fit by itself, 5 junk values


def one_line_or_fine(call: Any) -> None:
    """The contract: the call works, or it raises ``InputError`` in one line."""
    error: InputError | None = None
    try:
        with api_attack.quiet():
            call()
    except InputError as refused:
        error = refused
    assert error is None or "\n" not in str(error), str(error)


@SETTINGS
@given(name=st.sampled_from(sorted(KNOBS)), value=JUNK)
def test_regularization(name: str, value: object) -> None:
    one_line_or_fine(lambda: regdial.Regularization(**{name: value}))


@SETTINGS
@given(name=st.sampled_from([*sorted(KNOBS), "bogus"]), value=JUNK, keyword=st.booleans())
def test_space(name: str, value: object, keyword: bool) -> None:
    one_line_or_fine(lambda: regdial.Space(**{name: value}) if keyword else regdial.Space({name: value}))


@SETTINGS
@given(field=st.sampled_from(["epoch", "train_loss", "val_loss", "val_accuracy"]), value=JUNK)
def test_trial_report(field: str, value: object) -> None:
    trial = regdial.Trial(regdial.Regularization(), number=0, metric="val_loss", epochs=3)
    values: dict[str, Any] = {"epoch": 1, "train_loss": 1.0, "val_loss": 1.0} | {field: value}
    epoch = values.pop("epoch")
    one_line_or_fine(lambda: trial.report(epoch, **values))


TUNE_ARGUMENTS = ["space", "num_classes", "kind", "model_options", "loss_fn", "metrics", "metric", "epochs", "lr",
                  "batch_size", "budget", "strategy", "workers", "seed", "run_dir", "grid_points", "base",
                  "progress", "output", "devices", "optimizer", "precision"]  # fmt: skip


@pytest.mark.parametrize("argument", TUNE_ARGUMENTS)
@PER_ARGUMENT
@given(value=JUNK)
def test_tune_an_objective(argument: str, value: object) -> None:
    options = api_attack.quick() | {argument: value}
    one_line_or_fine(lambda: regdial.tune(api_attack.objective_returning(0.5), **options))


@pytest.mark.parametrize("argument", TUNE_ARGUMENTS)
@PER_ARGUMENT
@given(value=JUNK)
def test_tune_a_model_factory(argument: str, value: object) -> None:
    one_line_or_fine(lambda: api_attack.tune_own(**{argument: value}))


@SETTINGS
@given(task=JUNK | st.sampled_from(["wine-x", "mine.npz", "mine.csv", "a:b", ""]))
def test_tune_a_task(task: object) -> None:
    one_line_or_fine(lambda: regdial.tune(task, **api_attack.quick()))


FIT_ARGUMENTS = ["model", "model_options", "num_classes", "kind", "epochs", "batch_size", "optimizer", "lr",
                 "lr_schedule", "momentum", "seed", "loss_fn", "metrics", "metric", "monitor", "restore_best",
                 "batch_to_inputs", "output", "run_dir", "progress", "checkpoint_seconds", "train_eval_size",
                 "augment_options", "initial_weights", "on_epoch", "controller", "device", "precision"]  # fmt: skip


@pytest.mark.parametrize("argument", FIT_ARGUMENTS)
@PER_ARGUMENT
@given(value=JUNK)
def test_fit(argument: str, value: object) -> None:
    one_line_or_fine(lambda: api_attack.fit_own(**{argument: value}))
