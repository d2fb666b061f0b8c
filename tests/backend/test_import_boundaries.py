"""Import boundaries: the backend loads only the worker.protocol package from worker/; the runtime never loads
research code."""

from __future__ import annotations

import pkgutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def _modules(package: str) -> list[str]:
    """Every module of ``package``, subpackages included."""
    return [package] + [m.name for m in pkgutil.walk_packages([str(ROOT / package)], prefix=f"{package}.")]


def test_the_module_list_reaches_into_subpackages():
    assert "backend.http.app" in _modules("backend") and "worker.protocol.deadline" in _modules("worker")


def test_the_backend_imports_only_worker_protocol_from_worker():
    names = " ".join(_modules("backend"))
    loaded = _run(
        "import importlib, sys\n"
        f"for name in {names.split()!r}:\n"
        "    if name != 'backend.__main__':\n"
        "        importlib.import_module(name)\n"
        "print(' '.join(sorted(m for m in sys.modules if m == 'worker' or m.startswith('worker.'))))\n"
        "print('torch' in sys.modules)")
    worker_modules, torch_loaded = loaded.splitlines()
    assert "worker.protocol" in worker_modules.split()
    assert all(m in ("worker", "worker.protocol") or m.startswith("worker.protocol.") for m in worker_modules.split())
    assert torch_loaded == "False"


def test_worker_and_backend_never_import_training_or_benchmarks():
    names = [n for n in _modules("worker") + _modules("backend") if not n.endswith("__main__")]
    loaded = _run(
        "import importlib, sys\n"
        f"for name in {names!r}:\n"
        "    importlib.import_module(name)\n"
        "print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] in ('training', 'benchmarks'))))")
    assert loaded == ""
