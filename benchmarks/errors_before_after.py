"""Print what each bad input and damaged file of tests/damage_cases.py gets, before and after.

    git worktree add /tmp/regdial-before <commit>
    python benchmarks/errors_before_after.py --before /tmp/regdial-before/src

Each case runs ``regdial`` in a child process whose ``PYTHONPATH`` selects the version's
source; the table shows the exit code and the first line of standard error (a traceback
shows as its last line, marked ``traceback``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCE = HERE.parent / "src"

CHILD = r"""
import json, shutil, sys, tempfile
from pathlib import Path
sys.path.insert(0, {tests!r})
from damage_cases import CASES
from fuzzing import invoke

def old_format(damage, run):  # the landed checkpoint kept the loop's fields at the top of last.json
    path = run / "checkpoints" / "last.json"
    document = json.loads(path.read_text())
    name = getattr(damage, "__qualname__", "")
    if "_short_rng" in repr(getattr(damage, "__closure__", None)) or "short" in name:
        document["rng"] = "AAA="
    else:
        document.pop("epoch", None)
    path.write_text(json.dumps(document))

root = Path(sys.argv[1])
if not (root / "run").exists():
    invoke(["run", "--task", "wine", "--epochs", "2", "--out", "run", "--set", "l1=0.001", "--quiet"], root)
results = {{}}
for case in CASES[int(sys.argv[2]) : int(sys.argv[2]) + 1]:
    work = Path(tempfile.mkdtemp())
    (work / "file.txt").write_text("a file\n")
    for name, content in case.files.items():
        (work / name).write_bytes(content) if isinstance(content, bytes) else (work / name).write_text(content)
    if case.damage is not None:
        shutil.copytree(root / "run", work / "run")
        try:
            case.damage(work / "run")
        except (KeyError, TypeError, IndexError):
            old_format(case.damage, work / "run")
    outcome = invoke(case.args, work)
    text = outcome.err.strip() or outcome.out.strip()
    if outcome.escaped is not None or "Traceback" in text:
        last = f"{{type(outcome.escaped).__name__}}: {{outcome.escaped}}" if outcome.escaped else text.splitlines()[-1]
        line = "traceback: " + last
    else:
        line = text.splitlines()[0] if text else ""
    results[case.name] = [outcome.code, line[:160]]
    shutil.rmtree(work, ignore_errors=True)
print(json.dumps(results))
"""


def run(source: Path) -> dict[str, list[object]]:
    """Each case in its own child process (a crash of one is recorded, not fatal)."""
    sys.path.insert(0, str(HERE.parent / "tests"))
    from damage_cases import CASES

    environment = dict(os.environ, PYTHONPATH=str(source), REGDIAL_DEBUG="")
    result: dict[str, list[object]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        for index, case in enumerate(CASES):
            done = subprocess.run(
                [sys.executable, "-c", CHILD.format(tests=str(HERE.parent / "tests")), scratch, str(index)],
                capture_output=True, text=True, cwd=scratch, env=environment, check=False,
            )  # fmt: skip
            if done.returncode != 0 or not done.stdout.strip():
                result[case.name] = ["crash", f"the process died ({done.returncode}): {done.stderr[-120:]!r}"]
                continue
            result.update(json.loads(done.stdout.strip().splitlines()[-1]))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--before", type=Path, required=True, help="the src/ directory of the earlier version"
    )
    parser.add_argument("--after", type=Path, default=SOURCE, help="the src/ directory of this version")
    args = parser.parse_args()
    before, after = run(args.before), run(args.after)
    print("| case | before | after |\n|---|---|---|")
    for name in after:
        b, a = before.get(name, ["-", ""]), after[name]
        print(f"| {name} | {b[0]}: {str(b[1]).replace('|', '/')} | {a[0]}: {str(a[1]).replace('|', '/')} |")
    tracebacks = sum(str(v[1]).startswith("traceback") for v in after.values())
    print(f"\ncases: {len(after)}; tracebacks before: "
          f"{sum(str(v[1]).startswith('traceback') for v in before.values())}, after: {tracebacks}")  # fmt: skip


if __name__ == "__main__":
    main()
