"""docs/architecture.md's module index names every module of worker/, backend/ and training/."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_architecture_module_index_covers_every_module():
    index = (ROOT / "docs" / "architecture.md").read_text()
    modules = [p.relative_to(ROOT).as_posix() for pkg in ("worker", "backend", "training")
               for p in sorted((ROOT / pkg).glob("*.py"))]
    missing = [m for m in modules if f"| `{m}` |" not in index]
    assert not missing, f"docs/architecture.md's module index misses {missing}"
