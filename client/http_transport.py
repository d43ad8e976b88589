"""The native HTTP API of an fhe-bento server, spoken with httpx. One method per route."""

from __future__ import annotations

import json
from collections.abc import Callable

import httpx

from fhe_bento.client.uploads import upload_key
from fhe_bento.protocol import wire
from fhe_bento.protocol.errors import HTTP_ERROR, is_retryable
from fhe_bento.protocol.names import CLIENT_SHA_HEADER, KEY_ID_HEADER, OCTET_STREAM, PART_BYTES

OCTET = {"Content-Type": OCTET_STREAM}
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


class FHEServiceError(RuntimeError):
    """An error answer of the service: HTTP status plus the JSON error code and message."""

    def __init__(self, status: int, code: str, message: str, retry_after: float | None = None) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after  # seconds, from Retry-After on a retryable answer

    @property
    def retryable(self) -> bool:
        return is_retryable(self.status, self.code)


def error_from_body(
    status: int, body: bytes | str, fallback_code: str, retry_after: float | None = None
) -> FHEServiceError:
    """The service error in a JSON error body, or `fallback_code` with the start of a body that is not one."""
    try:
        error = json.loads(body)["error"]
        return FHEServiceError(status, error["code"], error["message"], retry_after)
    except Exception:
        text = body.decode(errors="replace") if isinstance(body, bytes) else body
        return FHEServiceError(status, fallback_code, text[:200], retry_after)


def retry_after_seconds(headers: httpx.Headers) -> float | None:
    """Retry-After in seconds; None when it is absent or an HTTP date (the client then backs off itself)."""
    value = headers.get("retry-after")
    try:
        return float(value) if value else None
    except ValueError:
        return None


def _raise_for_error(response: httpx.Response) -> httpx.Response:
    if response.status_code < 400:
        return response
    raise error_from_body(
        response.status_code,
        response.content or response.reason_phrase,
        HTTP_ERROR,
        retry_after_seconds(response.headers),
    )


class HTTPTransport:
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

    def list_models(self) -> list[dict]:
        return _raise_for_error(self.http.get("/v1/models")).json()

    def get_model(self, name: str) -> dict:
        return _raise_for_error(self.http.get(f"/v1/models/{name}")).json()

    def get_client_zip(self, name: str) -> tuple[bytes, str]:
        response = _raise_for_error(self.http.get(f"/v1/models/{name}/client.zip"))
        return response.content, response.headers.get(CLIENT_SHA_HEADER, "")

    def has_key(self, name: str, key_id: str) -> bool:
        response = self.http.head(f"/v1/models/{name}/keys/{key_id}")
        if response.status_code == 404:
            return False
        _raise_for_error(response)
        return True

    def put_key(self, name: str, key: bytes, on_progress: Callable[[int], None]) -> dict:
        return upload_key(self, name, key, self.part_bytes, on_progress)

    def put_whole_key(self, name: str, key: bytes) -> dict:
        response = self.http.post(f"/v1/models/{name}/keys", content=key, headers=OCTET)
        return _raise_for_error(response).json()

    def key_parts(self, name: str, key_id: str) -> list[int]:
        return _raise_for_error(self.http.get(f"/v1/models/{name}/keys/{key_id}/parts")).json()["parts"]

    def put_key_part(self, name: str, key_id: str, index: int, data: bytes) -> None:
        _raise_for_error(
            self.http.put(f"/v1/models/{name}/keys/{key_id}/parts/{index}", content=data, headers=OCTET)
        )

    def complete_key(self, name: str, key_id: str, count: int) -> dict:
        response = self.http.post(f"/v1/models/{name}/keys/{key_id}/complete", params={"parts": count})
        return _raise_for_error(response).json()

    def predict_batch(self, name: str, key_id: str | None, rows: list[bytes]) -> list[bytes]:
        headers = {"Content-Type": wire.CONTENT_TYPE}
        if key_id:
            headers[KEY_ID_HEADER] = key_id
        response = self.http.post(
            f"/v1/models/{name}/predict_batch", content=wire.encode_batch(rows), headers=headers
        )
        return wire.decode_batch(_raise_for_error(response).content, max_rows=len(rows))
