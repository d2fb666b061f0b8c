"""docs/architecture.md's module index names every module of worker/, backend/ and training/ (subpackages
included), and no module that is gone."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_architecture_module_index_covers_every_module():
    index = (ROOT / "docs" / "architecture.md").read_text()
    modules = [p.relative_to(ROOT).as_posix() for pkg in ("worker", "backend", "training")
               for p in sorted((ROOT / pkg).rglob("*.py"))]
    missing = [m for m in modules if f"| `{m}` |" not in index]
    assert not missing, f"docs/architecture.md's module index misses {missing}"


def test_architecture_module_index_names_no_module_that_is_gone():
    import re

    index = (ROOT / "docs" / "architecture.md").read_text()
    named = re.findall(r"^\| `((?:worker|backend|training)/[^`]+\.py)` \|", index, re.M)
    gone = [m for m in named if not (ROOT / m).exists()]
    assert not gone, f"docs/architecture.md's module index names modules that no longer exist: {gone}"
