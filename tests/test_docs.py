"""Every code block of README.md and docs/ runs (or parses), so the documentation cannot drift.

Python blocks run in order, one namespace per file, in a scratch directory, with the tiny
data they assume (``loader``, ``make_model``, ``train_loader``..., ``build``,
``make_optimizer``, ``one_epoch``: 10 classes of 8 features, 64 rows). ``regdial.tune`` in
them runs with a tiny budget: the namespace's ``regdial`` is the package with ``tune``
given ``budget="2 trials"`` and ``epochs=2`` whatever the block says (the block's own
arguments are otherwise passed as written). Blocks under the heading "Inside Hugging Face and
Lightning trainers" are skipped: they need the optional trainers and a model the block
does not build (tests/test_integrations.py covers the callbacks).

Shell blocks are checked for parsing only: every ``regdial`` line is parsed by the
command's own parser (typer/click, each option and its type, nothing runs), and ``make`` and
``torchrun`` lines name a Makefile target and ``-m regdial`` respectively. Running them
(``make demo``, a full ``regdial tune``) is minutes of training.
"""

from __future__ import annotations

import contextlib
import re
import shlex
import types
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import regdial

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SKIPPED_SECTIONS = ("Inside Hugging Face and Lightning trainers",)
BLOCK = re.compile(r"^```(\w+)\n(.*?)^```", re.MULTILINE | re.DOTALL)


def blocks(path: Path, language: str) -> list[tuple[str, str]]:
    """(heading, code) of each block in ``language``, skipped sections left out."""
    text = path.read_text()
    found = []
    for match in BLOCK.finditer(text):
        if match.group(1) != language:
            continue
        headings = re.findall(r"^#+ (.*)$", text[: match.start()], re.MULTILINE)
        heading = headings[-1] if headings else ""
        if heading not in SKIPPED_SECTIONS:
            found.append((heading, match.group(2)))
    return found


def tiny_namespace() -> dict[str, Any]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=generator)
    y = torch.arange(64) % 10

    def batches(features: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
        xs = torch.randn(64, features, generator=generator)
        return [
            (xs[i : i + 16], y[i : i + 16] if features == 8 else xs[i : i + 16, :1]) for i in range(0, 64, 16)
        ]

    def make_model() -> nn.Module:
        return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, 10))

    def make_optimizer(groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        return torch.optim.AdamW(groups, lr=1e-2)

    def one_epoch(applied: regdial.Applied) -> tuple[float, float, float]:
        model = applied.model
        model.train()
        for xb, yb in batches():
            inputs, targets = applied.batch(xb, yb)
            loss = applied.loss(model(inputs), targets)
            applied.optimizer.zero_grad()
            loss.backward()
            applied.optimizer.step()
        model.eval()
        with torch.no_grad():
            logits = model(x)
            loss = float(nn.functional.cross_entropy(logits, y))
            return loss, loss, float((logits.argmax(1) == y).float().mean())

    def tune(*args: Any, **kwargs: Any) -> Any:
        return regdial.tune(*args, **(kwargs | {"budget": "2 trials", "epochs": 2}))

    shim = types.ModuleType("regdial")
    shim.__dict__.update({name: getattr(regdial, name) for name in regdial.__all__})
    shim.tune = tune  # type: ignore[attr-defined]
    loaders = {name: batches() for name in ("train_loader", "val_loader", "test_loader")}
    return {"loader": batches(50), "make_model": make_model, "build": make_model, "make_optimizer": make_optimizer,
            "one_epoch": one_epoch, "regdial": shim, **loaders}  # fmt: skip


PYTHON = [(path, heading, code) for path in DOCUMENTS for heading, code in blocks(path, "python")]


def test_the_documents_have_python_blocks() -> None:
    assert len(PYTHON) >= 3


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: p.name)
def test_python_blocks_run(document: Path, tmp_path: Path) -> None:
    namespace = tiny_namespace()
    for heading, code in blocks(document, "python"):
        source = code.replace("import regdial\n", "")  # the shim stands for it
        with contextlib.chdir(tmp_path):
            try:
                exec(compile(source, f"{document.name}: {heading}", "exec"), namespace)
            except Exception as error:
                error.add_note(f"in the block under '{heading}' of {document.name}")
                raise


SHELL = [(path, line) for path in DOCUMENTS for _, code in blocks(path, "bash") for line in code.splitlines()
         if line.strip() and not line.lstrip().startswith("#")]  # fmt: skip


@pytest.mark.parametrize("line", [line for _, line in SHELL], ids=lambda s: s.split("#")[0].strip()[:50])
def test_shell_lines_parse(line: str) -> None:
    import typer

    from regdial.cli.app import app

    words = shlex.split(line, comments=True)
    if words[0] == "make":
        targets = re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.MULTILINE)
        assert all(word in targets or "=" in word for word in words[1:]), line
        return
    if words[0] == "torchrun":
        assert words[words.index("-m") + 1] == "regdial", line
        words = ["regdial", *words[words.index("-m") + 2 :]]
    assert words[0] == "regdial", line
    import regdial.cli  # noqa: F401 - registers the commands

    group = typer.main.get_command(app)
    context = group.make_context("regdial", [words[1]], resilient_parsing=True)
    command = group.get_command(context, words[1])  # type: ignore[attr-defined]
    assert command is not None, f"no command {words[1]!r}: {line}"
    command.make_context(words[1], words[2:], parent=context)  # parses every option and its type
