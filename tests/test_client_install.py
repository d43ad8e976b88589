"""The client installs alone: `pip install "fhe-bento[client]"` into a fresh venv gives `fhe_bento.client`
without BentoML, FastAPI or boto3 and without top-level `client`/`service` packages, and it predicts
against a served model."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from conftest import LOGREG

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "fhe_bento", "protocol", "client", "service", "runners", "modelkit")
HANG_GUARD = 1800  # seconds: only stops a broken install from hanging the suite

PREDICT = """
import importlib.util, json, sys
import numpy as np
present = [name for name in ("bentoml", "fastapi", "boto3", "client", "service", "runners", "protocol")
          if importlib.util.find_spec(name) is not None]
from fhe_bento.client import FHEClient
url, rows, cache = sys.argv[1:]
model = FHEClient(url, cache_dir=cache, progress=False).model("%s")
print(json.dumps({"present": present, "labels": model.predict(np.load(rows)).tolist()}))
""" % LOGREG


def test_the_client_extra_installs_alone_and_predicts(server, demo, tmp_path):
    source = tmp_path / "source"  # a copy, so that the build writes nothing into the checkout
    source.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(ROOT / name, source / name)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    # --no-compile: byte-compiling torch and the rest is most of an install's time, and proves nothing here.
    subprocess.run([python, "-m", "pip", "install", "--quiet", "--no-compile", f"{source}[client]"], check=True,
                   timeout=HANG_GUARD)
    x = demo.x_test[:3]
    np.save(tmp_path / "rows.npy", x)
    done = subprocess.run([python, "-c", PREDICT, server.url, str(tmp_path / "rows.npy"), str(tmp_path / "cache")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=HANG_GUARD)
    assert done.returncode == 0, done.stderr[-3000:]
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    assert answer["present"] == []
    assert answer["labels"] == demo.clear_predict(LOGREG, x).tolist()
