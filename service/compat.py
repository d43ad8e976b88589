"""Routes of Zama's reference deployment server, so its unmodified clients work against the default model.

`GET /get_client`, `POST /add_key` (multipart file `key` -> `{"uid": ...}`) and `POST /compute`
(multipart file `model_input` + form field `uid` -> raw encrypted result). Here `uid` is the key id.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import bentoml
from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.datastructures import FormData, UploadFile

from runners.errors import bad_request
from runners.key_store import check_key_id
from runners.settings import get_settings
from service.auth import Caller, predict_caller
from service.responses import client_zip_response
from service.wire import OCTET_STREAM
from service.bodies import declared_length, require_content_type, spool_chunks

router = APIRouter()
settings = get_settings()
CHUNK = 1 << 20


async def _form(request: Request, limit: int) -> FormData:
    require_content_type(request, "multipart/form-data")
    declared_length(request, limit, required=True)
    try:
        return await request.form(max_files=1, max_fields=2)
    except Exception as exc:  # starlette raises several parser errors; all mean a malformed form
        raise bad_request("invalid_multipart", f"the multipart form could not be parsed: {exc}") from None


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
    form = await _form(request, settings.max_key_bytes + CHUNK)
    path, key_id, _ = await spool_chunks(_chunks(_file(form, "key")), settings.max_key_bytes, service.staging)
    answer, _status = await service.register_key(service.default, caller, path, key_id)
    return JSONResponse({"uid": answer["key_id"]})


@router.post("/compute")
async def compute(request: Request, caller: Caller = Depends(predict_caller)) -> Response:
    service = bentoml.get_current_service()
    form = await _form(request, settings.max_ciphertext_bytes + CHUNK)
    uid = form.get("uid")
    if not isinstance(uid, str):
        raise bad_request("missing_field", "the form needs a text field 'uid'")
    ciphertext = await _file(form, "model_input").read()
    if not ciphertext:
        raise bad_request("empty_body", "the model_input file is empty")
    result = await service.predict(service.default, caller, check_key_id(uid.strip().lower()), ciphertext)
    return Response(result, media_type=OCTET_STREAM)
