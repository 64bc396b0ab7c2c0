"""The CLI under attack: Hypothesis strategies for flags, configs, data files and damaged runs.

Every invocation runs the ``regdial`` command in this process (``regdial.cli.main``),
with its own temporary directory as the working directory, and is judged by ``check``:
the exit code is 0 (done), 1 (a run diverged), 2 (bad input) or 130 (interrupted), no
traceback is printed, and bad input is exactly one line. ``tests/test_fuzz.py`` runs a
fixed number of examples in the suite; ``benchmarks/fuzz.py`` runs thousands and prints
the counts.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from hypothesis import strategies as st

ALLOWED = {0, 1, 2, 130}

# -- values, valid and not -------------------------------------------------------------------

NUMBERS = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, 1, 2, -1, 0.5, 1e-300, 1e300, 2**32, 2**63, 1.5]),
)
TEXT = st.one_of(
    st.text(max_size=12),
    st.sampled_from(["", " ", "true", "false", "nan", "inf", "-inf", "1e400", "[1, 2]", "{a = 1}", "0x10",
                     "None", "null", "../..", "/dev/null", "a" * 5000, "é", "\x00", "1\n2", "'", '"', "=", "--epochs"]),
)  # fmt: skip
VALUE = st.one_of(NUMBERS.map(str), TEXT)
TOML_VALUE = st.recursive(
    st.one_of(NUMBERS.filter(lambda v: not (isinstance(v, float) and v != v)), st.text(max_size=8), st.booleans()),
    lambda children: st.one_of(st.lists(children, max_size=3), st.dictionaries(st.text(max_size=6), children, max_size=3)),
    max_leaves=6,
)  # fmt: skip


def _options(command: str) -> list[str]:
    """The options of ``regdial COMMAND`` that take a value, read from the command itself, so
    that a flag added to the CLI is fuzzed from the day it exists."""
    import typer

    from regdial.cli.app import app

    params = typer.main.get_command(app).commands[command].params  # type: ignore[attr-defined]
    return [p.opts[0] for p in params if p.param_type_name == "option" and not p.is_flag
            and p.opts[0] not in ("--out", "--resume")]  # fmt: skip


def _switches(command: str) -> list[str]:
    """The on/off switches of ``regdial COMMAND`` (``--baseline``, ``--no-retrain``...)."""
    import typer

    from regdial.cli.app import app

    params = typer.main.get_command(app).commands[command].params  # type: ignore[attr-defined]
    return [o for p in params if p.param_type_name == "option" and p.is_flag
            for o in (*p.opts, *p.secondary_opts) if "quiet" not in o]  # fmt: skip


RUN_FLAGS = _options("run")
TUNE_FLAGS = [flag for flag in _options("tune") if flag not in RUN_FLAGS]
SWITCHES = sorted({*_switches("run"), *_switches("tune")} - {"--retrain"})  # a retrain would train the result
TASKS = ["wine", "breast-cancer", "sparse-regression", "digits-small", "waveforms", "mnist", ""]
SCHEDULES = [
    '{schedule="step", values=1}',
    '{schedule="linear", start="a", end=1}',
    '{schedule="x"}',
    "0.1",
    '{schedule="step", values=["a"]}',
    '{schedule="early", value=0.2, until=2}',
]


def _knobs() -> list[str]:
    """Every key of ``[regularization]`` (from ``Regularization`` itself) and a misspelling."""
    from regdial.setting import Regularization

    return [*Regularization.names(), "schedule"]


def _table_keys(section: str) -> list[str]:
    """The keys a config's ``[run]`` or ``[tune]`` table takes, from their option classes."""
    from regdial.dial.options import TuneOptions
    from regdial.training.options import RunOptions

    if section == "run":
        return sorted(
            {*RunOptions.model_fields, "baseline", "kind", "data", "model", "out", "task", "target"}
        )
    return sorted(TuneOptions.model_fields)


KNOBS = _knobs()
SET_VALUES = ["5", "true", "1.5", '["*.bias"]', "1e300", "1e6", "-0.0", "[]"]


@st.composite
def flag_pairs(draw: st.DrawFn, flags: list[str]) -> list[str]:
    """A few ``--flag value`` pairs, a fast valid task and epoch count unless a flag overrides them."""
    args: list[str] = []
    for flag in draw(st.lists(st.sampled_from(flags), max_size=4)):
        if flag in SWITCHES:
            args.append(flag)
            continue
        if flag == "--task":
            value = draw(st.one_of(st.sampled_from(TASKS), TEXT))
        elif flag == "--set":
            key = draw(st.one_of(st.sampled_from(KNOBS), TEXT))
            value = f"{key}={draw(st.one_of(VALUE, st.sampled_from(SCHEDULES), st.sampled_from(SET_VALUES)))}"
        elif flag == "--strategy":
            value = draw(
                st.one_of(st.sampled_from(["auto", "path", "online", "tpe", "random", "grid"]), TEXT)
            )
        elif flag == "--storage":
            value = draw(
                st.one_of(
                    st.sampled_from(
                        [
                            "sqlite://",
                            "sqlite:///",
                            "sqlite:///:memory:",
                            "sqlite:///file:x?mode=memory",
                            "nosuch://x",
                            "postgresql://u@127.0.0.1:1/d",
                        ]
                    ),
                    TEXT,
                )
            )
        else:
            value = draw(VALUE)
        args += [flag, value]
    return args


@st.composite
def commands(draw: st.DrawFn) -> list[str]:
    """A ``regdial`` command line: run, tune, diagnose, report, tasks, or nothing at all."""
    command = draw(st.sampled_from(["run", "tune", "diagnose", "report", "tasks", "", "--help", "nonsense"]))
    if command == "run":
        args = [
            "run",
            "--task",
            "wine",
            "--epochs",
            "1",
            *draw(flag_pairs(RUN_FLAGS + _switches("run"))),
            "--quiet",
        ]
        if draw(st.booleans()):
            args += ["--out", draw(st.one_of(st.sampled_from(["out", "file.txt/out", "x" * 300]), TEXT))]
        return args
    if command == "tune":
        return ["tune", "--task", "wine", "--epochs", "1", "--budget", "1 trials", "--no-retrain", "--quiet",
                *draw(flag_pairs(RUN_FLAGS[:7] + TUNE_FLAGS + [f for f in _switches("tune") if f != "--retrain"]))]  # fmt: skip
    if command in ("diagnose", "report"):
        return [command, draw(st.one_of(st.sampled_from(["nowhere", "file.txt", "."]), TEXT))]
    return [command] if command else []


@st.composite
def configs(draw: st.DrawFn) -> str:
    """A TOML config: known and unknown sections and keys, any values, or plain garbage."""
    if draw(st.integers(0, 9)) == 0:
        return draw(
            st.sampled_from(["[run\n", "a = [" * 2000, "\x00\x01\x02", "[[run]]\nx=1", "run = 5", "x = 1\n"])
        )
    import tomli_w

    document: dict[str, Any] = {"run": {"task": "wine", "epochs": 1}}
    for section in draw(
        st.lists(st.sampled_from(["run", "model", "regularization", "tune", "extra"]), max_size=3)
    ):
        keys = {"run": _table_keys("run"), "model": ["width", "depth", "hidden", "channels", "batchnorm"],
                "regularization": KNOBS, "tune": _table_keys("tune"), "extra": ["x"]}[section]  # fmt: skip
        table = document.setdefault(section, {})
        for key in draw(
            st.lists(st.one_of(st.sampled_from(keys), st.text(min_size=1, max_size=6)), max_size=3)
        ):
            table[key] = draw(TOML_VALUE)
    if document.get("run", {}).get("epochs") != 1 and isinstance(document.get("run", {}).get("epochs"), int):
        document["run"]["epochs"] = min(abs(document["run"]["epochs"]), 2) or 1  # valid runs stay short
    return tomli_w.dumps(document)


@st.composite
def data_files(draw: st.DrawFn) -> tuple[str, bytes]:
    """A data file's name and bytes: odd shapes, dtypes, values, or damage."""
    kind = draw(
        st.sampled_from(["npz", "npz", "csv", "garbage", "npy-named-npz", "huge-header", "truncated"])
    )
    rng = np.random.default_rng(draw(st.integers(0, 1000)))
    rows = draw(st.sampled_from([0, 1, 5, 12, 40]))
    if kind == "csv":
        header = draw(st.sampled_from(["a,b,target", "target", "a,b", "a,a,target", ""]))
        lines = [header] + [",".join(draw(st.sampled_from(["1", "2.5", "", "x", "nan", "1e999", "0"]))
                                     for _ in range(max(1, header.count(",") + 1))) for _ in range(rows)]  # fmt: skip
        return "data.csv", "\n".join(lines).encode()
    if kind == "garbage":
        return "data.npz", draw(st.binary(max_size=64))
    x = rng.normal(size=(rows, draw(st.sampled_from([0, 1, 3]))))
    y_kind = draw(st.sampled_from(["int", "float", "2d", "nan", "complex", "text", "one-class", "n1"]))
    y = {"int": rng.integers(0, 3, rows), "float": rng.normal(size=rows), "2d": rng.integers(0, 2, (rows, 2)),
         "nan": np.full(rows, np.nan), "complex": rng.normal(size=rows) + 1j, "text": np.array(["a", "b"] * rows)[:rows],
         "one-class": np.zeros(rows, dtype=int), "n1": rng.integers(0, 2, (rows, 1))}[y_kind]  # fmt: skip
    if draw(st.booleans()):
        x = x * draw(st.sampled_from([1e300, 1.0, np.nan]))
    buffer = io.BytesIO()
    if kind == "npy-named-npz":
        np.save(buffer, x)
        return "data.npz", buffer.getvalue()
    if draw(st.integers(0, 5)) == 0:  # an empty (or odd) validation split beside the rows
        np.savez(buffer, x=x, y=y, x_val=x[:0], y_val=y[:0])
    else:
        np.savez(buffer, x=x, y=y)
    payload = buffer.getvalue()
    if kind == "truncated":
        payload = payload[: draw(st.integers(0, max(0, len(payload) - 1)))]
    if kind == "huge-header":
        payload = payload.replace(b"'shape': (", b"'shape': (1000000000000, ", 1)
    return "data.npz", payload


DAMAGES = ["truncate", "garbage", "empty-json", "list-json", "wrong-types", "short-rng", "missing-key", "dir",
           "delete", "nan-weights", "other-model", "symlink", "nan-epoch", "int-keys", "scores-not-tables"]  # fmt: skip
OUTSIDE = "outside.txt"
"""What a ``symlink`` damage points at, beside the run directory: no command may write it."""
FILES = ["checkpoints/last.json", "checkpoints/STATE", "checkpoints/final.safetensors", "checkpoints/best.safetensors",
         "summary.json", "history.json", "history.csv", "config.toml"]  # fmt: skip


def damage(run_dir: Path, target: str, how: str, seed: int) -> None:
    """Damage one file of a run directory in one way."""
    if target == "checkpoints/STATE":
        target = "checkpoints/" + json.loads((run_dir / "checkpoints/last.json").read_text())["tensors"]
    path = run_dir / target
    rng = np.random.default_rng(seed)
    if how == "truncate" and path.is_file():
        data = path.read_bytes()
        path.write_bytes(data[: int(rng.integers(0, max(1, len(data))))])
    elif how == "garbage":
        path.write_bytes(rng.integers(0, 256, int(rng.integers(1, 200))).astype(np.uint8).tobytes())
    elif how == "empty-json":
        path.write_text("{}")
    elif how == "list-json":
        path.write_text("[]")
    elif how == "wrong-types" and path.suffix == ".json":
        document = json.loads(path.read_text())
        if isinstance(document, dict):
            for key in list(document)[:3]:
                document[key] = "oops" if not isinstance(document[key], str) else 5
        path.write_text(json.dumps(document))
    elif how == "short-rng" and path.name == "last.json":
        document = json.loads(path.read_text())
        document["state"]["loop"]["rng"]["cpu"] = [1, 2, 3]
        path.write_text(json.dumps(document))
    elif how == "missing-key" and path.suffix == ".json":
        document = json.loads(path.read_text())
        if isinstance(document, dict) and document:
            document.pop(sorted(document)[int(rng.integers(0, len(document)))])
        path.write_text(json.dumps(document))
    elif how == "dir":
        path.unlink(missing_ok=True)
        path.mkdir(parents=True, exist_ok=True)
    elif how == "delete":
        path.unlink(missing_ok=True)
    elif how == "nan-weights" and path.suffix == ".safetensors":
        from safetensors.torch import load_file, save_file

        tensors = {
            k: v.float().fill_(float("nan")) if v.is_floating_point() else v
            for k, v in load_file(str(path)).items()
        }
        save_file(tensors, str(path))
    elif how == "symlink":  # a file of the run replaced by a link to one outside it
        outside = run_dir.parent / OUTSIDE
        outside.write_text("not regdial's")
        path.unlink(missing_ok=True)
        if path.is_dir():
            shutil.rmtree(path)
        path.symlink_to(outside)
    elif how == "nan-epoch" and path.name == "history.json":
        document = json.loads(path.read_text())
        document["rows"][int(rng.integers(0, len(document["rows"])))]["epoch"] = float("nan")
        path.write_text(json.dumps(document))
    elif how == "int-keys" and path.name == "last.json":
        path.write_text(re.sub(r'("\$int_keys": \{\s*)"\d+"', r'\1"abc"', path.read_text(), count=1))
    elif how == "scores-not-tables" and path.name == "summary.json":
        document = json.loads(path.read_text())
        document[str(rng.choice(["final", "best"]))] = int(rng.integers(-5, 5))
        path.write_text(json.dumps(document))
    elif how == "other-model" and path.name == "config.toml":
        path.write_text(path.read_text() + "\n[model]\nwidth = 7\n")


# -- running and judging ---------------------------------------------------------------------


@dataclass
class Outcome:
    code: int
    out: str
    err: str
    escaped: BaseException | None = None


@contextlib.contextmanager
def working_directory(path: Path) -> Iterator[None]:
    previous = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


def invoke(args: list[str], cwd: Path) -> Outcome:
    """``regdial ARGS`` in this process, its output captured."""
    from regdial.cli import main

    out, err = io.StringIO(), io.StringIO()
    code, escaped = 0, None
    with working_directory(cwd), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(args)
        except SystemExit as done:
            code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
        except BaseException as error:  # anything escaping main is the bug being hunted
            escaped, code = error, -1
    return Outcome(code, out.getvalue(), err.getvalue(), escaped)


def check(outcome: Outcome, args: list[str]) -> None:
    """The promise: an allowed exit code, no traceback, bad input in one line."""
    shown = f"regdial {' '.join(args)[:300]!r} -> {outcome.code}\n{outcome.err[-2000:]}{outcome.out[-500:]}"
    assert outcome.escaped is None, f"{type(outcome.escaped).__name__}: {outcome.escaped}\n{shown}"
    assert outcome.code in ALLOWED, shown
    assert "Traceback" not in outcome.err + outcome.out, shown
    if outcome.code == 2 and "Usage:" not in outcome.err:
        lines = outcome.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("regdial: error: "), shown
        assert len(lines[0]) <= 520, shown


@contextlib.contextmanager
def scratch() -> Iterator[Path]:
    directory = Path(tempfile.mkdtemp(prefix="regdial-fuzz-"))
    (directory / "file.txt").write_text("a file, not a directory\n")
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


TALLY: Counter[str] = Counter()


def record(kind: str, outcome: Outcome) -> None:
    TALLY[f"{kind}: exit {outcome.code}"] += 1
    TALLY["examples"] += 1
