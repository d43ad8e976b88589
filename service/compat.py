"""Routes of Zama's reference deployment server, so its unmodified clients work against the default model.

`GET /get_client`, `POST /add_key` (multipart file `key` -> `{"uid": ...}`) and `POST /compute`
(multipart file `model_input` + form field `uid` -> raw encrypted result). Here `uid` is the key id.
The form is parsed as its body streams in, within the body size and idle limits (see `service.bodies`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.datastructures import FormData, UploadFile
from starlette.formparsers import MultiPartParser

from fhe_bento.core.errors import FHEBentoError
from fhe_bento.protocol.names import OCTET_STREAM
from fhe_bento.service.auth import Caller, predict_caller
from fhe_bento.service.bodies import limited_chunks, require_content_type
from fhe_bento.service.operations import Operations, current_operations
from fhe_bento.service.responses import client_zip_response

router = APIRouter()
PREDICT = Depends(predict_caller)
OPS = Depends(current_operations)
FORM_OVERHEAD = 64 * 1024  # bytes a form may hold beyond its file's limit: boundaries, part headers, uid


@asynccontextmanager
async def _form(request: Request, limit: int) -> AsyncIterator[FormData]:
    """The parsed form of a body of at most `limit` bytes; its spooled files are closed on exit.
    starlette's parser reads `limited_chunks`, so the size and idle limits hold while it streams."""
    require_content_type(request, "multipart/form-data")
    parser = MultiPartParser(request.headers, limited_chunks(request, limit), max_files=1, max_fields=2)
    try:
        form = await parser.parse()
    except FHEBentoError:  # 413, 408, 400 incomplete_body from the body stream
        raise
    except Exception as exc:  # starlette raises several parser errors; all mean a malformed form
        raise FHEBentoError("invalid_multipart", f"the multipart form could not be parsed: {exc}") from None
    try:
        yield form
    finally:
        await form.close()


async def _file_bytes(form: FormData, field: str, limit: int) -> bytes:
    """A file field's content: the form's own limit bounds it to `limit` plus the form overhead."""
    upload = form.get(field)
    if not isinstance(upload, UploadFile):
        raise FHEBentoError("missing_field", f"the form needs a file field {field!r}")
    if upload.size is not None and upload.size > limit:
        raise FHEBentoError("payload_too_large", f"{field} is {upload.size} bytes; the limit here is {limit}")
    data = await upload.read()
    if not data:
        raise FHEBentoError("empty_body", f"the {field} file is empty")
    return data


@router.get("/get_client")
async def get_client(caller: Caller = PREDICT, ops: Operations = OPS) -> FileResponse:
    return client_zip_response(ops.default)


@router.post("/add_key")
async def add_key(request: Request, caller: Caller = PREDICT, ops: Operations = OPS) -> Response:
    async with _form(request, ops.settings.max_key_bytes + FORM_OVERHEAD) as form:
        key = await _file_bytes(form, "key", ops.settings.max_key_bytes)
    return JSONResponse({"uid": (await ops.register_key(ops.default, caller, key)).key_id})


@router.post("/compute")
async def compute(request: Request, caller: Caller = PREDICT, ops: Operations = OPS) -> Response:
    async with _form(request, ops.settings.max_ciphertext_bytes + FORM_OVERHEAD) as form:
        uid = form.get("uid")
        if not isinstance(uid, str):
            raise FHEBentoError("missing_field", "the form needs a text field 'uid'")
        ciphertext = await _file_bytes(form, "model_input", ops.settings.max_ciphertext_bytes)
    result = await ops.predict(ops.default, caller, uid.strip().lower(), ciphertext)
    return Response(result, media_type=OCTET_STREAM)
