"""`FHEClient(url).model(name).predict(X)`: keys, encryption, transport and decryption in one place.

Private keys live only under the client's cache directory (default `~/.cache/fhe-bento`, or
`FHE_BENTO_CLIENT_CACHE`), one folder per model `client_sha256`; nothing sent to the server holds
plaintext or a private key. The folders the client creates there are mode 0700 and every file in a
model's folder 0600, whatever the umask.
"""

from __future__ import annotations

import hashlib
import os
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TypeVar

import numpy as np
from tqdm.auto import tqdm

from fhe_bento.client.http_transport import FHEServiceError, HTTPTransport
from fhe_bento.protocol import keys

if TYPE_CHECKING:
    import torch


class Transport(Protocol):
    def get_model(self, name: str) -> dict: ...

    def get_client_zip(self, name: str) -> tuple[bytes, str]: ...

    def has_key(self, name: str, key_id: str) -> bool: ...

    def put_key(self, name: str, key: bytes, on_progress) -> dict: ...

    def predict_batch(self, name: str, key_id: str | None, rows: list[bytes]) -> list[bytes]: ...


T = TypeVar("T")
BACKOFF_BASE = 1.0  # seconds before the first retry of a retryable answer without Retry-After
BACKOFF_CAP = 30.0


def default_cache_dir() -> Path:
    return Path(os.environ.get("FHE_BENTO_CLIENT_CACHE", Path.home() / ".cache" / "fhe-bento"))


def _private_dir(path: Path) -> None:
    """Create `path` and its missing parents with mode 0700 (mkdir(parents=True) would give the parents
    the umask's mode), and make `path` 0700 if it already exists."""
    for folder in reversed([path, *path.parents]):
        if not folder.exists():
            folder.mkdir(mode=0o700, exist_ok=True)
            folder.chmod(0o700)  # mkdir's mode is masked by the umask
    path.chmod(0o700)


def _make_private(root: Path) -> None:
    """Mode 0700 for `root` and every folder under it, 0600 for every file: concrete writes its keys with
    the process umask. Symbolic links are left alone, so that nothing outside `root` changes."""
    root.chmod(0o700)
    for folder, dirs, files in os.walk(root):
        for names, mode in ((dirs, 0o700), (files, 0o600)):
            for name in names:
                path = os.path.join(folder, name)
                if not os.path.islink(path):
                    os.chmod(path, mode)


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
        from concrete.ml.deployment import FHEModelClient

        self.transport = transport
        self.name = name
        self.info = transport.get_model(name)
        self.batch_size = batch_size
        self.concurrency = concurrency
        self.progress = progress
        self.max_retries = max_retries
        self.folder = cache_dir / self.info["client_sha256"]
        # Both folders exist, private, before concrete writes a key: its files are unreachable to others
        # from the start, not only once `_generate_keys` has fixed their modes.
        _private_dir(self.folder)
        _private_dir(self.folder / "keys")
        self._ensure_client_zip(self.folder)
        self.fhe = FHEModelClient(str(self.folder), key_dir=str(self.folder / "keys"))
        self._key_id: str | None = None
        self._key_lock = threading.Lock()
        self._keygen_lock = (
            threading.Lock()
        )  # not _key_lock: ensure_key holds that one while it generates keys
        self._keys_private = False

    def _ensure_client_zip(self, folder: Path) -> None:
        expected = self.info["client_sha256"]
        target = folder / "client.zip"
        if target.is_file() and hashlib.sha256(target.read_bytes()).hexdigest() == expected:
            return
        data, header = self.transport.get_client_zip(self.name)
        actual = hashlib.sha256(data).hexdigest()
        if actual != expected or (header and header != expected):
            raise FHEServiceError(
                0, "client_zip_mismatch", f"client.zip hashes to {actual}, expected {expected}"
            )
        tmp = folder / "client.zip.tmp"
        tmp.write_bytes(data)
        tmp.chmod(0o600)
        tmp.replace(target)

    def _generate_keys(self) -> None:
        """Generate (or load from the key folder) the private and evaluation keys once, then make every
        file concrete wrote in the model's folder private."""
        with self._keygen_lock:
            if not self._keys_private:
                self.fhe.generate_private_and_evaluation_keys(force=False)
                _make_private(self.folder)
                self._keys_private = True

    def evaluation_key(self) -> bytes:
        """The serialized evaluation key, generated on first use and kept in the key cache folder."""
        self._generate_keys()
        return self.fhe.get_serialized_evaluation_keys()

    def ensure_key(self, force_upload: bool = False) -> str | None:
        """Register the evaluation key unless the server has it; returns the key id (None if unneeded)."""
        if not self.info["needs_key"]:
            return None
        with self._key_lock:
            if self._key_id and not force_upload:
                return self._key_id
            key = self.evaluation_key()
            key_id = keys.key_id(key)
            if force_upload or not self.transport.has_key(self.name, key_id):
                with tqdm(
                    total=len(key),
                    unit="B",
                    unit_scale=True,
                    desc=f"upload key {self.name}",
                    disable=not self.progress,
                ) as bar:

                    def upload() -> dict:
                        bar.reset()  # a retried upload starts over
                        return self.transport.put_key(self.name, key, bar.update)

                    answer = self._retrying(upload)
                if answer["key_id"] != key_id:
                    raise FHEServiceError(0, "key_id_mismatch", "the server computed another key id")
            self._key_id = key_id
            return key_id

    def encrypt(self, x: np.ndarray) -> list[bytes]:
        """One ciphertext per row of `x`, each a batch of one of the circuit's input shape: a row of
        features, or a hybrid module's (1, *rest) input."""
        self._generate_keys()  # a model without an evaluation key gets its private key here
        return [self.fhe.quantize_encrypt_serialize(np.asarray(row)[np.newaxis]) for row in x]

    def _run_batch(self, rows: list[bytes]) -> list[bytes]:
        """One batch, with the two recoveries: a lost key is uploaded again (once), and a retryable answer
        (overloaded, runner restarting: `protocol.errors.is_retryable`) is retried after its Retry-After (or an
        exponential backoff with jitter)."""
        reuploaded = False
        while True:
            try:
                return self._retrying(
                    lambda: self.transport.predict_batch(self.name, self.ensure_key(), rows)
                )
            except FHEServiceError as exc:
                if exc.code != "unknown_key" or reuploaded:
                    raise
                # Evicted, expired or deleted on the server: upload once more and retry.
                self.ensure_key(force_upload=True)
                reuploaded = True

    def _retrying(self, call: Callable[[], T]) -> T:
        """`call()`, retried on a retryable answer after its Retry-After (or an exponential backoff with
        jitter), at most `max_retries` times."""
        for attempt in range(self.max_retries + 1):
            try:
                return call()
            except FHEServiceError as exc:
                if not exc.retryable or attempt == self.max_retries:
                    raise
                backoff = min(BACKOFF_CAP, BACKOFF_BASE * 2**attempt)
                time.sleep((exc.retry_after or backoff) * random.uniform(1.0, 1.5))
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _predict_rows(self, batch: np.ndarray) -> np.ndarray:
        """Encrypt, send and decrypt one batch of rows (runs on the client's thread pool)."""
        if batch.ndim != 2 or batch.shape[1] != self.info["n_features"]:
            raise ValueError(
                f"{self.name} takes rows of {self.info['n_features']} features, got shape {batch.shape}"
            )
        return np.vstack([self.decrypt(answer) for answer in self._run_batch(self.encrypt(batch))])

    def call_rows(self, x: np.ndarray) -> np.ndarray:
        """A hybrid model's module call (`client/hybrid.py`): the rows of `x` encrypted, sent `batch_size`
        rows a request, and their results decrypted whole, in order."""
        results: list[np.ndarray] = []
        for start in range(0, len(x), self.batch_size):
            answers = self._run_batch(self.encrypt(x[start : start + self.batch_size]))
            results += [np.asarray(self.fhe.deserialize_decrypt_dequantize(a)) for a in answers]
        return np.concatenate(results)

    def decrypt(self, answer: bytes) -> np.ndarray:
        """The scores of one row from the server's encrypted answer."""
        if not self._keys_private and not any((self.folder / "keys").iterdir()):
            # Fresh keys here would decrypt to garbage: the answer needs the key its rows were encrypted with.
            raise FHEServiceError(
                0,
                "no_private_key",
                f"no private key of {self.name} in {self.folder}: decrypt "
                "with the key cache that encrypted (FHE_BENTO_CLIENT_CACHE)",
            )
        self._generate_keys()  # loads the private key from the cache when another process encrypted
        return np.asarray(self.fhe.deserialize_decrypt_dequantize(answer)).reshape(-1)

    def predict_proba_stream(
        self, rows: Iterable[np.ndarray], total: int | None = None
    ) -> Iterator[np.ndarray]:
        """Scores for rows read lazily, in order. Batches are encrypted, sent and decrypted on
        `concurrency` threads while later rows are still being read, so a large input streams through
        with bounded memory instead of being loaded first."""
        self.ensure_key()
        in_flight: deque[Future] = deque()
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
    def _drain(future: Future, bar: tqdm) -> Iterator[np.ndarray]:
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


def _batches(rows: Iterable[np.ndarray], size: int) -> Iterator[np.ndarray]:
    batch: list[np.ndarray] = []
    for row in rows:
        batch.append(np.asarray(row, dtype=np.float64).reshape(-1))
        if len(batch) == size:
            yield np.vstack(batch)
            batch = []
    if batch:
        yield np.vstack(batch)


class FHEClient:
    """Entry point: `FHEClient("http://127.0.0.1:3000").model("breast-cancer-xgb").predict(X)`."""

    def __init__(
        self,
        url: str | None = None,
        *,
        transport: Transport | None = None,
        cache_dir: Path | str | None = None,
        batch_size: int = 8,
        concurrency: int = 4,
        progress: bool = True,
        timeout: float = 600.0,
        max_retries: int = 8,
        token: str | None = None,
    ) -> None:
        """`token`: the bearer token, when the server has FHE_BENTO_PREDICT_TOKENS set (HTTP only: a
        SageMaker endpoint is gated by IAM). Keys uploaded with a token are visible to that token only."""
        if transport is None:
            if url is None:
                raise ValueError("give a server url or a transport")
            transport = HTTPTransport(url, timeout=timeout, token=token)
        self.transport = transport
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        self.batch_size = batch_size
        self.concurrency = concurrency
        self.progress = progress
        self.max_retries = max_retries
        self._models: dict[str, RemoteModel] = {}

    @classmethod
    def sagemaker(
        cls,
        endpoint_name: str,
        *,
        mode: str = "realtime",
        input_prefix: str | None = None,
        models: str | Path | None = None,
        runtime_client=None,
        s3_client=None,
        key_affinity: bool = True,
        **options,
    ) -> FHEClient:
        """A client of a SageMaker endpoint. `mode="async"` needs `input_prefix` (s3://bucket/prefix for
        envelopes) and `models` (the model folders, local or the deployed s3://.../model.tar.gz). In real
        time, `key_affinity` keeps each key's predictions in a stateful session (docs/sagemaker.md "Key affinity")."""
        from fhe_bento.client.sagemaker_transport import (
            AsyncSageMakerTransport,
            ModelFolders,
            RuntimeInvoker,
            SageMakerTransport,
        )

        if mode == "realtime":
            invoker = RuntimeInvoker(endpoint_name, runtime_client)
            return cls(transport=SageMakerTransport(invoker, key_affinity=key_affinity), **options)
        if mode != "async" or not input_prefix or models is None:
            raise ValueError('mode is "realtime", or "async" with input_prefix and models')
        if s3_client is None:
            import boto3

            s3_client = boto3.client("s3")
        transport = AsyncSageMakerTransport(
            endpoint_name,
            input_prefix,
            ModelFolders(models, s3_client),
            runtime_client,
            s3_client,
            progress=options.get("progress", True),
        )
        return cls(transport=transport, **options)

    def hybrid(self, name: str, model: torch.nn.Module, module_names: list[str]) -> torch.nn.Module:
        """`model` with `module_names` computed in FHE by the server's hybrid model `name`
        (`client/hybrid.py`); a `HybridFHEModel`'s `model_name` and `module_names`."""
        from fhe_bento.client.hybrid import hybrid

        return hybrid(self, name, model, module_names)

    def model(self, name: str) -> RemoteModel:
        if name not in self._models:
            self._models[name] = RemoteModel(
                self.transport,
                name,
                self.cache_dir,
                self.batch_size,
                self.concurrency,
                self.progress,
                self.max_retries,
            )
        return self._models[name]
