"""The layout is the architecture: packages import only from lower floors, and none imports itself back.

Floors, lowest first; a module may import its own package and any package on a lower floor. A
plugin package (data, regions, mechanisms, guidance, metrics) never imports another plugin
package: components meet only through core's contracts and the registry.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "causalimg"

FLOORS: list[set[str]] = [
    {"errors", "tcmalloc"},
    {"io", "strict"},
    {"core"},
    {"plugins"},
    {"predictors"},
    {"regions", "data", "mechanisms", "guidance", "metrics"},
    {"config", "report"},
    {"training"},
    {"builder", "testing"},
    {"preflight"},
    {"pipeline"},
    {"api"},
    {"explore"},
    {"cli"},
    {"run", "__main__"},
]
FLOOR = {package: level for level, packages in enumerate(FLOORS) for package in packages}
ROOT = {"__init__"}  # causalimg/__init__.py: the public names, importable from anywhere


def package_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports() -> list[tuple[str, str, str]]:
    """(importing file, its package, imported package) for every causalimg import in src/."""
    found = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC.parent).with_suffix("")
        module = ".".join(rel.parts).removesuffix(".__init__")
        own = package_of(module)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                submodules = [a.name for a in node.names if (SRC / a.name).exists() or (SRC / f"{a.name}.py").exists()]
                names = [f"causalimg.{n}" for n in submodules] if node.module == "causalimg" else [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                if name.startswith("causalimg.") and name != "causalimg":
                    found.append((str(path.relative_to(SRC)), own, package_of(name)))
    return found


def test_every_package_has_a_floor():
    packages = {
        p.stem if p.is_file() else p.name
        for p in SRC.iterdir()
        if not p.name.startswith((".", "_")) or p.name == "__main__.py"
    }
    packages = {p for p in packages if p not in ("configs", "py")} - ROOT
    assert packages <= set(FLOOR), f"packages without a floor: {sorted(packages - set(FLOOR))}"


def test_no_import_runs_up_a_floor_or_across_plugin_packages():
    plugin_floor = FLOOR["data"]
    wrong = []
    for path, own, imported in imports():
        if imported == own or imported in ROOT or own in ROOT:
            continue
        if FLOOR.get(imported, 99) > FLOOR.get(own, -1):
            wrong.append(f"{path} ({own}, floor {FLOOR[own]}) imports {imported} (floor {FLOOR.get(imported)})")
        elif FLOOR[imported] == FLOOR[own] and (FLOOR[own] == plugin_floor or own != imported):
            wrong.append(f"{path} ({own}) imports {imported} on its own floor")
    assert not wrong, "\n".join(wrong)
