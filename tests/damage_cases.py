"""The bad inputs and damaged files of issue 10, one case each: files to write, a command
to run, and the one line it must print. ``tests/test_errors.py`` checks them;
``benchmarks/errors_before_after.py`` prints each case's message for two versions.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Case:
    name: str
    args: list[str]
    message: str  # a substring of the one line it prints (exit code 2 unless said)
    files: dict[str, bytes | str] = field(default_factory=dict)
    damage: Callable[[Path], None] | None = None  # applied to a copy of a finished run at ./run
    code: int = 2


def _npz(**arrays: object) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)  # type: ignore[arg-type]
    return buffer.getvalue()


def _claiming(shape: tuple[int, ...]) -> bytes:
    """A .npz whose ``x`` header claims ``shape`` but holds a few bytes."""
    import zipfile

    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f8", "fortran_order": False, "shape": shape})
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("x.npy", header.getvalue() + b"\0" * 64)
        archive.writestr("y.npy", _npy(Y))
    return buffer.getvalue()


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


RNG = np.random.default_rng(0)
X = RNG.normal(size=(60, 4))
Y = RNG.integers(0, 3, 60)


def _state(run: Path) -> Path:
    return run / "checkpoints" / json.loads((run / "checkpoints" / "last.json").read_text())["tensors"]


def _edit_last(change: Callable[[dict], object]) -> Callable[[Path], None]:
    def apply(run: Path) -> None:
        path = run / "checkpoints" / "last.json"
        document = json.loads(path.read_text())
        replaced = change(document)
        path.write_text(json.dumps(document if replaced is None else replaced))

    return apply


def _truncate(name: str) -> Callable[[Path], None]:
    def apply(run: Path) -> None:
        path = _state(run) if name == "STATE" else run / name
        path.write_bytes(path.read_bytes()[:100])

    return apply


def _garbage(name: str) -> Callable[[Path], None]:
    def apply(run: Path) -> None:
        path = _state(run) if name == "STATE" else run / name
        path.write_bytes(bytes(range(256)) * 3)

    return apply


def _directory(name: str) -> Callable[[Path], None]:
    def apply(run: Path) -> None:
        (run / name).unlink()
        (run / name).mkdir()

    return apply


def _nan_weights(run: Path) -> None:
    from safetensors.torch import load_file, save_file

    path = run / "checkpoints" / "final.safetensors"
    save_file({k: v.fill_(float("nan")) for k, v in load_file(str(path)).items()}, str(path))


def _short_rng(document: dict) -> None:
    document["state"]["loop"]["rng"]["cpu"] = [1, 2, 3]


def _no_loop(document: dict) -> None:
    del document["state"]["loop"]


def _wrong_types(document: dict) -> None:
    document["state"]["loop"]["epoch"] = "three"


def _other_model(run: Path) -> None:
    path = run / "config.toml"
    path.write_text(path.read_text() + "\n[model]\nwidth = 7\n")


RUN = ["run", "--task", "wine", "--epochs", "1", "--quiet"]
DATA = ["run", "--data", "d.npz", "--epochs", "1", "--quiet"]
RESUME = ["run", "--resume", "run", "--quiet"]

CASES = [
    # silent corruption, now refused
    Case("2-D y", DATA, "d.npz: y must be one target per sample, shape (n,) or (n, 1), got shape (60, 2)",
         {"d.npz": _npz(x=X, y=RNG.integers(0, 2, (60, 2)))}),
    Case("NaN target", DATA, "d.npz: y must be finite targets, got NaN or inf at row 3",
         {"d.npz": _npz(x=X, y=np.where(np.arange(60) == 3, np.nan, RNG.normal(size=60)))}),
    Case("x * 1e300", DATA, "d.npz: x must be finite numbers in float32, got values beyond float32's range",
         {"d.npz": _npz(x=X * 1e300, y=Y)}),
    Case("complex y", DATA, "d.npz: y must be real numbers or labels, got complex numbers",
         {"d.npz": _npz(x=X, y=Y + 1j)}),
    Case("epochs = true", ["run", "c.toml", "--quiet"], "run.epochs must be an integer in [1, 100000], got True",
         {"c.toml": "[run]\ntask = 'wine'\nepochs = true\n"}),
    Case("seed = 1.0", ["run", "c.toml", "--quiet"], "run.seed must be an integer in [0, 4294967295], got 1.0",
         {"c.toml": "[run]\ntask = 'wine'\nseed = 1.0\n"}),
    Case("baseline = 'yes'", ["run", "c.toml", "--quiet"], "run.baseline must be true or false, got 'yes'",
         {"c.toml": "[run]\ntask = 'wine'\nbaseline = 'yes'\n"}),
    Case("hidden = 0", ["run", "c.toml", "--quiet"], "model.hidden must be an integer in [1, 65536], got 0",
         {"c.toml": "[run]\ntask = 'digits-small'\nepochs = 1\n[model]\nhidden = 0\n"}),
    Case("zero features", DATA, "d.npz: x must be samples with at least one feature, got shape (60, 0)",
         {"d.npz": _npz(x=np.zeros((60, 0)), y=Y)}),
    Case("--strategy ''", ["tune", "--task", "wine", "--strategy", ""],
         "tune.strategy must be one of 'auto', 'path', 'online', 'tpe', 'random', 'grid', got ''"),
    # tracebacks, now one line
    Case("no arguments", [], "", code=0),
    Case("--out under a file", [*RUN, "--out", "file.txt/run"], "run.out must be a directory path (not under a file)",
         {"file.txt": "x"}),
    Case("--out too long", [*RUN, "--out", "x" * 300], "run.out must be a path whose names fit the file system"),
    Case("step schedule values=1", [*RUN, "--set", 'dropout={schedule="step", values=1}'],
         "regularization.dropout.values must be a list of numbers, got 1"),
    Case("[tune] space = 5", ["tune", "c.toml"], "tune.space must be a table, got 5",
         {"c.toml": "[run]\ntask = 'wine'\n[tune]\nspace = 5\n"}),
    Case("[tune] storage = 123", ["tune", "c.toml"], "tune.storage must be text",
         {"c.toml": "[run]\ntask = 'wine'\n[tune]\nstorage = 123\n"}),
    Case("grid_points = 'x'", ["tune", "c.toml"], "tune.grid_points must be an integer in [1, 100000], got 'x'",
         {"c.toml": "[run]\ntask = 'wine'\n[tune]\ngrid_points = 'x'\n"}),
    Case("grid_points = 1.5", ["tune", "c.toml"], "tune.grid_points must be an integer in [1, 100000], got 1.5",
         {"c.toml": "[run]\ntask = 'wine'\n[tune]\ngrid_points = 1.5\n"}),
    Case("grid beyond memory", ["tune", "c.toml"], "tune.grid_points must be a grid of at most 100,000 settings",
         {"c.toml": "[run]\ntask = 'wine'\n[tune]\nstrategy = 'grid'\ngrid_points = 1000\n"}),
    Case("run = 5", ["run", "c.toml"], "run must be a table, got 5", {"c.toml": "run = 5\n"}),
    Case("width = 4e9", ["run", "c.toml", "--quiet"], "model.width must be an integer in [1, 65536], got 4000000000",
         {"c.toml": "[run]\ntask = 'wine'\nepochs = 1\n[model]\nwidth = 4000000000\n"}),
    Case("hidden = -1", ["run", "c.toml", "--quiet"], "model.hidden must be an integer in [1, 65536], got -1",
         {"c.toml": "[run]\ntask = 'digits-small'\nepochs = 1\n[model]\nhidden = -1\n"}),
    Case("channels = 5", ["run", "c.toml", "--quiet"], "model.channels must be a non-empty list of channel counts",
         {"c.toml": "[run]\ntask = 'digits-small'\nepochs = 1\n[model]\nchannels = 5\n"}),
    Case("truncated .npz", DATA, "data must be a .npz archive (numpy.savez), got d.npz, which is not a zip archive",
         {"d.npz": _npz(x=X, y=Y)[:200]}),
    Case("garbage .npz", DATA, "data must be a .npz archive (numpy.savez), got d.npz, which is not a zip archive",
         {"d.npz": bytes(range(256))}),
    Case(".npy named .npz", DATA, "data must be a .npz archive (numpy.savez), got d.npz, which is not a zip archive",
         {"d.npz": _npy(X)}),
    Case("header claims 10^12", DATA, "d.npz: x must be at most 8 GiB, got a header claiming",
         {"d.npz": _claiming((10**12, 4))}),
    Case("deeply nested TOML", ["run", "c.toml"], "c.toml must be valid TOML", {"c.toml": "a = " + "[" * 100_000}),
    Case("--storage sqlite://", ["tune", "--task", "wine", "--storage", "sqlite://"],
         "storage must be a database file or server that workers share"),
    Case("truncated state", RESUME, "must be the tensor file of the last checkpoint", damage=_truncate("STATE")),
    Case("garbage state", RESUME, "must be the tensor file of the last checkpoint", damage=_garbage("STATE")),
    Case("truncated final", ["report", "run"], "final.safetensors must be a safetensors file of weights",
         damage=_truncate("checkpoints/final.safetensors")),
    Case("garbage best", RESUME, "", damage=_garbage("checkpoints/best.safetensors"), code=0),
    Case("last.json = {}", RESUME, "last.json must be a checkpoint written by regdial (format 2), got format None",
         damage=_edit_last(lambda d: {})),
    Case("last.json = []", RESUME, "last.json must be a checkpoint written by regdial, got a JSON list",
         damage=_edit_last(lambda d: [])),
    Case("last.json wrong types", RESUME, "last.json must be a checkpoint of this run", damage=_edit_last(_wrong_types)),
    Case("last.json short RNG", RESUME, "last.json must be a checkpoint of this run", damage=_edit_last(_short_rng)),
    Case("last.json missing keys", RESUME, "last.json must be a checkpoint of this run", damage=_edit_last(_no_loop)),
    Case("summary.json = []", ["report", "run"], "summary.json must be a run summary written by regdial",
         damage=lambda run: (run / "summary.json").write_text("[]")),
    Case("history rows [{}]", ["diagnose", "run"], "history.json must be a history written by regdial",
         damage=lambda run: (run / "history.json").write_text('{"kind": "classification", "rows": [{}]}')),
    Case("config for another model", RESUME, "last.json must be a checkpoint of this run (the model config.toml "
         "describes)", damage=_other_model),
    Case("a directory for a file", RESUME, "last.json must be a checkpoint written by regdial, got a directory",
         damage=_directory("checkpoints/last.json")),
    # unclear messages, now naming the field
    Case("binary TOML", ["run", "c.toml"], "c.toml must be a readable TOML file, got bytes that are not UTF-8",
         {"c.toml": bytes(range(128, 256))}),
    Case("binary JSON", ["diagnose", "run"], "history.json must be a history (history.json or trainer_state.json), "
         "got bytes that are not UTF-8", damage=lambda run: (run / "history.json").write_bytes(bytes(range(128, 256)))),
    Case("binary CSV", ["run", "--data", "d.csv", "--target", "t", "--quiet"],
         "d.csv must be a readable CSV file, got bytes that are not UTF-8", {"d.csv": bytes(range(128, 256))}),
    Case("corrupt JSON", ["report", "run"], "summary.json must be a run summary written by regdial, got broken JSON",
         damage=lambda run: (run / "summary.json").write_text('{"status": ')),
    Case("seed >= 2^32", [*RUN, "--seed", str(2**32)], "run.seed must be an integer in [0, 4294967295], got 4294967296"),
    Case("one row of data", DATA, "d.npz: x must be at least 14 rows", {"d.npz": _npz(x=X[:1], y=Y[:1])}),
    Case("no rows of data", DATA, "d.npz: x must be at least 14 rows", {"d.npz": _npz(x=X[:0], y=Y[:0])}),
    Case("space = 'abc'", ["tune", "c.toml"], "tune.space must be a table, got 'abc'",
         {"c.toml": "[run]\ntask = 'wine'\n[tune]\nspace = 'abc'\n"}),
    Case("schedule values=['a']", [*RUN, "--set", 'dropout={schedule="step", values=["a"]}'],
         "regularization.dropout.values[0] must be a number in [-inf, inf), got 'a'".replace("[-inf, inf)", "(-inf, inf)")),
    Case("NaN weights", ["report", "run"], "", damage=_nan_weights, code=0),
    Case("a 10^7-character value", [*RUN, "--optimizer", "a" * 10_000_000], "(10,000,002 characters)"),
]  # fmt: skip
