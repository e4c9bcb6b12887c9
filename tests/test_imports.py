"""The package's import graph: every module imports on its own, and packages import in the one
direction docs/design.md writes down (function-local and type-only imports count: a lazy import
that hides a cycle is a cycle)."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "mmdiff"
DESIGN = ROOT / "docs" / "design.md"

KNOWN_EXCEPTIONS: dict[tuple[str, str], str] = {}
"""Imports against the table that a named change is removing; the test fails once one is gone, so
the exception is deleted with it."""


def module_names() -> list[str]:
    names = []
    for path in sorted(SRC.rglob("*.py")):
        parts = path.relative_to(SRC.parent).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def package_of(module: str) -> str:
    """The row of the design table a module belongs to: its top-level module or subpackage."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "mmdiff"


def mmdiff_imports(path: Path) -> list[tuple[str, int]]:
    """(imported mmdiff module, line) for every import in the file, at any depth."""
    module = ".".join(path.relative_to(SRC.parent).with_suffix("").parts)
    package = module.rsplit(".", 1)[0] if path.name != "__init__.py" else module.removesuffix(".__init__")
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the importing package
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target == "mmdiff":  # `from mmdiff import stats` imports the subpackage
                found += [
                    (f"mmdiff.{a.name}" if (SRC / a.name).is_dir() or (SRC / f"{a.name}.py").is_file() else "mmdiff",
                     node.lineno)
                    for a in node.names
                ]
            else:
                found.append((target, node.lineno))
    return [(m, line) for m, line in found if m == "mmdiff" or m.startswith("mmdiff.")]


def allowed_imports() -> dict[str, set[str]]:
    """{package: packages it may import} from the table under "## Import direction" in docs/design.md."""
    text = DESIGN.read_text().split("## Import direction", 1)[1].split("\n## ", 1)[0]
    table: dict[str, set[str]] = {}
    for name, cell in re.findall(r"^\| `(\w+)` \| (.*) \|$", text, re.M):
        if cell.startswith("every package above"):
            table[name] = set(table)
        else:
            table[name] = set(re.findall(r"`(\w+)`", cell))
    return table


def test_the_documented_direction_is_a_complete_order_without_cycles():
    table = allowed_imports()
    order = list(table)
    for i, name in enumerate(order):
        above = set(order[:i])
        assert table[name] <= above, (
            f"docs/design.md: {name} may import {sorted(table[name] - above)}, which are not in earlier "
            "rows; a package may only import packages listed before it"
        )
    packages = {package_of(m) for m in module_names()}
    assert packages == set(table), (
        f"packages without a row in docs/design.md: {sorted(packages - set(table))}; rows without a "
        f"package: {sorted(set(table) - packages)}"
    )


def test_packages_import_only_what_docs_design_allows():
    table = allowed_imports()
    wrong, seen_exceptions = [], set()
    for path in sorted(SRC.rglob("*.py")):
        source = package_of(".".join(path.relative_to(SRC.parent).with_suffix("").parts).removesuffix(".__init__"))
        for target_module, line in mmdiff_imports(path):
            target = package_of(target_module)
            if target == source or target in table.get(source, set()):
                continue
            if (source, target) in KNOWN_EXCEPTIONS:
                seen_exceptions.add((source, target))
                continue
            wrong.append(f"{path.relative_to(ROOT)}:{line}: {source} imports {target_module}")
    assert not wrong, (
        "imports against the direction in docs/design.md (move the code to the lower package, or pass "
        "the object in):\n  " + "\n  ".join(wrong)
    )
    gone = set(KNOWN_EXCEPTIONS) - seen_exceptions
    assert not gone, f"{sorted(gone)} no longer happen: delete them from KNOWN_EXCEPTIONS"


IMPORT_EACH_ALONE = """
import importlib, sys
failed = []
for name in sys.argv[1:]:
    for loaded in [m for m in sys.modules if m == "mmdiff" or m.startswith("mmdiff.")]:
        del sys.modules[loaded]  # as if fresh: no mmdiff module is loaded before this one
    try:
        importlib.import_module(name)
    except BaseException as exc:  # noqa: BLE001
        failed.append(f"{name}: {type(exc).__name__}: {exc}")
print("\\n".join(failed))
sys.exit(1 if failed else 0)
"""


def test_every_module_imports_on_its_own_in_a_fresh_interpreter():
    # __main__ runs the command line when imported; the third-party libraries stay loaded between
    # modules (importing torch 170 times would take minutes), mmdiff's own modules do not
    names = [m for m in module_names() if m != "mmdiff.__main__"]
    res = subprocess.run([sys.executable, "-c", IMPORT_EACH_ALONE, *names], capture_output=True, text=True,
                         timeout=600, cwd=ROOT)
    assert res.returncode == 0, f"modules that fail to import on their own:\n{res.stdout}{res.stderr[-3000:]}"
