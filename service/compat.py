"""Routes of Zama's reference deployment server, so its unmodified clients work against the default model.

`GET /get_client`, `POST /add_key` (multipart file `key` -> `{"uid": ...}`) and `POST /compute`
(multipart file `model_input` + form field `uid` -> raw encrypted result). Here `uid` is the key id.
The form is parsed as its body streams in, within the body size and idle limits (see `service.bodies`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import bentoml
from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.datastructures import FormData, UploadFile
from starlette.formparsers import MultiPartParser

from runners.errors import FHEBentoError, bad_request, too_large
from runners.key_store import check_key_id
from runners.settings import get_settings
from service.auth import Caller, predict_caller
from service.responses import client_zip_response
from service.wire import OCTET_STREAM
from service.bodies import limited_chunks, require_content_type, spool_chunks

router = APIRouter()
settings = get_settings()
CHUNK = 1 << 20
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
        raise bad_request("invalid_multipart", f"the multipart form could not be parsed: {exc}") from None
    try:
        yield form
    finally:
        await form.close()


def _file(form: FormData, field: str) -> UploadFile:
    upload = form.get(field)
    if not isinstance(upload, UploadFile):
        raise bad_request("missing_field", f"the form needs a file field {field!r}")
    return upload


async def _chunks(upload: UploadFile) -> AsyncIterator[bytes]:
    while chunk := await upload.read(CHUNK):
        yield chunk


@router.get("/get_client")
async def get_client(caller: Caller = Depends(predict_caller)) -> FileResponse:
    service = bentoml.get_current_service()
    return client_zip_response(service.default)


@router.post("/add_key")
async def add_key(request: Request, caller: Caller = Depends(predict_caller)) -> Response:
    service = bentoml.get_current_service()
    async with _form(request, settings.max_key_bytes + FORM_OVERHEAD) as form:
        path, key_id, _ = await spool_chunks(_chunks(_file(form, "key")), settings.max_key_bytes, service.staging)
    answer, _status = await service.register_key(service.default, caller, path, key_id)
    return JSONResponse({"uid": answer["key_id"]})


@router.post("/compute")
async def compute(request: Request, caller: Caller = Depends(predict_caller)) -> Response:
    service = bentoml.get_current_service()
    async with _form(request, settings.max_ciphertext_bytes + FORM_OVERHEAD) as form:
        uid = form.get("uid")
        if not isinstance(uid, str):
            raise bad_request("missing_field", "the form needs a text field 'uid'")
        upload = _file(form, "model_input")
        if upload.size is not None and upload.size > settings.max_ciphertext_bytes:
            raise too_large(f"model_input is {upload.size} bytes; the limit here is {settings.max_ciphertext_bytes}")
        ciphertext = await upload.read()
    if not ciphertext:
        raise bad_request("empty_body", "the model_input file is empty")
    result = await service.predict(service.default, caller, check_key_id(uid.strip().lower()), ciphertext)
    return Response(result, media_type=OCTET_STREAM)
