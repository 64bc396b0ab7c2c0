"""The public face: every exported name resolves, each is written once, names mean one thing."""

from __future__ import annotations

import importlib
import importlib.metadata
from pathlib import Path

import pytest

import regdial
from regdial._lazy import type_checking_imports

PACKAGES = ["regdial", "regdial.dial", "regdial.training", "regdial.blocks", "regdial.schedules"]


@pytest.mark.parametrize("package", PACKAGES)
def test_every_exported_name_resolves_and_is_listed_by_dir(package: str) -> None:
    module = importlib.import_module(package)
    missing = [name for name in module.__all__ if getattr(module, name, None) is None]
    assert missing == []
    assert set(module.__all__) <= set(dir(module))


def test_a_lazy_name_is_written_once_in_the_type_checking_block() -> None:
    table = type_checking_imports(Path(regdial.__file__))
    assert table["fit"] == ("regdial.training.fit", "fit")
    assert set(table) <= set(regdial.__all__)  # the lazy names are the exported ones, not a copy
    assert regdial.fit is importlib.import_module("regdial.training.fit").fit


def test_the_type_checking_reader_sees_aliases_and_nothing_else(tmp_path: Path) -> None:
    source = tmp_path / "sample.py"
    source.write_text(
        "from typing import TYPE_CHECKING\nfrom os import path\n"
        "if TYPE_CHECKING:\n    from json import dumps as dumps, loads as read\n"
    )
    assert type_checking_imports(source) == {"dumps": ("json", "dumps"), "read": ("json", "loads")}


def test_names_mean_one_thing() -> None:
    for gone in ("Linear", "Cosine", "Step", "Early", "Constant", "Schedule", "Pruned", "search_report"):
        assert not hasattr(regdial, gone), gone
    from regdial.schedules import Linear

    assert regdial.schedules.Linear is Linear
    from regdial.integrations.huggingface import HuggingFaceCallback
    from regdial.integrations.lightning import LightningCallback

    assert HuggingFaceCallback.__name__ != LightningCallback.__name__


def test_the_version_is_the_installed_package_version() -> None:
    assert regdial.__version__ == importlib.metadata.version("regdial")
