"""The embedded demo models, trained and compiled from scikit-learn's bundled breast-cancer data, and the
hybrid demo (`modelkit/tinygpt.py`).

No download: `load_breast_cancer` ships inside scikit-learn, and the hybrid demo's weights are random. The
split and seeds are fixed, so the tests can rebuild the same clear models to compare predictions against.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

SEED = 42


@dataclass
class DemoData:
    x_train: np.ndarray
    x_test: np.ndarray
    y_train: np.ndarray
    y_test: np.ndarray


def load_data() -> DemoData:
    from sklearn.datasets import load_breast_cancer
    from sklearn.model_selection import train_test_split

    x, y = load_breast_cancer(return_X_y=True)
    return DemoData(*train_test_split(x, y, test_size=0.2, random_state=SEED, stratify=y))


def demo_estimators() -> dict[str, Any]:
    """Name -> unfitted concrete-ml estimator. The XGB model bootstraps, so it needs an evaluation key."""
    from concrete.ml.sklearn import LogisticRegression, XGBClassifier

    return {
        "breast-cancer-logreg": LogisticRegression(n_bits=8),
        "breast-cancer-xgb": XGBClassifier(n_bits=6, n_estimators=10, max_depth=3, random_state=SEED),
    }


def train(
    names: list[str] | None = None, estimators: dict[str, Any] | None = None
) -> tuple[dict[str, Any], DemoData]:
    """Fit and compile `estimators` (default: the demo estimators) on the demo data, all or those named."""
    data = load_data()
    models = {}
    for name, estimator in (estimators or demo_estimators()).items():
        if names is None or name in names:
            estimator.fit(data.x_train, data.y_train)
            estimator.compile(data.x_train)
            models[name] = estimator
    return models, data


def save_dev_folder(model: Any, folder: Path, mode: str = "inference") -> Path:
    from concrete.ml.deployment import FHEModelDev

    FHEModelDev(str(folder), model).save(mode=mode)
    return folder


# Four of the breast-cancer features (worst radius, texture, smoothness, concave points): the demos whose
# cost grows with every feature (training steps, TFHE-rs radix rows) keep to these.
FOUR_FEATURES = (20, 21, 24, 27)


def four_features() -> DemoData:
    """The demo split on FOUR_FEATURES."""
    data = load_data()
    columns = list(FOUR_FEATURES)
    return DemoData(data.x_train[:, columns], data.x_test[:, columns], data.y_train, data.y_test)


# --- the training demo ------------------------------------------------------------------------------
TRAINING_NAME = "breast-cancer-training"
# FOUR_FEATURES scaled to [-1, 1]: a training circuit's cost and key grow with its features, batch and
# bits. With a batch of 4 and 5-bit training values, a step takes about 2 s of FHE on these machines and
# the evaluation key is 141 MB.
TRAINING_BATCH = 4
TRAINING_BITS = 5
PARAMETERS_RANGE = (-1.0, 1.0)


def training_data() -> DemoData:
    """The demo split, on the training demo's features scaled to [-1, 1] by the training part's range."""
    data = four_features()
    low, high = data.x_train.min(axis=0), data.x_train.max(axis=0)

    def scale(x: np.ndarray) -> np.ndarray:
        return np.clip((x - low) / (high - low) * 2 - 1, -1, 1)

    return DemoData(scale(data.x_train), scale(data.x_test), data.y_train, data.y_test)


def training_estimator(max_iter: int = 1) -> Any:
    """concrete-ml's encrypted-training classifier of the demo: one SGD step is its training circuit."""
    from concrete.ml.sklearn import SGDClassifier

    estimator = SGDClassifier(
        random_state=SEED, max_iter=max_iter, fit_encrypted=True, parameters_range=PARAMETERS_RANGE
    )
    # Not constructor arguments in concrete-ml 1.9: the batch of one step and its training precision.
    estimator.batch_size = TRAINING_BATCH
    estimator.n_bits_training = TRAINING_BITS
    return estimator


def compile_training() -> Any:
    """The training demo, compiled: fitting in the clear builds its training circuit."""
    data = training_data()
    estimator = training_estimator()
    estimator.fit(data.x_train, data.y_train, fhe="disable")
    return estimator


def build_and_import_training() -> str:
    """Compile the training demo, save its training circuit and import it; returns its tag."""
    from fhe_bento.modelkit.importer import import_model

    with tempfile.TemporaryDirectory(prefix="fhe-bento-demo-") as tmp:
        folder = save_dev_folder(compile_training(), Path(tmp) / TRAINING_NAME, mode="training")
        return str(import_model(folder, TRAINING_NAME))


# --- the TFHE-rs demo -------------------------------------------------------------------------------
TFHE_RS_NAME = "breast-cancer-xgb-tfhe-rs"


def compile_tfhe_rs() -> tuple[Any, DemoData]:
    """An XGBoost classifier compiled for TFHE-rs radix inputs and outputs (concrete-ml does that for 8-bit
    tree classifiers), on FOUR_FEATURES: a radix row costs 65,856 bytes a feature (263 KB here). A row takes
    about 2 s of FHE on these machines; the evaluation key is 126 MB."""
    from concrete.ml.sklearn import XGBClassifier

    data = four_features()
    model = XGBClassifier(n_bits=8, n_estimators=3, max_depth=2, random_state=SEED)
    model.fit(data.x_train, data.y_train)
    model.compile(data.x_train, ciphertext_format="tfhe-rs")
    return model, data


def build_and_import_tfhe_rs() -> str:
    """Compile the TFHE-rs demo, save and import it; returns its tag."""
    from fhe_bento.modelkit.importer import import_model

    model, _ = compile_tfhe_rs()
    with tempfile.TemporaryDirectory(prefix="fhe-bento-demo-") as tmp:
        folder = save_dev_folder(model, Path(tmp) / TFHE_RS_NAME)
        return str(import_model(folder, TFHE_RS_NAME, classes=[int(c) for c in model.classes_]))


def build_and_import(names: list[str] | None = None) -> list[str]:
    """Train, compile and import the demo models into the BentoML store; returns their tags."""
    return import_trained(train(names)[0])


def build_and_import_hybrid() -> str:
    """Compile the hybrid demo for its context sizes and import it; returns its tag."""
    from fhe_bento.modelkit import tinygpt
    from fhe_bento.modelkit.importer import import_model

    with tempfile.TemporaryDirectory(prefix="fhe-bento-demo-") as tmp:
        return str(import_model(tinygpt.compile_hybrid(Path(tmp) / tinygpt.NAME), tinygpt.NAME))


def import_trained(models: dict[str, Any]) -> list[str]:
    """Import fitted, compiled demo models into the BentoML store; returns their tags."""
    from fhe_bento.modelkit.importer import import_model

    tags = []
    with tempfile.TemporaryDirectory(prefix="fhe-bento-demo-") as tmp:
        for name, model in models.items():
            folder = save_dev_folder(model, Path(tmp) / name)
            tags.append(str(import_model(folder, name, classes=[int(c) for c in model.classes_])))
    return tags
