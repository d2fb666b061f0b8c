"""README's module table names every module of worker/, backend/ and training/."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_readme_module_tables_cover_every_module():
    readme = (ROOT / "README.md").read_text()
    modules = [p.relative_to(ROOT).as_posix() for pkg in ("worker", "backend", "training")
               for p in sorted((ROOT / pkg).glob("*.py"))]
    missing = [m for m in modules if f"| `{m}` |" not in readme]
    assert not missing, f"README's module tables miss {missing}"
