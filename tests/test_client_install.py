"""The client installs alone: `pip install "fhe-bento[client]"` into a fresh venv gives `fhe_bento.client`
without BentoML, FastAPI or boto3 and without top-level `client`/`service` packages, and it predicts
against a served model. The install itself (harness/client_venv.py) runs while the other tests do."""

from __future__ import annotations

import json
import subprocess

import numpy as np
from conftest import LOGREG

HANG_GUARD = 600  # seconds: only stops a broken client from hanging the suite

PREDICT = f"""
import importlib.util, json, sys
import numpy as np
present = [name for name in ("bentoml", "fastapi", "boto3", "client", "service", "runners", "protocol")
          if importlib.util.find_spec(name) is not None]
from fhe_bento.client import FHEClient
url, rows, cache = sys.argv[1:]
model = FHEClient(url, cache_dir=cache, progress=False).model("{LOGREG}")
print(json.dumps({{"present": present, "labels": model.predict(np.load(rows)).tolist()}}))
"""


def test_the_client_extra_installs_alone_and_predicts(client_python, server, demo, tmp_path):
    x = demo.x_test[:3]
    np.save(tmp_path / "rows.npy", x)
    done = subprocess.run(
        [client_python, "-c", PREDICT, server.url, str(tmp_path / "rows.npy"), str(tmp_path / "cache")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=HANG_GUARD,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    assert answer["present"] == []
    assert answer["labels"] == demo.clear_predict(LOGREG, x).tolist()
