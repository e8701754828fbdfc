"""The rooms' import rules (docs/architecture.md), read from the source: a change that
breaks a layer fails here, not in a reviewer's head."""

from __future__ import annotations

import ast
from pathlib import Path

from hsm_core.remote_machine import AGENT_FILES

PACKAGE = Path(__file__).parents[1] / "hsm_core"

# module -> project modules it must not import (directly)
FORBIDDEN = {
    "hydra_job": {"scheduler", "engine", "launch", "wire", "sources", "sync", "remote_machine", "composition"},
    "composition": {"scheduler", "engine", "launch", "sources", "hydra_job"},
    "scheduler": {"hydra_job", "launch", "sync", "remote_machine", "sources.local", "sources.ssh", "sources.slurm",
                  "sources.allocations"},
    "engine": {"hydra_job", "launch", "sources.local", "sources.ssh"},
    "progress": {"scheduler", "engine", "sources"},
    "console": {"jobs", "progress", "scheduler", "engine", "sources", "hydra_job"},
    "journal": {"scheduler", "engine", "sources"},
    "cli": {"scheduler", "engine", "sources.ssh"},
    "diagnostics": {"scheduler", "sources.ssh"},
    "sync": {"worker", "hydra_job", "sources", "scheduler"},
    "remote_machine": {"sources", "scheduler", "hydra_job"},
    "sources.bring_up": {"scheduler", "sources.ssh", "sources.slurm", "sync", "hydra_job"},
    "wire": {"jobs", "hydra_job", "sources"},
    "environments": {"jobs", "hydra_job", "sources", "sync", "remote_machine", "settings", "scheduler", "wire",
                     "env_requirements"},
    "env_requirements": {"sources", "sync", "remote_machine", "settings", "scheduler", "environments"},
    "strategies": {"scheduler", "sources"},
    "breaker": {"scheduler", "sources"},
    "gpus": {"scheduler", "sources"},
    "slurm": {"jobs", "hydra_job", "wire", "sources", "scheduler"},
    "sources.slurm": {"scheduler", "strategies", "breaker", "launch", "engine", "sources.ssh", "sources.local",
                      "sources.allocations"},
    "sources.allocations": {"scheduler", "strategies", "breaker", "launch", "engine", "sources.ssh", "sources.local",
                            "hydra_job"},
    "sources.machine": {"scheduler", "launch", "engine", "sources.ssh", "sources.local", "sources.slurm",
                        "sources.allocations"},
    "sources.local": {"scheduler", "sources.ssh", "sources.slurm", "sources.allocations", "hydra_job"},
    "sources.ssh": {"scheduler", "sources.local", "sources.slurm", "sources.allocations"},
}


def project_imports(path: Path) -> set[str]:
    """The hsm_core modules a file imports (as dotted names under hsm_core)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("hsm_core"):
            base = node.module.removeprefix("hsm_core").lstrip(".")
            found.update(f"{base}.{alias.name}".lstrip(".") if not base or base == "sources" else base
                         for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name.removeprefix("hsm_core.") for alias in node.names
                         if alias.name.startswith("hsm_core."))
    return found


def test_each_room_imports_only_what_its_layer_allows() -> None:
    broken = {}
    for module, forbidden in FORBIDDEN.items():
        imported = project_imports(PACKAGE / f"{module.replace('.', '/')}.py")
        wrong = {name for name in imported for rule in forbidden if name == rule or name.startswith(rule + ".")}
        if wrong:
            broken[module] = sorted(wrong)
    assert broken == {}


def test_what_travels_to_a_machine_imports_only_what_travels() -> None:
    travelling = {name.removesuffix(".py") for name in AGENT_FILES} - {"__init__"}
    for name in travelling:
        assert project_imports(PACKAGE / f"{name}.py") <= travelling, name
