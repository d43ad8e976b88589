"""The native HTTP API of an fhe-bento server, spoken with httpx. One method per route; error answers and
batch framing are `client/answers.py`'s, retries `client/retry.py`'s."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx

from fhe_bento.client.answers import exchange_batch, raise_for_error
from fhe_bento.client.uploads import upload_key
from fhe_bento.protocol import wire
from fhe_bento.protocol.names import (
    CLIENT_SHA_HEADER,
    KEY_ID_HEADER,
    OCTET_STREAM,
    PART_BYTES,
    TRAINING_STEP_HEADER,
)

OCTET = {"Content-Type": OCTET_STREAM}
BATCH = {"Content-Type": wire.CONTENT_TYPE}
# An idle pooled connection is dropped after this long. It must stay well under the server's keep-alive
# (uvicorn's default under `bentoml serve`: 5 s): at equal timeouts the server may close a connection just
# as the client reuses it, and the request fails with "Server disconnected without sending a response".
KEEPALIVE_SECONDS = 1.0


def http_client(url: str, timeout: float, headers: dict[str, str] | None = None) -> httpx.Client:
    """The client's connection pool to one server (native API or a container's /invocations)."""
    return httpx.Client(
        base_url=url.rstrip("/"),
        timeout=httpx.Timeout(timeout, connect=10.0),
        headers=headers,
        limits=httpx.Limits(keepalive_expiry=KEEPALIVE_SECONDS),
    )


class HTTPTransport:
    """The `Transport` of a server's native API: one request per operation, never retried here."""

    whole_epochs = False  # `fit` sends a step a request: each answers in seconds

    def __init__(
        self,
        url: str,
        timeout: float = 600.0,
        client: httpx.Client | None = None,
        part_bytes: int = PART_BYTES,
        token: str | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.part_bytes = part_bytes
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = client or http_client(self.url, timeout, headers)

    def close(self) -> None:
        self.http.close()

    def list_models(self) -> list[dict[str, Any]]:
        return raise_for_error(self.http.get("/v1/models")).json()

    def get_model(self, name: str) -> dict[str, Any]:
        return raise_for_error(self.http.get(f"/v1/models/{name}")).json()

    def set_default_version(self, name: str, version: str) -> dict[str, Any]:
        """Admin: `version` serves requests naming `name` alone."""
        response = self.http.put(f"/v1/models/{name}/default", json={"version": version})
        return raise_for_error(response).json()

    def retire_version(self, name: str, version: str) -> dict[str, Any]:
        """Admin: requests naming `version` get 410 version_retired from now on."""
        return raise_for_error(self.http.post(f"/v1/models/{name}/versions/{version}/retire")).json()

    def get_client_zip(self, name: str) -> tuple[bytes, str]:
        response = raise_for_error(self.http.get(f"/v1/models/{name}/client.zip"))
        return response.content, response.headers.get(CLIENT_SHA_HEADER, "")

    def has_key(self, name: str, key_id: str) -> bool:
        response = self.http.head(f"/v1/models/{name}/keys/{key_id}")
        if response.status_code == 404:
            return False
        raise_for_error(response)
        return True

    def put_key(self, name: str, key: bytes, on_progress: Callable[[int], None]) -> dict[str, Any]:
        return upload_key(self, name, key, self.part_bytes, on_progress)

    def put_whole_key(self, name: str, key: bytes) -> dict[str, Any]:
        response = self.http.post(f"/v1/models/{name}/keys", content=key, headers=OCTET)
        return raise_for_error(response).json()

    def key_parts(self, name: str, key_id: str) -> list[int]:
        return raise_for_error(self.http.get(f"/v1/models/{name}/keys/{key_id}/parts")).json()["parts"]

    def put_key_part(self, name: str, key_id: str, index: int, data: bytes) -> None:
        raise_for_error(
            self.http.put(f"/v1/models/{name}/keys/{key_id}/parts/{index}", content=data, headers=OCTET)
        )

    def complete_key(self, name: str, key_id: str, count: int) -> dict[str, Any]:
        response = self.http.post(f"/v1/models/{name}/keys/{key_id}/complete", params={"parts": count})
        return raise_for_error(response).json()

    def predict_batch(self, name: str, key_id: str | None, rows: list[bytes]) -> list[bytes]:
        headers = {"Content-Type": wire.CONTENT_TYPE}
        if key_id:
            headers[KEY_ID_HEADER] = key_id

        def send(body: bytes) -> bytes:
            response = self.http.post(f"/v1/models/{name}/predict_batch", content=body, headers=headers)
            return raise_for_error(response).content

        return exchange_batch(rows, send)

    # --- training sessions ------------------------------------------------------------------------------

    def start_training(self, name: str, key_id: str | None, weights: list[bytes]) -> dict[str, Any]:
        headers = {**BATCH, **({KEY_ID_HEADER: key_id} if key_id else {})}
        response = self.http.post(
            f"/v1/models/{name}/trainings", content=wire.encode_batch(weights), headers=headers
        )
        return raise_for_error(response).json()

    def training_step(self, name: str, training_id: str, step: int, batch: list[bytes]) -> dict[str, Any]:
        response = self.http.post(
            f"/v1/models/{name}/trainings/{training_id}/steps",
            params={"step": step},
            content=wire.encode_batch(batch),
            headers=BATCH,
        )
        return raise_for_error(response).json()

    def training_epoch(
        self, name: str, training_id: str, step: int, batches: list[list[bytes]]
    ) -> dict[str, Any]:
        response = self.http.post(
            f"/v1/models/{name}/trainings/{training_id}/epochs",
            params={"step": step},
            content=wire.encode_batch([value for batch in batches for value in batch]),
            headers=BATCH,
        )
        return raise_for_error(response).json()

    def training_status(self, name: str, training_id: str) -> dict[str, Any]:
        return raise_for_error(self.http.get(f"/v1/models/{name}/trainings/{training_id}")).json()

    def training_weights(self, name: str, training_id: str) -> tuple[list[bytes], int]:
        response = raise_for_error(self.http.get(f"/v1/models/{name}/trainings/{training_id}/weights"))
        return wire.decode_batch(response.content, 2), int(response.headers[TRAINING_STEP_HEADER])

    def delete_training(self, name: str, training_id: str) -> None:
        raise_for_error(self.http.delete(f"/v1/models/{name}/trainings/{training_id}"))
