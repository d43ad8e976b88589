"""`FHEClient(url).model(name).predict(X)`: the client's entry point, and the `Transport` interface that
every way of reaching a server implements.

The jobs behind it have modules of their own: `key_folder` (a model's private folder in the key cache:
client.zip, keys, modes), `remote_model` (`RemoteModel`: batching, streaming, encryption, decryption, key
upload), `retry` (the one retry policy), `answers` (error answers and batch framing, shared by the
transports), and the transports `http_transport` and `sagemaker_transport`. Private keys live only under the
client's cache directory (default `~/.cache/fhe-bento`, or `FHE_BENTO_CLIENT_CACHE`); nothing sent to the
server holds plaintext or a private key.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from fhe_bento.client.http_transport import HTTPTransport
from fhe_bento.client.key_folder import default_cache_dir
from fhe_bento.client.remote_model import RemoteModel

if TYPE_CHECKING:
    import torch

__all__ = ["FHEClient", "RemoteModel", "Transport", "default_cache_dir"]


class Transport(Protocol):
    """What a `RemoteModel` needs of a server. An error answer raises `FHEServiceError`; retrying is the
    caller's (`client/retry.py`), not the transport's."""

    def get_model(self, name: str) -> dict[str, Any]: ...

    def get_client_zip(self, name: str) -> tuple[bytes, str]: ...

    def has_key(self, name: str, key_id: str) -> bool: ...

    def put_key(self, name: str, key: bytes, on_progress: Callable[[int], None]) -> dict[str, Any]: ...

    def predict_batch(self, name: str, key_id: str | None, rows: list[bytes]) -> list[bytes]: ...

    # Training sessions (`client/training.py`): bodies are lists of serialized values. With `whole_epochs`,
    # `fit` sends an epoch a request (`training_epoch`: asynchronous endpoints), else a step a request.
    whole_epochs: bool

    def training_epoch(
        self, name: str, training_id: str, step: int, batches: list[list[bytes]]
    ) -> dict[str, Any]: ...

    def start_training(self, name: str, key_id: str | None, weights: list[bytes]) -> dict[str, Any]: ...

    def training_step(self, name: str, training_id: str, step: int, batch: list[bytes]) -> dict[str, Any]: ...

    def training_status(self, name: str, training_id: str) -> dict[str, Any]: ...

    def training_weights(self, name: str, training_id: str) -> tuple[list[bytes], int]: ...

    def delete_training(self, name: str, training_id: str) -> None: ...


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
        runtime_client: Any = None,
        s3_client: Any = None,
        key_affinity: bool = True,
        **options: Any,
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
