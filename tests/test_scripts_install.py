"""scripts/run.sh and scripts/label_studio_env.sh install what the README's commands need, and only that.

Both scripts run against stand-in interpreters that log how they are called, so nothing is installed here.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def stub(path: Path, body: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(0o755)


def run_sh(tmp_path: Path, project_installed: bool) -> list[str]:
    """Run a copy of scripts/run.sh in ``tmp_path`` with a stand-in .venv; returns the pip calls it made."""
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "run.sh", tmp_path / "scripts" / "run.sh")
    log = tmp_path / "calls.log"
    venv = tmp_path / ".venv" / "bin"
    # the project's own interpreter answers every check; "-" (a script on stdin) is the installed-check
    check = "" if project_installed else 'if [ "$1" = "-" ]; then exit 1; fi\n'
    stub(venv / "python", f"{check}exec {sys.executable} \"$@\"\n")
    stub(venv / "pip", f'echo "pip $*" >> {log}\n')
    stub(venv / "maskinv-backend", f'echo "backend $*" >> {log}\n')
    subprocess.run(["bash", "scripts/run.sh", "--port", "1"], cwd=tmp_path, check=True, timeout=120)
    calls = log.read_text().splitlines()
    assert calls[-1] == "backend --port 1"
    return [c for c in calls if c.startswith("pip")]


def test_run_sh_does_not_reinstall_an_installed_project(tmp_path):
    assert run_sh(tmp_path, project_installed=True) == []


def test_run_sh_installs_a_missing_project(tmp_path):
    assert run_sh(tmp_path, project_installed=False) == ["pip install -q -e .[worker,backend]"]


def test_label_studio_env_pins_sentry_sdk_below_3(tmp_path):
    log = tmp_path / "calls.log"
    venv = tmp_path / "venv-ls"
    stub(venv / "bin" / "python", f'echo "$*" >> {log}\n'
                                  'case "$*" in *"import label_studio"*) echo 1.23.2;; esac\n')
    subprocess.run(["bash", str(ROOT / "scripts" / "label_studio_env.sh")], check=True, timeout=60,
                   env={"PATH": "/usr/bin:/bin", "LS_VENV": str(venv)})
    installs = [c for c in log.read_text().splitlines() if c.startswith("-m pip install")]
    (label_studio,) = [c for c in installs if "label-studio==" in c]
    assert "sentry-sdk>=2.16.0,<3" in label_studio.split()
