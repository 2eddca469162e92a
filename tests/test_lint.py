"""One formatter and linter config for the whole repo (ruff, pyproject.toml): the tree is clean under both."""

import shutil
import subprocess
import sys
from pathlib import Path

from conftest import REPO


def _ruff() -> list[str]:
    local = Path(sys.executable).parent / "ruff"
    return [str(local)] if local.exists() else [shutil.which("ruff") or "ruff"]


def test_ruff_check_and_format_are_clean():
    for args in (["check", "."], ["format", "--check", "."]):
        done = subprocess.run(_ruff() + args, cwd=REPO, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
