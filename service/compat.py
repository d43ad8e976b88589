"""Routes of Zama's reference servers, so that their unmodified clients work: the deployment client
(`FHEModelClient`, the default model) and the hybrid client (`HybridFHEModel` in remote mode, a hybrid
model's circuits).

`GET /get_client`, `POST /add_key` (multipart file `key` -> `{"uid": ...}`) and `POST /compute`
(multipart file `model_input` + form field `uid` -> raw encrypted result). Here `uid` is the key id.
The hybrid client adds form fields `model_name`, `module_name` and `input_shape` (the repr of a tuple) to
these, in the body even of a GET, and lists what is served with `GET /list_models`, `/list_modules` and
`/list_shapes`; a request without `model_name` is the deployment client's. Forms are parsed as their
body streams in, within the body size and idle limits (see `service.bodies`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.datastructures import FormData, UploadFile
from starlette.formparsers import FormParser, MultiPartParser

from fhe_bento.contract.errors import FHEBentoError
from fhe_bento.models.repository import ModelSpec
from fhe_bento.protocol.names import OCTET_STREAM
from fhe_bento.service.auth import Caller, predict_caller
from fhe_bento.service.bodies import limited_chunks, require_content_type
from fhe_bento.service.operations import Operations, current_operations
from fhe_bento.service.responses import client_zip_response

router = APIRouter()
PREDICT = Depends(predict_caller)
OPS = Depends(current_operations)
FORM_OVERHEAD = 64 * 1024  # bytes a form may hold beyond its file's limit: boundaries, part headers, names
FORM = "application/x-www-form-urlencoded"
MULTIPART = "multipart/form-data"
MAX_TEXT_FIELDS = 4  # uid, and the hybrid client's model_name, module_name and input_shape


@asynccontextmanager
async def _form(request: Request, limit: int, media: str = MULTIPART) -> AsyncIterator[FormData]:
    """The parsed form of a body of at most `limit` bytes; its spooled files are closed on exit. POSTs
    carry multipart forms; a GET's form (the hybrid client's names) is urlencoded, and optional. starlette's
    parsers read `limited_chunks`, so the size and idle limits hold while they stream."""
    if media == FORM and not _has_body(request):
        yield FormData()
        return
    require_content_type(request, media)
    chunks = limited_chunks(request, limit)
    parser = (
        FormParser(request.headers, chunks)
        if media == FORM
        else MultiPartParser(request.headers, chunks, max_files=1, max_fields=MAX_TEXT_FIELDS)
    )
    try:
        form = await parser.parse()
    except FHEBentoError:  # 413, 408, 400 incomplete_body from the body stream
        raise
    except Exception as exc:  # starlette raises several parser errors; all mean a malformed form
        raise FHEBentoError("invalid_multipart", f"the form could not be parsed: {exc}") from None
    try:
        yield form
    finally:
        await form.close()


def _has_body(request: Request) -> bool:
    return request.headers.get("content-length", "0") != "0" or "transfer-encoding" in request.headers


def _text(form: FormData, field: str) -> str | None:
    value = form.get(field)
    if value is not None and not isinstance(value, str):
        raise FHEBentoError("missing_field", f"the form's {field!r} must be a text field")
    return value


def _required(form: FormData, field: str) -> str:
    value = _text(form, field)
    if value is None:
        raise FHEBentoError("missing_field", f"the form needs a text field {field!r}")
    return value


def _model(ops: Operations, form: FormData) -> ModelSpec:
    """The circuit that a hybrid client's form names, or the default model for the deployment client."""
    model = _text(form, "model_name")
    if model is None:
        return ops.default
    return ops.circuit(model, _required(form, "module_name"), _required(form, "input_shape"))


def _shapes(shapes: dict[str, ModelSpec]) -> dict[str, dict[str, str]]:
    """What Zama's hybrid server lists for each shape (the client iterates its keys), and the circuit's
    served name, for the native routes."""
    return {
        shape: {
            "model_name": spec.circuit.model,
            "module_name": spec.circuit.module,
            "shape": shape,
            "name": spec.name,
        }
        for shape, spec in shapes.items()
        if spec.circuit
    }


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


@router.get("/list_models")
async def list_models(caller: Caller = PREDICT, ops: Operations = OPS) -> dict:
    return {
        model: {module: _shapes(shapes) for module, shapes in modules.items()}
        for model, modules in ops.hybrids.items()
    }


@router.get("/list_modules")
async def list_modules(request: Request, caller: Caller = PREDICT, ops: Operations = OPS) -> dict:
    async with _form(request, FORM_OVERHEAD, FORM) as form:
        modules = ops.hybrid(_required(form, "model_name"))
    return {module: _shapes(shapes) for module, shapes in modules.items()}


@router.get("/list_shapes")
async def list_shapes(request: Request, caller: Caller = PREDICT, ops: Operations = OPS) -> dict:
    async with _form(request, FORM_OVERHEAD, FORM) as form:
        return _shapes(ops.module(_required(form, "model_name"), _required(form, "module_name")))


@router.get("/get_client")
async def get_client(request: Request, caller: Caller = PREDICT, ops: Operations = OPS) -> FileResponse:
    async with _form(request, FORM_OVERHEAD, FORM) as form:
        return client_zip_response(_model(ops, form))


@router.post("/add_key")
async def add_key(request: Request, caller: Caller = PREDICT, ops: Operations = OPS) -> Response:
    async with _form(request, ops.settings.max_key_bytes + FORM_OVERHEAD) as form:
        spec = _model(ops, form)
        key = await _file_bytes(form, "key", ops.settings.max_key_bytes)
    return JSONResponse({"uid": (await ops.register_key(spec, caller, key)).key_id})


@router.post("/compute")
async def compute(request: Request, caller: Caller = PREDICT, ops: Operations = OPS) -> Response:
    async with _form(request, ops.settings.max_ciphertext_bytes + FORM_OVERHEAD) as form:
        spec = _model(ops, form)
        uid = _required(form, "uid")
        ciphertext = await _file_bytes(form, "model_input", ops.settings.max_ciphertext_bytes)
    result = await ops.predict(spec, caller, uid, ciphertext)
    return Response(result, media_type=OCTET_STREAM)
