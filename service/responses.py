"""Responses shared by the native and the Zama-compatible routes."""

from __future__ import annotations

from fastapi.responses import FileResponse

from fhe_bento.core.model_repo import ModelSpec
from fhe_bento.protocol.names import CLIENT_SHA_HEADER


def client_zip_response(spec: ModelSpec) -> FileResponse:
    return FileResponse(
        spec.path / "client.zip",
        media_type="application/zip",
        filename=f"{spec.name}-client.zip",
        headers={CLIENT_SHA_HEADER: spec.meta.client_sha256},
    )
