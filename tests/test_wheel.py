"""The wheel carries the checkout's layout, and the SageMaker image builds from a wheel install: the
bento is built from the installed package alone, away from the checkout."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from harness.client_venv import PRODUCT_FOLDERS, copy_sources

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel_site(tmp_path_factory) -> Path:
    """The wheel built from this checkout, unpacked as an install would lay it out."""
    out = tmp_path_factory.mktemp("wheel")
    source = copy_sources(out / "source")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(out),
            str(source),
        ],
        check=True,
        cwd=out,
    )
    (wheel,) = out.glob("fhe_bento-*.whl")
    site = out / "site"
    zipfile.ZipFile(wheel).extractall(site)
    return site


def test_the_wheel_holds_the_product_packages_and_nothing_else(wheel_site):
    packages = {p.parent.relative_to(wheel_site).as_posix() for p in wheel_site.rglob("__init__.py")}
    assert packages == {"fhe_bento", *(f"fhe_bento/{folder}" for folder in PRODUCT_FOLDERS)}
    assert {"protocol", "client", "service", "runners", "keys", "runtime"} <= set(PRODUCT_FOLDERS)
    assert (wheel_site / "fhe_bento" / "runtime" / "settings.py").is_file()
    assert not any(p.is_symlink() for p in wheel_site.rglob("*"))
    assert (wheel_site / "fhe_bento" / "modelkit" / "bentofile.yaml").read_text() == (
        ROOT / "bentofile.yaml"
    ).read_text()


def test_the_bento_builds_from_a_wheel_install(wheel_site, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(wheel_site), "BENTOML_HOME": str(tmp_path / "bentoml")}
    probe = (
        "import fhe_bento.modelkit.image as i; print(i.__file__); print(i.build_bento('python:3.11-slim'))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    where, version = done.stdout.split()[-2:]
    assert where.startswith(str(wheel_site))  # the wheel's copy, not the checkout's
    bento = tmp_path / "bentoml" / "bentos" / "fhe_bento" / version
    sources = {p.relative_to(bento / "src").as_posix() for p in (bento / "src").rglob("*.py")}
    assert {
        "fhe_bento/service/app.py",
        "fhe_bento/runtime/settings.py",
        "fhe_bento/runners/supervisor.py",
    } <= sources
    assert not any(s.startswith(("fhe_bento/client/", "fhe_bento/modelkit/")) for s in sources)
    assert "FHE_BENTO_MODEL_DIR" in (bento / "bento.yaml").read_text()
