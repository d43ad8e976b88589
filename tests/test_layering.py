"""The package layout static tools see, and the import layering of pyproject.toml's import-linter
contracts (docs/architecture.md), checked on the real tree."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PRODUCT = (
    "protocol",
    "checks",
    "contract",
    "keys",
    "models",
    "runtime",
    "client",
    "service",
    "runners",
    "modelkit",
)


def test_the_package_extends_no_path_at_run_time():
    tree = ast.parse((ROOT / "fhe_bento" / "__init__.py").read_text())
    assert [node for node in tree.body if not isinstance(node, ast.Expr)] == []  # a docstring, nothing else
    for folder in PRODUCT:
        link = ROOT / "fhe_bento" / folder
        assert link.is_symlink() and link.readlink() == Path("..", folder)


@pytest.mark.parametrize("name", ["tests", "harness", "bench", "fhe_bento", "scripts"])
def test_only_the_product_is_importable_under_fhe_bento(name):
    probe = f"import importlib.util as u; print(u.find_spec('fhe_bento.{name}') is None)"
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "True", result.stdout + result.stderr


def test_import_contracts_hold():
    lint = Path(sys.executable).parent / "lint-imports"
    result = subprocess.run(
        [str(lint), "--no-cache", "--config", str(ROOT / "pyproject.toml")],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "8 kept, 0 broken" in result.stdout, result.stdout
    analyzed = int(re.search(r"Analyzed (\d+) files", result.stdout).group(1))
    assert analyzed >= len(list(ROOT.glob("*/*.py"))) // 2, result.stdout  # the product was really read


# (with what makes or uses TFHE-rs radix keys: concrete-ml-extensions', and the keygen of concrete's bridge)
DECRYPTING_NAMES = {
    "FHEModelClient",
    "Client",
    "keygen",
    "generate_private_and_evaluation_keys",
    "keygen_radix",
    "decrypt_radix",
    "keygen_with_initial_keys",
}


def _is_client(module: str) -> bool:
    return module == "fhe_bento.client" or module.startswith("fhe_bento.client.")


@pytest.mark.parametrize("package", ["service", "runners", "keys", "checks", "models", "contract", "runtime"])
def test_server_code_never_touches_decryption(package):
    """service/ and runners/ must not name anything that can hold a private key or decrypt."""
    offenders = []
    for path in (ROOT / package).glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom):
                names = [alias.name for alias in node.names]
                # fhe-bento's client package holds private keys and decrypts: the server never imports it.
                names += ["client package"] if _is_client(node.module or "") else []
            elif isinstance(node, ast.Import):
                names = ["client package" for alias in node.names if _is_client(alias.name)]
            elif isinstance(node, ast.Attribute):
                names = [node.attr]
            elif isinstance(node, ast.Name):
                names = [node.id]
            offenders += [
                f"{path.name}:{node.lineno} {n}" for n in names if n in DECRYPTING_NAMES | {"client package"}
            ]
    assert not offenders
