"""Checkpoints: any nested state, tensors as safetensors, the rest as JSON, written atomically.

A run's state is a nested dict that each stateful piece fills with its own
``state_dict()`` (the model, the optimizer, ``Applied``, the best weights, a
controller, the loop's position), as Lightning's trainer collects its callbacks' states.
``save_checkpoint`` splits it: every tensor goes into ``checkpoints/state-NNNNNN.safetensors``
under its path in the tree (``optimizer/state/0/exp_avg``), everything else into
``checkpoints/last.json``, with ``{"$tensor": path}`` where a tensor was. The tensor file is
written first, under a new name; then ``last.json`` is replaced atomically; then older
tensor files are removed. A crash at any moment leaves ``last.json`` pointing at a
complete tensor file. Nothing is pickled.

Reading one back checks it on the way: a missing, truncated or garbage file is a
``DamagedFileError`` (one line, naming the file and the way out), never a traceback.
``Part`` reads the state inside: each value's type is checked where it is read, and a
piece's ``load_state_dict`` is wrapped only in the errors that mean its part of the file is
not what it saved, so a damaged field is named (``loop.step: not an integer``) and a bug
anywhere else keeps its own type and traceback.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

from torch import Tensor

from regdial._checks import shorten
from regdial._io import DamagedFileError, atomic_write, damaged, read_json, remove_orphans, write_json

__all__ = [
    "FORMAT",
    "THIS_RUN",
    "Part",
    "has_checkpoint",
    "load_checkpoint",
    "load_weights",
    "save_checkpoint",
    "save_weights",
]

FORMAT = 2
"""The layout of ``last.json``; a file of another format is refused by name."""

RESUME_HINT = "start a new run, or resume from a copy of the run directory made before the damage"
THIS_RUN = "a checkpoint of this run"


# -- nested state <-> (JSON tree, flat tensors) --------------------------------------------


def _split(value: Any, path: str, tensors: dict[str, Tensor], storages: set[int]) -> Any:
    """The JSON tree of ``value``, moving its tensors into ``tensors`` under their paths."""

    def at(key: object) -> str:
        return f"{path}/{key}" if path else str(key)

    if isinstance(value, Tensor):
        t = value.detach().to("cpu")
        if t.numel():  # safetensors refuses tensors that share storage (tied weights)
            pointer = t.untyped_storage().data_ptr()
            if pointer in storages:
                t = t.clone()
            storages.add(pointer)
        tensors[path] = t.contiguous()
        return {"$tensor": path}
    if isinstance(value, Mapping):
        if value and all(isinstance(k, int) for k in value):
            return {"$int_keys": {str(k): _split(v, at(k), tensors, storages) for k, v in value.items()}}
        return {str(k): _split(v, at(k), tensors, storages) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_split(v, at(i), tensors, storages) for i, v in enumerate(value)]
    if value is None or isinstance(value, str | int | float | bool):
        return value
    raise TypeError(f"a checkpoint holds tensors and plain values, not {type(value).__name__} at {path}")


def _integer(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


def _join(value: Any, tensors: Mapping[str, Tensor]) -> Any:
    if isinstance(value, dict):
        if set(value) == {"$tensor"}:
            return tensors[value["$tensor"]]
        if set(value) == {"$int_keys"}:
            table = value["$int_keys"]
            if not isinstance(table, dict):
                raise ValueError(f"$int_keys holding a {type(table).__name__}, not a table")
            bad = next((k for k in table if not _integer(k)), None)
            if bad is not None:
                raise ValueError(f"the key {shorten(repr(bad), 40)} where a table's keys are integers")
            return {int(k): _join(v, tensors) for k, v in table.items()}
        return {k: _join(v, tensors) for k, v in value.items()}
    if isinstance(value, list):
        return [_join(v, tensors) for v in value]
    return value


# -- files ---------------------------------------------------------------------------------


def save_weights(path: Path, tensors: Mapping[str, Tensor]) -> None:
    """Write one state dict as safetensors, atomically."""
    from safetensors.torch import save_file

    flat: dict[str, Tensor] = {}
    _split(dict(tensors), "", flat, set())
    atomic_write(path, lambda tmp: save_file(flat, str(tmp)), size=_nbytes(flat))


def _nbytes(tensors: Mapping[str, Tensor]) -> int:
    """About what a safetensors file of ``tensors`` needs (its header is small beside them)."""
    return sum(t.numel() * t.element_size() for t in tensors.values()) + 8 * 2**10


def load_weights(
    path: Path, what: str = "a safetensors file of weights written by regdial"
) -> dict[str, Tensor]:
    """Read a state dict written by ``save_weights``; a damaged file is one line naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if path.is_dir():
        damaged(path, what, "a directory")
    if not path.is_file():
        damaged(path, what, "no such file")
    try:
        return dict(load_file(str(path)))
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        damaged(path, what, f"an unreadable file ({shorten(str(error), 90)})", RESUME_HINT)


def has_checkpoint(directory: Path) -> bool:
    """Whether ``directory`` (a run's ``checkpoints/``) has a checkpoint to resume from."""
    return (directory / "last.json").exists()  # a damaged one (even a directory) is named when read


def save_checkpoint(directory: Path, state: Mapping[str, Any]) -> Path:
    """Write a checkpoint of ``state``: the tensor file first, then the ``last.json`` pointer."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    number = 0
    for old in directory.glob("state-*.safetensors"):
        try:
            number = max(number, int(old.stem.split("-")[1]) + 1)
        except (IndexError, ValueError):
            continue
    target = directory / f"state-{number:06d}.safetensors"
    tensors: dict[str, Tensor] = {}
    tree = _split(dict(state), "", tensors, set())
    atomic_write(target, lambda tmp: save_file(tensors, str(tmp)), size=_nbytes(tensors))
    write_json(directory / "last.json", {"format": FORMAT, "tensors": target.name, "state": tree})
    for old in directory.glob("state-*.safetensors"):
        if old != target:
            old.unlink(missing_ok=True)
    return target


def load_checkpoint(directory: Path) -> dict[str, Any]:
    """The last checkpoint in ``directory`` as the nested state that was saved.

    Orphaned temporary files of a write that was killed are removed first. A damaged
    ``last.json`` or tensor file is a ``DamagedFileError`` naming it.
    """
    remove_orphans(directory)
    pointer = directory / "last.json"
    what = "a checkpoint written by regdial"
    if not pointer.exists():
        damaged(directory.parent, "a run directory with a checkpoint (checkpoints/last.json)", "none")
    document = read_json(pointer, what, RESUME_HINT)
    if not isinstance(document, dict):
        damaged(pointer, what, f"a JSON {type(document).__name__}", RESUME_HINT)
    if document.get("format") != FORMAT:
        damaged(pointer, f"{what} (format {FORMAT})", f"format {document.get('format')!r}", RESUME_HINT)
    name, tree = document.get("tensors"), document.get("state")
    if not isinstance(name, str) or "/" in name or not isinstance(tree, dict):
        damaged(pointer, what, "a file without its 'tensors' name or 'state' table", RESUME_HINT)
    tensors = load_weights(directory / name, "the tensor file of the last checkpoint")
    try:
        joined: dict[str, Any] = _join(tree, tensors)
    except KeyError as missing:
        raise DamagedFileError(
            f"{pointer} must point at tensors its tensor file holds, got {missing} missing; {RESUME_HINT}"
        ) from None
    except (ValueError, TypeError) as error:  # what _join found that regdial never writes
        damaged(pointer, what, str(error), RESUME_HINT)
    return joined


class Part:
    """One table of a checkpoint's state, read back: every read checks the value's type, and
    a damaged value is a one-line ``DamagedFileError`` naming the file and the value's path::

        run/checkpoints/last.json must be a checkpoint of this run, got loop.step: not an integer
    """

    def __init__(self, value: object, path: str, where: Path | str, what: str = THIS_RUN) -> None:
        self.path, self.where, self.what = path, where, what
        if not isinstance(value, Mapping):
            self.damaged(f"not a table (a {type(value).__name__})")
        self.value: Mapping[str, Any] = value

    def at(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def damaged(self, why: str, key: str | None = None, what: str | None = None) -> NoReturn:
        at = self.path if key is None else self.at(key)
        damaged(self.where, what or self.what, f"{at}: {why}" if at else why, RESUME_HINT)

    def __contains__(self, key: str) -> bool:
        return key in self.value

    def get(self, key: str) -> Any:
        if key not in self.value:
            self.damaged("missing", key)
        return self.value[key]

    def table(self, key: str) -> Part:
        return Part(self.get(key), self.at(key), self.where, self.what)

    def integer(self, key: str, low: int = 0) -> int:
        value = self.get(key)
        if isinstance(value, bool) or not isinstance(value, int):
            self.damaged("not an integer", key)
        if value < low:
            self.damaged(f"{value}, below {low}", key)
        return value

    def number(self, key: str) -> float:
        value = self.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.damaged("not a number", key)
        return float(value)

    def text(self, key: str, choices: tuple[str, ...] = ()) -> str:
        value = self.get(key)
        if not isinstance(value, str):
            self.damaged("not text", key)
        if choices and value not in choices:
            self.damaged(f"{shorten(repr(value), 40)}, not one of {', '.join(choices)}", key)
        return value

    @contextmanager
    def reading(self, key: str, *errors: type[Exception], what: str | None = None) -> Iterator[None]:
        """Around the one call that hands ``key``'s value to the piece that reads it: the
        ``errors`` that piece raises for a state it did not write name ``key``; anything
        else it raises is not about the file and passes through."""
        try:
            yield
        except errors as error:
            raise DamagedFileError(
                f"{self.where} must be {what or self.what}, got {self.at(key)}: {describe(error)}; {RESUME_HINT}"
            ) from error


def describe(error: BaseException) -> str:
    """A damaged checkpoint's error, on one line: torch's own sentence about what did not
    match (its header line, "Error(s) in loading state_dict for Net:", is dropped)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].startswith("Error(s) in loading"):
        lines = lines[1:]
    said = lines[0] if lines else type(error).__name__
    if isinstance(error, KeyError):
        said = f"no {said}"
    return shorten(said, 140)
