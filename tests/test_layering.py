"""The import layering of pyproject.toml's import-linter contracts holds (README, "How it is built").

The contracts name the installed packages (`fhe_bento.client`, ...), which in a checkout are the top-level
folders mapped into `fhe_bento`: so lint-imports reads a copy laid out as the installed package is.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRODUCT = ("protocol", "client", "service", "runners", "modelkit")


def test_import_contracts_hold(tmp_path):
    installed = tmp_path / "fhe_bento"
    shutil.copytree(ROOT / "fhe_bento", installed)
    for folder in PRODUCT:
        shutil.copytree(ROOT / folder, installed / folder)
    shutil.copytree(ROOT / "harness", tmp_path / "harness")
    lint = Path(sys.executable).parent / "lint-imports"
    result = subprocess.run(
        [str(lint), "--no-cache", "--config", str(ROOT / "pyproject.toml")],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "5 kept, 0 broken" in result.stdout, result.stdout
    analyzed = int(re.search(r"Analyzed (\d+) files", result.stdout).group(1))
    assert analyzed >= len(list(ROOT.glob("*/*.py"))) // 2, result.stdout  # the product was really read
