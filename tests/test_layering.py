"""The building blocks cost torch alone: no layer reaches upward (DESIGN.md)."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ["optuna", "matplotlib", "sklearn", "typer", "rich", "kornia", "pydantic", "safetensors", "scipy"]


def test_building_blocks_import_torch_alone() -> None:
    code = (
        "import sys\n"
        "from regdial import L1, L2, ElasticNet, GroupLasso, L2SP, attach_prox, param_groups, MaxNorm\n"
        "import regdial.penalties, regdial.proximal, regdial.groups, regdial.schedules\n"
        "import regdial.noise, regdial.mixing, regdial.augment, regdial.stopping, regdial.averaging\n"
        "import regdial.setting, regdial.applied\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
