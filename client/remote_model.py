"""`RemoteModel`: one served model, as a data owner holding its own keys calls it. Rows are encrypted,
sent in batches on a thread pool (with progress bars), and their answers decrypted, in order; the
evaluation key is uploaded once, and again once if the server lost it. Nothing sent to the server holds
plaintext or a private key.

A model is pinned to the version whose client specs it holds (`Pin`): every request names
`name:version`, so a new default on the server changes nothing for it while its version is served. Once
that version is retired (410 `version_retired`), it pins the new default: new client specs, new keys
(uploaded once), one log line, and the rows of the refused batch encrypted again under them, so keys and
ciphertexts of two versions never meet.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm.auto import tqdm

from fhe_bento.client.answers import FHEServiceError
from fhe_bento.client.key_folder import KeyFolder
from fhe_bento.client.retry import RetryPolicy
from fhe_bento.protocol import keys

if TYPE_CHECKING:
    from sklearn.linear_model import LogisticRegression

    from fhe_bento.client.api import Transport

log = logging.getLogger("fhe_bento.client")


@dataclass
class Pin:
    """One version of the model, as this client holds it: what the server said of it, its client specs and
    keys, and the key id once registered."""

    tag: str  # what requests name: `name:version`, or the bare name where the server has no versions
    info: dict[str, Any]
    key_folder: KeyFolder
    key_id: str | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)


class RemoteModel:
    """One served model, as seen by a data owner holding its own keys."""

    def __init__(
        self,
        transport: Transport,
        name: str,
        cache_dir: Path,
        batch_size: int,
        concurrency: int,
        progress: bool,
        max_retries: int = 8,
    ) -> None:
        self.transport = transport
        self.name = name
        self.cache_dir = cache_dir
        self.batch_size = batch_size
        self.concurrency = concurrency
        self.progress = progress
        self.retry = RetryPolicy(max_retries)
        self._pin_lock = threading.Lock()
        self.pin = self._pinned(name)

    def _pinned(self, name: str) -> Pin:
        """The version `name` (`name` or `name:version`) names now: a bare name's default (a server
        without versions: the name itself)."""
        info = self.transport.get_model(name)
        tag = f"{info['name']}:{info['version']}" if "default_version" in info else name
        folder = KeyFolder(
            self.cache_dir, self.name, info["client_sha256"], lambda: self.transport.get_client_zip(tag)
        )
        return Pin(tag, info, folder)

    def _repin(self, retired: Pin) -> None:
        """`retired`'s version was retired: pin the current default (once, whichever thread saw it first)."""
        with self._pin_lock:
            if self.pin is retired:
                self.pin = self._pinned(retired.info["name"])
                log.warning(
                    "model %s: version %s is retired; now on %s (new client specs and keys, uploaded once)",
                    self.name,
                    retired.tag,
                    self.pin.tag,
                )

    @property
    def info(self) -> dict[str, Any]:
        return self.pin.info

    @property
    def key_folder(self) -> KeyFolder:
        return self.pin.key_folder

    @property
    def folder(self) -> Path:
        return self.pin.key_folder.path

    @property
    def fhe(self) -> Any:
        return self.pin.key_folder.fhe

    @property
    def max_retries(self) -> int:
        return self.retry.max_retries

    def evaluation_key(self) -> bytes:
        """The serialized evaluation key, generated on first use and kept in the key cache folder."""
        return self.key_folder.evaluation_key()

    def ensure_key(self, force_upload: bool = False, pin: Pin | None = None) -> str | None:
        """Register the evaluation key of `pin` (the current one by default) unless the server has it;
        returns the key id (None if unneeded)."""
        pin = pin or self.pin
        if not pin.info["needs_key"]:
            return None
        with pin.lock:
            if pin.key_id and not force_upload:
                return pin.key_id
            key = pin.key_folder.evaluation_key()
            key_id = keys.key_id(key)
            if force_upload or not self.transport.has_key(pin.tag, key_id):
                with tqdm(
                    total=len(key),
                    unit="B",
                    unit_scale=True,
                    desc=f"upload key {self.name}",
                    disable=not self.progress,
                ) as bar:

                    def upload() -> dict[str, Any]:
                        bar.reset()  # a retried upload starts over
                        return self.transport.put_key(pin.tag, key, bar.update)

                    answer = self.retry(upload)
                if answer["key_id"] != key_id:
                    raise FHEServiceError(0, "key_id_mismatch", "the server computed another key id")
            pin.key_id = key_id
            return key_id

    def encrypt(self, x: np.ndarray, pin: Pin | None = None) -> list[bytes]:
        """One ciphertext per row of `x`, each a batch of one of the circuit's input shape: a row of
        features, or a hybrid module's (1, *rest) input; under `pin`'s keys (the current one's)."""
        folder = (pin or self.pin).key_folder
        return [folder.encrypt(np.asarray(row)[np.newaxis]) for row in x]

    def _run_batch(self, rows: list[bytes], pin: Pin | None = None) -> list[bytes]:
        """One batch under `pin` (the current one by default), with the two recoveries: a lost key is
        uploaded again (once), and a retryable answer (overloaded, runner restarting, draining) is retried
        by the client's `RetryPolicy`."""
        pin = pin or self.pin
        reuploaded = False
        while True:
            try:
                return self.retry(
                    lambda: self.transport.predict_batch(pin.tag, self.ensure_key(pin=pin), rows)
                )
            except FHEServiceError as exc:
                if exc.code != "unknown_key" or reuploaded:
                    raise
                # Evicted, expired or deleted on the server: upload once more and retry.
                self.ensure_key(force_upload=True, pin=pin)
                reuploaded = True

    def _predict_rows(self, batch: np.ndarray) -> np.ndarray:
        """Encrypt, send and decrypt one batch of rows (runs on the client's thread pool); once more under
        the new default if the pinned version was retired meanwhile."""
        while True:
            pin = self.pin
            if batch.ndim != 2 or batch.shape[1] != pin.info["n_features"]:
                raise ValueError(
                    f"{self.name} takes rows of {pin.info['n_features']} features, got shape {batch.shape}"
                )
            try:
                answers = self._run_batch(self.encrypt(batch, pin), pin)
            except FHEServiceError as exc:
                if exc.code != "version_retired":
                    raise
                self._repin(pin)
                continue
            return np.vstack([self.decrypt(answer, pin) for answer in answers])

    def call_rows(self, x: np.ndarray) -> np.ndarray:
        """A hybrid model's module call (`client/hybrid.py`): the rows of `x` encrypted, sent `batch_size`
        rows a request, and their results decrypted whole, in order."""
        results: list[np.ndarray] = []
        for start in range(0, len(x), self.batch_size):
            answers = self._run_batch(self.encrypt(x[start : start + self.batch_size]))
            results += [np.asarray(self.fhe.deserialize_decrypt_dequantize(a)) for a in answers]
        return np.concatenate(results)

    def decrypt(self, answer: bytes, pin: Pin | None = None) -> np.ndarray:
        """The scores of one row from the server's encrypted answer (to a request made under `pin`)."""
        folder = (pin or self.pin).key_folder
        folder.load_private_key()
        return np.asarray(folder.fhe.deserialize_decrypt_dequantize(answer)).reshape(-1)

    def predict_proba_stream(
        self, rows: Iterable[np.ndarray], total: int | None = None
    ) -> Iterator[np.ndarray]:
        """Scores for rows read lazily, in order. Batches are encrypted, sent and decrypted on
        `concurrency` threads while later rows are still being read, so a large input streams through
        with bounded memory instead of being loaded first."""
        self.ensure_key()
        in_flight: deque[Future[np.ndarray]] = deque()
        with (
            tqdm(total=total, unit="row", desc=f"predict {self.name}", disable=not self.progress) as bar,
            ThreadPoolExecutor(self.concurrency) as pool,
        ):
            for batch in _batches(rows, self.batch_size):
                in_flight.append(pool.submit(self._predict_rows, batch))
                while len(in_flight) > 2 * self.concurrency:
                    yield from self._drain(in_flight.popleft(), bar)
            while in_flight:
                yield from self._drain(in_flight.popleft(), bar)

    @staticmethod
    def _drain(future: Future[np.ndarray], bar: tqdm) -> Iterator[np.ndarray]:
        scores = future.result()
        bar.update(len(scores))
        yield from scores

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        if not len(x):
            return np.empty((0, self.info["n_outputs"]))
        return np.vstack(list(self.predict_proba_stream(x, total=len(x))))

    def labels(self, scores: np.ndarray) -> np.ndarray:
        """Predictions from scores: the class with the highest score, or the value for a regressor."""
        classes = self.info.get("classes")
        if not classes:
            return scores[:, 0] if scores.shape[1] == 1 else scores
        return np.asarray(classes)[np.argmax(scores, axis=1)]

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.labels(self.predict_proba(x))

    def fit(
        self, x: Any, y: Any, epochs: int = 1, seed: int = 0, reconnect_seconds: float = 300.0
    ) -> LogisticRegression:
        """Train this training circuit in FHE on the server (`client/training.py`): `epochs` passes over
        the rows in batches of the circuit's size, with a progress bar; a session cut short (a dropped
        connection, a restart, a new process) is carried on. Returns scikit-learn's `LogisticRegression`
        with the decrypted weights."""
        from fhe_bento.client.training import fit

        return fit(self, x, y, epochs, seed, reconnect_seconds)


def _batches(rows: Iterable[np.ndarray], size: int) -> Iterator[np.ndarray]:
    """`rows` as float64 arrays of at most `size` rows each."""
    batch: list[np.ndarray] = []
    for row in rows:
        batch.append(np.asarray(row, dtype=np.float64).reshape(-1))
        if len(batch) == size:
            yield np.vstack(batch)
            batch = []
    if batch:
        yield np.vstack(batch)
