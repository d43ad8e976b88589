"""`python -m harness.client_venv DEST`: a fresh venv in DEST/venv with `fhe-bento[client]` installed from
a copy of this checkout (DEST/source, so that the build writes nothing into the checkout). Prints the
venv's python."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from harness.devserver import ROOT

# The product's folders: each is `fhe_bento/<folder>`, a symlink to the top-level folder (fhe_bento/__init__.py).
PRODUCT_FOLDERS = tuple(sorted(p.name for p in (ROOT / "fhe_bento").iterdir() if p.is_symlink()))
SOURCES = ("pyproject.toml", "README.md", "bentofile.yaml", "docker", "fhe_bento", *PRODUCT_FOLDERS)


def copy_sources(source: Path) -> Path:
    """The files a build reads, copied to `source` with the symlinks as they are (a build writes beside them)."""
    source.mkdir(parents=True)
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(
                ROOT / name, source / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__")
            )
        else:
            shutil.copy(ROOT / name, source / name)
    return source


def install_client(dest: Path) -> Path:
    source = copy_sources(dest / "source")
    venv = dest / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    # --no-compile: byte-compiling torch and the rest is most of an install's time, and proves nothing here.
    subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--no-compile", f"{source}[client]"],
        check=True,
        stdout=sys.stderr,
    )
    return python


if __name__ == "__main__":
    print(install_client(Path(sys.argv[1])))
