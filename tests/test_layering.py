"""The layers of docs/ARCHITECTURE.md, checked: no layer reaches upward, no import circles.

Two checks. A static one walks every ``import`` in the source (those inside functions
included, since a lazy import is still a dependency; those under ``if TYPE_CHECKING``
excluded, since they never run) and builds the module graph: it must have no cycle, and
no module may import a layer above its own. A dynamic one imports each package in a
fresh interpreter and looks at what got loaded: the building blocks cost torch alone.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

SOURCE = Path(__file__).resolve().parent.parent / "src" / "regdial"

# Each module's layer; a module may import its own layer and those with a lower number.
LAYERS = {
    "regdial._checks": 0, "regdial._io": 0, "regdial._tensors": 0, "regdial._lazy": 0, "regdial.knobs": 0,
    "regdial.blocks": 1, "regdial.schedules": 1,
    "regdial.setting": 2,  # the setting is a value: it knows nothing of Applied, which wires it in
    "regdial.applied": 3,
    "regdial.training": 4,
    "regdial.diagnosis": 5,
    "regdial.dial": 6,
    "regdial.reports": 7,
    "regdial.integrations": 8,
    "regdial.api": 9, "regdial.config": 9, "regdial.cli": 10, "regdial.__main__": 10, "regdial": 11,
}  # fmt: skip
MOST_LINES = 500
"""No module over this many lines: a module is one concept a reader can name."""
HEAVY = ["optuna", "matplotlib", "sklearn", "typer", "rich", "kornia", "pydantic", "safetensors", "scipy"]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SOURCE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer(module: str) -> int:
    """The layer of ``module``: its longest prefix in ``LAYERS``."""
    parts = module.split(".")
    for end in range(len(parts), 0, -1):
        found = LAYERS.get(".".join(parts[:end]))
        if found is not None:
            return found
    raise AssertionError(f"{module} has no layer: add it to LAYERS (and to docs/ARCHITECTURE.md)")


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports(path: Path) -> set[str]:
    """The regdial modules ``path`` imports at run time (at any depth, not for type checking)."""
    found: set[str] = set()
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("regdial"))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            if base.startswith("regdial"):
                for alias in node.names:  # `from regdial.blocks import schedules` imports a module
                    candidate = f"{base}.{alias.name}"
                    found.add(candidate if (SOURCE.parent / candidate.replace(".", "/")).with_suffix(".py").is_file()
                              else base)  # fmt: skip
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    return found


MODULES = {module_name(path): path for path in SOURCE.rglob("*.py")}
GRAPH = {name: imports(path) & set(MODULES) for name, path in MODULES.items()}


def test_every_module_has_a_layer() -> None:
    for name in MODULES:
        layer(name)


def upward(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    """The imports of ``graph`` that reach a layer above the importer's."""
    return sorted((a, b) for a, targets in graph.items() for b in targets if layer(b) > layer(a))


def test_no_module_imports_a_layer_above_its_own() -> None:
    assert upward(GRAPH) == []


def test_the_layer_rule_sees_the_setting_reaching_up_to_applied() -> None:
    assert upward({"regdial.setting": {"regdial.applied"}}) == [("regdial.setting", "regdial.applied")]
    assert upward({"regdial.applied": {"regdial.setting"}}) == []
    # not even for type checking: the setting names nothing of Applied
    assert "regdial.applied" not in (SOURCE / "setting.py").read_text(encoding="utf-8")


def too_long(paths: dict[str, Path]) -> dict[str, int]:
    """The modules of ``paths`` over ``MOST_LINES`` lines, with their length."""
    lengths = {name: len(path.read_text(encoding="utf-8").splitlines()) for name, path in paths.items()}
    return {name: n for name, n in sorted(lengths.items()) if n > MOST_LINES}


def test_no_module_is_over_500_lines(tmp_path: Path) -> None:
    assert too_long(MODULES) == {}
    long = tmp_path / "long.py"
    long.write_text("x = 1\n" * (MOST_LINES + 1))
    assert too_long({"long": long}) == {"long": MOST_LINES + 1}  # the check itself sees one


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import circles of ``graph``: its strongly connected components (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def strongconnect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in graph.get(node, set()):
            if target not in index:
                strongconnect(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph.get(node, set()):
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            strongconnect(node)
    return found


def test_no_import_circles() -> None:
    # Package __init__ files are façades that re-export their modules; the modules
    # themselves import each other directly, and it is among them that a circle would bite.
    facades = {name for name, path in MODULES.items() if path.name == "__init__.py"}
    graph = {a: {b for b in targets if b not in facades} for a, targets in GRAPH.items() if a not in facades}
    assert cycles(graph) == []


def test_the_circle_finder_finds_circles() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"a"}}) == [["a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_walk_sees_imports_inside_functions_and_skips_type_checking(tmp_path: Path) -> None:
    """The checker itself: a lazy import counts, a TYPE_CHECKING one does not."""
    sample = SOURCE / "training" / "fit.py"
    found = imports(sample)
    assert "regdial.training.pretrained" in found  # a top-level import
    found = imports(SOURCE / "api.py")
    assert "regdial.reports.run" in found  # imported inside tune()
    found = imports(SOURCE / "dial" / "strategies.py")
    assert "regdial.dial.search" not in found  # imported for type checking only
    assert "regdial.dial.workers" in found


def loaded_after(code: str) -> tuple[list[str], list[str]]:
    """(regdial modules, heavy third-party packages) in sys.modules after running ``code``."""
    probe = (
        f"{code}\nimport sys\n"
        "print(sorted(m for m in sys.modules if m.startswith('regdial')))\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    regdial_modules, heavy = out.stdout.strip().splitlines()[-2:]
    return eval(regdial_modules), eval(heavy)


def test_building_blocks_and_the_setting_import_torch_alone() -> None:
    modules, heavy = loaded_after(
        "from regdial import L1, L2, ElasticNet, GroupLasso, L2SP, attach_prox, param_groups, MaxNorm\n"
        "from regdial import Regularization, Applied, DropPath, Mixup, EMA, EarlyStopping, schedules\n"
        "import regdial.blocks.penalties, regdial.blocks.proximal, regdial.blocks.groups, regdial.blocks.schedules\n"
        "import regdial.blocks.noise, regdial.blocks.mixing, regdial.blocks.augment, regdial.blocks.stopping\n"
        "import regdial.blocks.averaging, regdial.setting, regdial.applied\n"
    )
    assert heavy == []
    assert [m for m in modules if layer(m) > layer("regdial.applied") and m != "regdial"] == []


def test_each_package_loads_nothing_above_it() -> None:
    """In one fresh interpreter, lowest layer first: after importing every module of a
    package, nothing of the layers above it has been loaded."""
    steps = [
        (
            "regdial.blocks",
            ("regdial.training", "regdial.dial", "regdial.reports", "regdial.cli", "regdial.api"),
        ),
        (
            "regdial.training",
            ("regdial.dial", "regdial.reports", "regdial.cli", "regdial.api", "regdial.config"),
        ),
        ("regdial.dial", ("regdial.reports", "regdial.cli", "regdial.api", "regdial.config")),
    ]
    probe = ["import sys"]
    for package, forbidden in steps:
        names = sorted(name for name in MODULES if name.startswith(package + ".") or name == package)
        probe += [f"import {name}" for name in names]
        probe.append(f"print(sorted(m for m in sys.modules if m.startswith({forbidden!r})))")
    out = subprocess.run([sys.executable, "-c", "\n".join(probe)], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["[]"] * len(steps)
