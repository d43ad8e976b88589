"""Shared fixtures: the demo models (trained once per run) and a real `bentoml serve` subprocess."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from harness.session_dir import open_session_dir

# BentoML reads its home when first used: point it at a throwaway store before anything imports it.
_SESSION_DIR = open_session_dir()
os.environ["BENTOML_HOME"] = str(_SESSION_DIR / "bentoml")
os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")

from harness.background import BackgroundCommand  # noqa: E402 (after BENTOML_HOME is set)
from harness.devserver import ROOT  # noqa: E402

LOGREG = "breast-cancer-logreg"
# A tiny tree ensemble (3 trees of depth 2, 3 bits): a real bootstrapped circuit with an evaluation key, at
# about 0.8 s and 19 MB of key against the demo XGB's 5.4 s and 59 MB (measured on these machines: tiny trees for fast
# tests). The demo XGB itself (REALISTIC_XGB) serves the tests that need rows to take seconds.
XGB = "tiny-xgb"
REALISTIC_XGB = "breast-cancer-xgb"
os.environ["FHE_BENTO_MODELS"] = f"{XGB}:latest,{LOGREG}:latest"  # what a server serves unless a test says


@dataclass
class Demo:
    models: dict  # name -> fitted, compiled concrete-ml estimator (the clear reference)
    x_test: np.ndarray
    dev_dirs: dict  # name -> FHEModelDev folder

    def clear_predict(self, name: str, x: np.ndarray) -> np.ndarray:
        return self.models[name].predict(x, fhe="disable")


def imported_spec(name: str):
    """The served description (ModelSpec) of a demo model, as the server loads it from the model store."""
    import bentoml

    from fhe_bento.models.repository import load_folder

    return load_folder(Path(bentoml.models.get(f"{name}:latest").path), name)


REAL_XGB_CIPHERTEXT = "a real XGB ciphertext"  # a test parameter that `real_body` replaces


def real_body(body, demo: Demo, key_dir: Path) -> bytes:
    """`body`, or for REAL_XGB_CIPHERTEXT a ciphertext of the XGB demo model under a throwaway key: a
    well-formed row reaches the checks that come after the ciphertext's own (the key lookup)."""
    if body != REAL_XGB_CIPHERTEXT:
        return body
    from concrete.ml.deployment import FHEModelClient

    client = FHEModelClient(str(demo.dev_dirs[XGB]), key_dir=str(key_dir))
    return client.quantize_encrypt_serialize(demo.x_test[:1])


def assert_error(response, status: int, code: str) -> None:
    """The JSON error shape (docs/http-api.md, "Errors"), with this status and code."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and body["error"]["code"] == code
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]


def assert_documented_rejection(response, expected: tuple[int, str] | None = None) -> str:
    """A 4xx in the JSON error shape whose code is one of the documented ones, with its documented status;
    with `expected`, exactly that (status, code), as a test's oracle worked it out. Returns the code."""
    from fhe_bento.protocol.errors import ERROR_CODES

    assert 400 <= response.status_code < 500, (expected, response.status_code, response.text[:300])
    code = response.json()["error"]["code"]
    assert_error(response, ERROR_CODES.get(code, -1), code)
    if expected is not None:
        assert (response.status_code, code) == expected, (expected, response.text[:300])
    return code


# fixture name -> the slow set-up behind it: the image (scripts/build-image: buildah from a locally made
# Debian base) and a fresh venv with only the client extra (harness/client_venv.py)
BACKGROUND = {
    "image": BackgroundCommand("build-image", [str(ROOT / "scripts" / "build-image")], _SESSION_DIR),
    "client_python": BackgroundCommand(
        "client-venv",
        [sys.executable, "-m", "harness.client_venv", str(_SESSION_DIR / "client-venv")],
        _SESSION_DIR,
    ),
}


BACKGROUND_TIMEOUT = 3600  # seconds for a test that waits for a background set-up (pyproject: the others)
UNIT_DIR = Path(__file__).parent / "unit"


def pytest_collection_modifyitems(session, config, items) -> None:
    """Mark the tests of tests/unit/ `unit`; start the slow set-up that the collected tests need, and run
    those tests last: the set-up has the rest of the run to finish in."""
    for item in items:
        if UNIT_DIR in Path(item.path).parents:
            item.add_marker(pytest.mark.unit)
    needs = {item: BACKGROUND.keys() & set(item.fixturenames) for item in items}
    for item, needed in needs.items():
        if needed:
            item.add_marker(pytest.mark.timeout(BACKGROUND_TIMEOUT))
    for name in set().union(*needs.values()):
        BACKGROUND[name].start()
    items.sort(key=lambda item: bool(needs[item]))


def pytest_sessionfinish(session, exitstatus) -> None:
    for command in BACKGROUND.values():
        command.stop()


def _train_and_import(estimators: dict, demo: Demo | None = None) -> Demo:
    """Fit, compile and import `estimators` into the session's model store, adding them to `demo`."""
    from fhe_bento.modelkit.demo import save_dev_folder, train
    from fhe_bento.modelkit.importer import import_model

    models, data = train(estimators=estimators)
    demo = demo or Demo(models={}, x_test=data.x_test, dev_dirs={})
    for name, model in models.items():
        demo.models[name] = model
        demo.dev_dirs[name] = save_dev_folder(model, _SESSION_DIR / "dev" / name)
        import_model(demo.dev_dirs[name], name, classes=[int(c) for c in model.classes_])
    return demo


@pytest.fixture(scope="session")
def demo() -> Demo:
    """The logistic regression (no key) and the tiny XGB, in the model store."""
    from concrete.ml.sklearn import XGBClassifier

    from fhe_bento.modelkit.demo import SEED, demo_estimators

    tiny = XGBClassifier(n_bits=3, n_estimators=3, max_depth=2, random_state=SEED)
    return _train_and_import({LOGREG: demo_estimators()[LOGREG], XGB: tiny})


@pytest.fixture(scope="session")
def realistic_xgb(demo: Demo) -> str:
    """The demo XGB, added to the model store and to `demo`; returns its name."""
    from fhe_bento.modelkit.demo import demo_estimators

    _train_and_import({REALISTIC_XGB: demo_estimators()[REALISTIC_XGB]}, demo)
    return REALISTIC_XGB


@dataclass
class Versions:
    name: str
    tags: list[str]  # `name:version`, oldest first
    models: dict[str, Any]  # tag -> its fitted, compiled estimator (the clear reference)
    dev_dirs: dict[str, Path]  # tag -> its FHEModelDev folder


@pytest.fixture(scope="session")
def logreg_versions(demo: Demo) -> Versions:
    """Two versions of one model name in the model store, with different client specs (n_bits 6, then 8):
    a retrained model, as a model owner imports it again."""
    from concrete.ml.sklearn import LogisticRegression

    from fhe_bento.modelkit.demo import save_dev_folder, train
    from fhe_bento.modelkit.importer import import_model

    name, versions = "versioned-logreg", Versions("versioned-logreg", [], {}, {})
    for n_bits in (6, 8):
        models, _ = train(estimators={name: LogisticRegression(n_bits=n_bits)})
        folder = save_dev_folder(models[name], _SESSION_DIR / "dev" / f"{name}-{n_bits}")
        tag = str(import_model(folder, name, classes=[int(c) for c in models[name].classes_]))
        versions.tags.append(tag)
        versions.models[tag], versions.dev_dirs[tag] = models[name], folder
    return versions


@dataclass
class Training:
    name: str
    estimator: Any  # the compiled SGDClassifier: its training circuit is the clear reference
    dev_dir: Path  # its FHEModelDev folder, saved with mode="training"
    data: Any  # the demo split on the training features (modelkit/demo.py, training_data)


@pytest.fixture(scope="session")
def training() -> Training:
    """The training demo (an SGD step of concrete-ml's encrypted training), in the model store."""
    from fhe_bento.modelkit.demo import TRAINING_NAME, compile_training, save_dev_folder, training_data
    from fhe_bento.modelkit.importer import import_model

    estimator = compile_training()
    folder = save_dev_folder(estimator, _SESSION_DIR / "dev" / TRAINING_NAME, mode="training")
    import_model(folder, TRAINING_NAME)
    return Training(TRAINING_NAME, estimator, folder, training_data())


@dataclass
class TfheRs:
    name: str
    model: Any  # the compiled XGBClassifier (ciphertext_format="tfhe-rs"): the clear reference
    dev_dir: Path  # its FHEModelDev folder
    x_test: np.ndarray  # held-out rows on its four features


@pytest.fixture(scope="session")
def tfhe_rs() -> TfheRs:
    """The TFHE-rs demo (an 8-bit XGB whose rows are TFHE-rs radix ciphertexts), in the model store."""
    from fhe_bento.modelkit.demo import TFHE_RS_NAME, compile_tfhe_rs, save_dev_folder
    from fhe_bento.modelkit.importer import import_model

    model, data = compile_tfhe_rs()
    folder = save_dev_folder(model, _SESSION_DIR / "dev" / TFHE_RS_NAME)
    import_model(folder, TFHE_RS_NAME, classes=[int(c) for c in model.classes_])
    return TfheRs(TFHE_RS_NAME, model, folder, data.x_test)


@pytest.fixture(scope="session")
def in_process(demo: Demo):
    """The operations a served worker builds, around a real `Runner` in this process (its engine processes
    and concrete): what in-process route tests inject into an app."""
    from fhe_bento.service.settings import ServiceSettings

    ops = operations(ServiceSettings())
    yield ops
    ops.runner.shutdown()


def operations(settings: Any) -> Any:
    """The `Operations` a served worker builds from `settings`, around a real `Runner` in this process (shut
    it down with `ops.runner.shutdown()`)."""
    from fhe_bento.models.repository import default_model, load_specs
    from fhe_bento.runners.runner import Runner
    from fhe_bento.service.admission import Admission
    from fhe_bento.service.operations import Operations

    specs = load_specs(settings)
    admission = Admission(
        settings.max_queue_rows, settings.request_timeout, parallelism=2, batch_parallelism=1
    )
    return Operations(Runner(settings, specs), specs, default_model(settings, specs), settings, admission)


@contextmanager
def serve_in_process(app: Any, ops: Any) -> Iterator[Any]:
    """`app` through Starlette's TestClient, with `ops` injected (a FastAPI dependency override), once the
    in-process engine has loaded its models."""
    from fastapi.testclient import TestClient

    from fhe_bento.service.operations import current_operations

    app.dependency_overrides[current_operations] = lambda: ops
    try:
        with TestClient(app) as client:
            deadline = time.monotonic() + 300
            while client.get("/ping").status_code != 200:  # the engine loads its models
                assert time.monotonic() < deadline, "the in-process engine never became ready"
                time.sleep(0.2)
            yield client
    finally:
        app.dependency_overrides.clear()


@contextmanager
def served_app(settings: Any) -> Iterator[tuple[Any, Any]]:
    """The models of `settings` served in process: the service's app around a real `Runner` (its engine
    processes and concrete), through Starlette's TestClient. Yields the client and the operations."""
    from fhe_bento.models.repository import default_model, load_specs
    from fhe_bento.runners.runner import Runner
    from fhe_bento.service.admission import Admission
    from fhe_bento.service.app import build_app
    from fhe_bento.service.operations import Operations

    specs = load_specs(settings)
    runner = Runner(settings, specs)
    admission = Admission(
        settings.max_queue_rows, settings.request_timeout, parallelism=2, batch_parallelism=1
    )
    ops = Operations(runner, specs, default_model(settings, specs), settings, admission)
    try:
        with serve_in_process(build_app(settings), ops) as http:
            yield http, ops
    finally:
        runner.shutdown()


@pytest.fixture(scope="session")
def server_workdir() -> Path:
    path = _SESSION_DIR / "server"
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def server(demo: Demo, server_workdir: Path):
    from harness.devserver import Server

    srv = Server(
        server_workdir,
        {
            "FHE_BENTO_MODELS": f"{XGB}:latest,{LOGREG}:latest",
            "FHE_BENTO_KEY_STORE": (server_workdir / "keys").as_uri(),
            "FHE_BENTO_STAGING_DIR": str(server_workdir / "staging"),
            "FHE_BENTO_WORKERS": "2",
            "FHE_BENTO_MAX_KEY_BYTES": str(64 * 1024 * 1024),
            "FHE_BENTO_BODY_IDLE_SECONDS": "5",
        },
    )
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def client_cache() -> Path:
    return _SESSION_DIR / "client-cache"


@pytest.fixture(scope="session")
def moto_url():
    """moto in server mode on 127.0.0.1, with boto3 (here and in child processes) pointed at it."""
    from harness.devserver import MotoServer

    moto = MotoServer()
    saved = {name: os.environ.get(name) for name in moto.env()}
    os.environ.update(moto.env())
    yield moto.url
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    moto.stop()


@pytest.fixture(scope="session")
def image():
    """The real image, built once per run."""
    import subprocess

    name = BACKGROUND["image"].result(timeout=3000)
    yield name
    subprocess.run(["podman", "rmi", "-f", name], capture_output=True)
    subprocess.run(["podman", "image", "prune", "-f"], capture_output=True)


@pytest.fixture(scope="session")
def client_python() -> str:
    """The python of a fresh venv holding only `fhe-bento[client]` (harness/client_venv.py)."""
    return BACKGROUND["client_python"].result(timeout=1800)


@pytest.fixture(scope="session")
def model_dir(demo, tmp_path_factory) -> Path:
    """/opt/ml/model as SageMaker lays it out from model.tar.gz: one readable folder per model."""
    from fhe_bento.modelkit.sagemaker_deploy import model_folders_from_store, write_model_dir

    folders = model_folders_from_store([f"{XGB}:latest", f"{LOGREG}:latest"])
    return write_model_dir(folders, tmp_path_factory.mktemp("opt-ml-model"))
