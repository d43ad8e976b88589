"""`RemoteModel.fit(X, y, epochs=, seed=)`: training in FHE on a server's training session
(docs/training.md).

The data owner's side of concrete-ml's encrypted SGD: keys made here (the evaluation key uploaded once),
initial weights encrypted here, then one request per batch; the server holds the encrypted weights between
steps and never sees a batch, a weight or a loss in the clear. At the end the weights are fetched,
decrypted and dequantized here, and returned as a scikit-learn `LogisticRegression` (the same model:
`sigmoid(X @ coef_.T + intercept_)`).

Exactly once: the batches are a function of (X, y, seed, epochs) alone, step by step, so a step can be sent
again after a dropped connection, a restart or a new process, and the server applies it once. A session
in progress is recorded in the model's key folder (`trainings/<digest>.json`): `fit` with the same data,
seed and epochs carries it on from the server's step. Over an asynchronous SageMaker endpoint, whose
invocations may take minutes, a request carries the rest of an epoch instead of one step.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import httpx
import numpy as np
from tqdm.auto import tqdm

from fhe_bento.client.answers import FHEServiceError

if TYPE_CHECKING:
    from sklearn.linear_model import LogisticRegression

    from fhe_bento.client.remote_model import RemoteModel

log = logging.getLogger("fhe_bento.client")
T = TypeVar("T")
RECONNECT_WAIT = 2.0  # seconds between two attempts while the server cannot be reached


class Schedule:
    """Which rows make step k: each epoch is a permutation of the rows (seeded by (seed, epoch)) cut into
    full batches; the rows left over in an epoch wait for the next one's permutation."""

    def __init__(self, n_rows: int, batch_size: int, epochs: int, seed: int) -> None:
        if n_rows < batch_size:
            raise ValueError(f"training takes batches of {batch_size} rows: give at least {batch_size} rows")
        self.batch_size, self.seed = batch_size, seed
        self.n_rows = n_rows
        self.per_epoch = n_rows // batch_size
        self.steps = self.per_epoch * epochs

    def rows(self, step: int) -> np.ndarray:
        epoch, index = divmod(step, self.per_epoch)
        order = np.random.default_rng([self.seed, epoch]).permutation(self.n_rows)
        return order[index * self.batch_size : (index + 1) * self.batch_size]


def initial_weights(
    n_features: int, parameters_range: tuple[float, float], seed: int
) -> tuple[np.ndarray, ...]:
    """Weights and bias drawn uniformly in the circuit's parameter range, as concrete-ml's own fit does."""
    rng = np.random.default_rng(seed)
    low, high = parameters_range
    return rng.uniform(low, high, (1, n_features, 1)), rng.uniform(low, high, (1, 1, 1))


def classifier(weights: np.ndarray, bias: np.ndarray) -> LogisticRegression:
    """The trained binary classifier as scikit-learn's own: `predict`, `predict_proba`, `score`."""
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression()
    model.coef_ = np.asarray(weights, dtype=np.float64).reshape(1, -1)
    model.intercept_ = np.asarray(bias, dtype=np.float64).reshape(1)
    model.classes_ = np.array([0, 1])
    return model


class Trainer:
    """One `fit` of a remote training circuit."""

    def __init__(self, model: RemoteModel, reconnect_seconds: float) -> None:
        info = model.info
        if not info.get("training"):
            raise ValueError(
                f"{model.name} is not a training circuit: fit needs a model imported from "
                'FHEModelDev(...).save(mode="training")'
            )
        self.model = model
        self.info = info
        self.reconnect_seconds = reconnect_seconds

    def fit(self, x: np.ndarray, y: np.ndarray, epochs: int, seed: int) -> LogisticRegression:
        x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64).reshape(-1)
        if x.ndim != 2 or x.shape[1] != self.info["n_features"] or len(x) != len(y):
            raise ValueError(
                f"{self.model.name} trains on rows of {self.info['n_features']} features with one label each, "
                f"got X {x.shape} and y {y.shape}"
            )
        if not set(np.unique(y)) <= {0.0, 1.0}:
            raise ValueError("concrete-ml's encrypted training is binary: labels are 0 and 1")
        schedule = Schedule(len(x), self.info["batch_size"], epochs, seed)
        record = self._record_path(x, y, epochs, seed)
        training_id, step = self._resume_or_start(record, seed)
        whole_epochs = self.model.transport.whole_epochs
        with tqdm(
            total=schedule.steps,
            initial=step,
            unit="step",
            desc=f"train {self.model.name}",
            disable=not self.model.progress,
        ) as bar:
            while step < schedule.steps:
                if whole_epochs:  # the rest of this epoch, in one request
                    end = (step // schedule.per_epoch + 1) * schedule.per_epoch
                    batches = [self._batch(x, y, schedule, s) for s in range(step, end)]
                    step = self._epoch(training_id, step, batches)
                else:
                    step = self._step(training_id, step, self._batch(x, y, schedule, step))
                bar.n = step
                bar.refresh()
        weights, bias = self._final_weights(training_id, schedule.steps)
        self._call(lambda: self.model.transport.delete_training(self.model.pin.tag, training_id))
        record.unlink(missing_ok=True)
        return classifier(weights, bias)

    def _record_path(self, x: np.ndarray, y: np.ndarray, epochs: int, seed: int) -> Path:
        digest = hashlib.sha256()
        for part in (x.tobytes(), y.tobytes(), f"{x.shape}:{epochs}:{seed}".encode()):
            digest.update(part)
        folder = self.model.folder / "trainings"
        folder.mkdir(mode=0o700, exist_ok=True)
        return folder / f"{digest.hexdigest()[:32]}.json"

    def _resume_or_start(self, record: Path, seed: int) -> tuple[str, int]:
        """The session this fit recorded and its step on the server, or a new one at step 0."""
        key_id = self.model.ensure_key()
        name = self.model.pin.tag
        if record.is_file():
            training_id = json.loads(record.read_text())["training_id"]
            try:
                status = self._call(lambda: self.model.transport.training_status(name, training_id))
                log.info("training %s of %s resumes at step %d", training_id, name, status["step"])
                return training_id, int(status["step"])
            except FHEServiceError as exc:
                if exc.code != "unknown_training":
                    raise
                log.warning("training %s of %s is gone from the server; starting over", training_id, name)
        weights, bias = initial_weights(self.info["n_features"], tuple(self.info["parameters_range"]), seed)
        _, _, encrypted_w, encrypted_b = self.model.fhe.quantize_encrypt_serialize(None, None, weights, bias)
        answer = self._call(
            lambda: self.model.transport.start_training(name, key_id, [encrypted_w, encrypted_b])
        )
        record.write_text(json.dumps({"training_id": answer["training_id"], "model": name}))
        return answer["training_id"], 0

    def _batch(self, x: np.ndarray, y: np.ndarray, schedule: Schedule, step: int) -> list[bytes]:
        """Step `step`'s rows, encrypted: [x, y]."""
        rows = schedule.rows(step)
        batch_x = x[rows].reshape(1, schedule.batch_size, -1)
        batch_y = y[rows].reshape(1, schedule.batch_size, 1)
        encrypted_x, encrypted_y, _, _ = self.model.fhe.quantize_encrypt_serialize(
            batch_x, batch_y, None, None
        )
        return [encrypted_x, encrypted_y]

    def _epoch(self, training_id: str, step: int, batches: list[list[bytes]]) -> int:
        """Send steps `step`, `step + 1`, ... as one epoch request; the session's step after it. The server
        applies each once, and a resent epoch goes on from where an earlier attempt stopped."""
        name = self.model.pin.tag
        answer = self._call(lambda: self.model.transport.training_epoch(name, training_id, step, batches))
        return int(answer["step"])

    def _step(self, training_id: str, step: int, batch: list[bytes]) -> int:
        """Send step `step`; the session's step after it. A 409 whose session is already past this step
        means an earlier attempt of it was applied (its answer was lost): carry on from there."""
        name = self.model.pin.tag
        try:
            answer = self._call(lambda: self.model.transport.training_step(name, training_id, step, batch))
            return int(answer["step"])
        except FHEServiceError as exc:
            if exc.code != "step_conflict":
                raise
            status = self._call(lambda: self.model.transport.training_status(name, training_id))
            if int(status["step"]) in (step, step + 1):  # this very step is running or was applied
                if int(status["step"]) == step:
                    time.sleep(RECONNECT_WAIT)
                return int(status["step"])
            raise

    def _final_weights(self, training_id: str, steps: int) -> tuple[np.ndarray, np.ndarray]:
        name = self.model.pin.tag
        (weights, bias), step = self._call(lambda: self.model.transport.training_weights(name, training_id))
        if step != steps:
            raise FHEServiceError(0, "step_conflict", f"the session is at step {step}, not {steps}")
        self.model.key_folder.load_private_key()
        decrypted_w, decrypted_b = self.model.fhe.deserialize_decrypt_dequantize(weights, bias)
        return np.asarray(decrypted_w), np.asarray(decrypted_b)

    def _call(self, call: Callable[[], T]) -> T:
        """`call` under the model's retry policy, and again while the server cannot be reached (a restart,
        a dropped connection) for up to `reconnect_seconds`."""
        deadline = time.monotonic() + self.reconnect_seconds
        while True:
            try:
                return self.model.retry(call)
            except httpx.TransportError as exc:
                if time.monotonic() > deadline:
                    raise
                log.info("server unreachable (%s); trying again", type(exc).__name__)
                time.sleep(RECONNECT_WAIT)


def fit(
    model: RemoteModel, x: Any, y: Any, epochs: int, seed: int, reconnect_seconds: float
) -> LogisticRegression:
    return Trainer(model, reconnect_seconds).fit(x, y, epochs, seed)
