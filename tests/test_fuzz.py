"""Fuzzing (hypothesis) of every parser the server owns: the batch framing, the async envelope, the
SageMaker custom attributes, the upload part routes and the Zama-compatible multipart forms.

The pure parsers are fuzzed in process, with many examples: they may only answer or raise their one
documented error. Then the same parsers are fuzzed through a real `bentoml serve`, and each input must get
exactly the status and error code its own bytes call for (`expected_*` below, worked out from the
documented order of checks and the wire format, never from the route's answer): the ciphertexts and keys
inside are judged by the model's layout check (`harness.capnp_attacks.layout_refusal`), key ids by the one
parser (`parse_key_id`), multipart bodies by starlette's parser (the routes' own), and the only server
state an oracle reads is what the server's routes tell of a key id: registered or not, its parts held."""

from __future__ import annotations

import asyncio
import functools

import httpx
import pytest
from conftest import LOGREG, XGB, assert_documented_rejection, imported_spec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import TypeAdapter, ValidationError
from starlette.datastructures import Headers
from starlette.formparsers import MultiPartParser

from fhe_bento.contract.errors import FHEBentoError
from fhe_bento.models.repository import ModelSpec
from fhe_bento.protocol import keys, wire
from fhe_bento.protocol.keys import parse_key_id, part_count
from fhe_bento.protocol.names import ATTRIBUTES_HEADER, OCTET_STREAM, PART_BYTES
from fhe_bento.service.sagemaker import Attributes, parse_attributes
from harness.capnp_attacks import layout_refusal

KEY_ID = "ab" * 32  # the one upload the part routes' fuzz opens
NO_PARTS_KEY_ID = "cd" * 32  # a key id no part is ever sent for
# Derandomized: CI runs the same examples every time (a new counterexample is found by a developer, not by
# a submission's one CI run).
HTTP = settings(
    max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
MAX_BATCH_ROWS = 256  # FHE_BENTO_MAX_BATCH_ROWS's default
MAX_KEY_BYTES = 64 * 1024 * 1024  # the session server's FHE_BENTO_MAX_KEY_BYTES (conftest.py)
MODELS = (XGB, LOGREG)  # the session server's FHE_BENTO_MODELS
DEFAULT_MODEL = XGB  # the first of them: what a request that names no model gets (it needs a key)
Answer = tuple[int, str | None]  # status, error code (None for a 2xx)
OK: Answer = (200, None)
CREATED: Answer = (201, None)


@functools.cache
def spec(name: str) -> ModelSpec:
    return imported_spec(name)


class Store:
    """What the session server holds for a key id, as its documented routes tell: the only server state an
    oracle reads. A fuzzed key id is never a registered key and only KEY_ID has parts, but this is asked,
    not assumed."""

    def __init__(self, http: httpx.Client) -> None:
        self.http = http

    def registered(self, model: str, key_id: str) -> bool:
        return self.http.head(f"/v1/models/{model}/keys/{key_id}").status_code == 200

    def parts(self, model: str, key_id: str) -> set[int]:
        return set(self.http.get(f"/v1/models/{model}/keys/{key_id}/parts").json()["parts"])


def rows_answer(rows: list[bytes], model: str) -> Answer:
    """A prediction's rows once its key is usable: the first row the model's layout check refuses (every
    row is checked before any runs), else 200 (the engine computes on any row of the model's layout)."""
    for row in rows:
        if refused := layout_refusal(spec(model), row, "ciphertext"):
            return refused
    return OK


def key_answer(model: str, key_id: str | None, store: Store) -> Answer | None:
    """A prediction's key id, before any row: a malformed one is refused first on every adapter
    (`Operations.predict_batch`), then the runner asks a model that needs a key for a registered one
    (runners/runner.py: model, key, rows). None when the rows come next. (Between the two, admission: the
    fuzzed batches are a few rows, far from FHE_BENTO_MAX_QUEUE_ROWS and the request timeout.)"""
    if key_id is not None and parse_key_id(key_id) is None:
        return 400, "invalid_key_id"
    if not spec(model).meta.needs_key:
        return None
    if key_id is None:
        return 400, "missing_key_id"
    if not store.registered(model, parse_key_id(key_id)):
        return 404, "unknown_key"
    return None


def upload_answer(model: str, key: bytes, store: Store) -> Answer:
    """A whole key upload (keys/service.py): its size, then a key registered already is 200 unchecked, else
    the model's layout check, then the throwaway verifier, where concrete deserializes it: a key of the
    model's exact layout (every parameter and blob size the model's) deserializes, 201. No fuzzed key has
    that layout."""
    if len(key) > MAX_KEY_BYTES:
        return 413, "payload_too_large"
    if store.registered(model, keys.key_id(key)):
        return OK
    return layout_refusal(spec(model), key, "key") or CREATED


def expected_batch(body: bytes, content_type: str) -> Answer:
    """A batch for the keyless LOGREG: content type, then an empty body, the framing, then its rows."""
    if content_type not in (wire.CONTENT_TYPE, OCTET_STREAM):
        return 415, "unsupported_media_type"
    if not body:
        return 400, "empty_body"
    try:
        rows = wire.decode_batch(body, MAX_BATCH_ROWS)
    except wire.FramingError:
        return 400, "invalid_batch"
    return rows_answer(rows, LOGREG)


def assert_answer(response: httpx.Response, expected: Answer) -> None:
    status, code = expected
    if code is None:
        assert response.status_code == status, (expected, response.status_code, response.text[:300])
    else:
        assert_documented_rejection(response, (status, code))


@st.composite
def mutated(draw, valid: st.SearchStrategy[bytes]) -> bytes:
    """A valid encoding, then truncated, extended or with bytes overwritten: the inputs that reach deepest."""
    data = bytearray(draw(valid))
    for _ in range(draw(st.integers(0, 3))):
        action = draw(st.sampled_from(["flip", "cut", "append"]))
        if action == "flip" and data:
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        elif action == "cut":
            del data[draw(st.integers(0, len(data))) :]
        else:
            data += draw(st.binary(max_size=16))
    return bytes(data)


rows = st.lists(st.binary(max_size=40), min_size=0, max_size=6)
batches = st.one_of(st.binary(max_size=80), mutated(rows.map(wire.encode_batch)))
envelopes = st.one_of(
    st.binary(max_size=80),
    mutated(
        st.builds(
            wire.encode_envelope,
            rows,
            st.one_of(st.none(), st.text(max_size=12)),
            st.one_of(st.none(), st.text(max_size=70)),
            st.binary(max_size=20),
        )
    ),
)
attribute_names = st.sampled_from(["op", "model", "key", "part", "parts", "other", "", " op "])
attribute_values = st.one_of(
    st.sampled_from(
        [
            "predict",
            "predict_batch",
            "put_key",
            "put_key_part",
            "key_parts",
            "complete_key",
            "has_key",
            "envelope",
            "get_client",
            LOGREG,
            KEY_ID,
            "0",
            "-1",
            "1e9",
        ]
    ),
    st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=30),
)
# Printable ASCII: what an HTTP header can carry at all.
attribute_texts = st.one_of(
    st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=120),
    st.lists(st.tuples(attribute_names, st.sampled_from(["=", "", "=="]), attribute_values), max_size=6).map(
        lambda items: ";".join(name + sep + value for name, sep, value in items)
    ),
)


@settings(max_examples=2000, deadline=None, derandomize=True)
@given(batches)
def test_batch_framing_answers_or_raises_its_own_error(data):
    try:
        decoded = wire.decode_batch(data, max_rows=4)
    except wire.FramingError:
        return
    assert 1 <= len(decoded) <= 4 and wire.encode_batch(decoded) == data


@settings(max_examples=2000, deadline=None, derandomize=True)
@given(envelopes)
def test_envelope_header_answers_or_raises_its_own_error(data):
    try:
        header, offset = wire.read_envelope_header(data)
    except wire.FramingError:
        return
    assert header.key_bytes >= 0 and offset <= len(data)


@settings(max_examples=2000, deadline=None, derandomize=True)
@given(st.one_of(attribute_texts, st.text(max_size=120)))
def test_custom_attributes_parse_or_get_invalid_attributes(text):
    try:
        assert isinstance(parse_attributes(text), Attributes)
    except FHEBentoError as exc:
        assert (exc.status, exc.code) == (400, "invalid_attributes")


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def store(http) -> Store:
    return Store(http)


@HTTP
@given(
    body=batches, content_type=st.sampled_from([wire.CONTENT_TYPE, "application/octet-stream", "text/plain"])
)
def test_predict_batch_route_gives_fuzz_its_answer(http, body, content_type):
    response = http.post(
        f"/v1/models/{LOGREG}/predict_batch", content=body, headers={"Content-Type": content_type}
    )
    assert_answer(response, expected_batch(body, content_type))


def key_attribute(key: str | None) -> Answer | None:
    """The `key` attribute of an op that needs one: missing, then not a key id."""
    if key is None:
        return 400, "invalid_attributes"
    return (400, "invalid_key_id") if parse_key_id(key) is None else None


def expected_invocation(attributes: str, store: Store) -> Answer:
    """`/invocations` with an empty octet-stream body: the attributes first, then each op's own order of
    checks (docs/sagemaker.md, service/sagemaker.py); every op that reads a body stops at the empty one."""
    try:
        attrs = parse_attributes(attributes)
    except FHEBentoError as exc:
        return exc.status, exc.code
    model = DEFAULT_MODEL if attrs.model is None else attrs.model
    op = attrs.op or "envelope"
    if op == "list_models":
        return OK
    if op == "has_key" and (refused := key_attribute(attrs.key)):  # its key id before its model
        return refused
    if op == "get_model" and attrs.model is None:
        return 400, "invalid_attributes"
    if model not in MODELS:
        return 404, "unknown_model"
    if op == "transform":
        return 415, "unsupported_media_type"
    if op in ("put_key", "put_key_part", "predict", "predict_batch", "envelope"):
        return 400, "empty_body"
    if op in ("get_client", "get_model", "has_key"):
        return OK
    if op == "complete_key" and attrs.key is not None and attrs.parts is None:  # both read before the id
        return 400, "invalid_attributes"
    if refused := key_attribute(attrs.key):
        return refused
    if op == "key_parts":
        return OK  # any well-formed key id has an answer
    return expected_completion(model, parse_key_id(attrs.key), attrs.parts, store)


def expected_completion(model: str, key_id: str, count: int, store: Store) -> Answer:
    """complete_key of a well-formed key id (keys/service.py): the count within the model's key, then a key
    registered already is 200, else all of parts 0..count-1 must be held, then their digest must be the
    key id (no fuzzed part hashes to its id)."""
    if not 0 < count <= part_count(spec(model).meta.eval_key_bytes, PART_BYTES):
        return 400, "invalid_part"
    if store.registered(model, key_id):
        return OK
    if not set(range(count)) <= store.parts(model, key_id):
        return 400, "missing_parts"
    return 400, "digest_mismatch"


@HTTP
@given(attributes=attribute_texts)
def test_invocations_give_fuzzed_attributes_their_answer(http, store, attributes):
    attributes = (
        attributes.strip()
    )  # HTTP drops the whitespace around a header value (h11 refuses to send it)
    expected = expected_invocation(attributes, store)
    response = http.post(
        "/invocations", content=b"", headers={"Content-Type": OCTET_STREAM, ATTRIBUTES_HEADER: attributes}
    )
    assert_answer(response, expected)


@HTTP
@given(body=batches)
def test_invocations_give_a_fuzzed_batch_its_answer(http, body):
    attributes = f"op=predict_batch;model={LOGREG}"
    response = http.post(
        "/invocations", content=body, headers={"Content-Type": OCTET_STREAM, ATTRIBUTES_HEADER: attributes}
    )
    assert_answer(response, expected_batch(body, OCTET_STREAM))


def expected_envelope(body: bytes, store: Store) -> Answer:
    """`/invocations` with an octet-stream body and no attributes: an envelope (docs/sagemaker.md, "Async
    envelope"; `Operations.envelope`). Its header, its model (else the default one), its inline key (an
    upload), its batch framing, then the key id (the inline key's, else the header's) and the rows as on a
    batch route."""
    if not body:
        return 400, "empty_body"
    try:  # the server reads the header from the body's first bytes
        header, offset = wire.read_envelope_header(
            body[: len(wire.ENVELOPE_MAGIC) + 4 + wire.MAX_ENVELOPE_HEADER]
        )
    except wire.FramingError:
        return 400, "invalid_envelope"
    model = header.model or DEFAULT_MODEL
    if model not in MODELS:
        return 404, "unknown_model"
    key_id = header.key_id or None
    if header.key_bytes:
        if header.key_bytes > MAX_KEY_BYTES:
            return 413, "payload_too_large"
        key = body[offset : offset + header.key_bytes]
        if len(key) < header.key_bytes:
            return 400, "invalid_envelope"
        uploaded = upload_answer(model, key, store)
        if uploaded[1] is not None:
            return uploaded
        offset, key_id = offset + header.key_bytes, keys.key_id(key)
    try:
        rows = wire.decode_batch(body[offset:], MAX_BATCH_ROWS)
    except wire.FramingError:
        return 400, "invalid_batch"
    return key_answer(model, key_id, store) or rows_answer(rows, model)


@HTTP
@given(body=envelopes)
def test_invocations_give_a_fuzzed_envelope_its_answer(http, store, body):
    expected = expected_envelope(body, store)
    response = http.post("/invocations", content=body, headers={"Content-Type": OCTET_STREAM})
    assert_answer(response, expected)


def parsed_int(text: str) -> int | None:
    """A path or query parameter as FastAPI (pydantic) reads an `int`, or None when it refuses it."""
    try:
        return TypeAdapter(int).validate_python(text)
    except ValidationError:
        return None


@pytest.fixture(scope="module")
def xgb_parts(http) -> int:
    """How many parts an XGB key has at most: its size over the part size."""
    return part_count(http.get(f"/v1/models/{XGB}").json()["eval_key_bytes"], PART_BYTES)


def spellings(key_id: str) -> st.SearchStrategy[str]:
    """A key id as a client may spell it: hex is case-insensitive (`parse_key_id` lowercases it)."""
    return st.sampled_from([key_id, key_id.upper(), key_id[:32].upper() + key_id[32:]])


# Path segments that still reach the part routes (an empty or dotted segment is another path, which
# BentoML's router answers) and are no key id: each key id would open an upload of its own, and a scope
# holds at most FHE_BENTO_MAX_OPEN_UPLOADS_PER_SCOPE of them (429), so the valid ones are `spellings`.
fuzzed_key_ids = st.text(alphabet="0123456789abcdefABCDEF-_xyz", min_size=1, max_size=70).filter(
    lambda text: parse_key_id(text) is None
)
integer_texts = st.one_of(
    st.integers(-5, 2000).map(str), st.text(alphabet="0123456789-+ex", min_size=1, max_size=8)
)


@HTTP
@given(
    key_id=st.one_of(spellings(KEY_ID), fuzzed_key_ids),
    index=integer_texts,
    body=st.binary(max_size=64),
    headers=st.fixed_dictionaries(
        {},
        optional={
            "Content-Type": st.sampled_from(
                ["application/octet-stream", "text/plain", "", "application/octet-stream; x"]
            ),
        },
    ),
)
def test_upload_part_routes_give_fuzz_its_answer(http, xgb_parts, key_id, index, body, headers):
    index_value = parsed_int(index)
    content_type = headers.get("Content-Type", "").split(";")[0].strip()
    parsed = parse_key_id(key_id)
    if index_value is None:
        expected = (400, "invalid_request")
    elif content_type != OCTET_STREAM:
        expected = (415, "unsupported_media_type")
    elif not body:
        expected = (400, "empty_body")
    elif parsed is None:
        expected = (400, "invalid_key_id")
    elif not 0 <= index_value < xgb_parts:
        expected = (400, "invalid_part")
    else:
        expected = OK
    stored = http.put(f"/v1/models/{XGB}/keys/{key_id}/parts/{index}", content=body, headers=headers)
    assert_answer(stored, expected)
    if expected == OK:
        assert stored.json()["key_id"] == parsed  # as it is stored: lowercase
    listed = http.get(f"/v1/models/{XGB}/keys/{key_id}/parts")
    assert_answer(listed, OK if parsed else (400, "invalid_key_id"))
    if parsed:
        assert listed.json()["key_id"] == parsed


@HTTP
@given(
    key_id=st.one_of(spellings(NO_PARTS_KEY_ID), fuzzed_key_ids),
    parts=integer_texts,
)
def test_complete_route_gives_fuzz_its_answer(http, xgb_parts, key_id, parts):
    count = parsed_int(parts)
    if count is None:
        expected = (400, "invalid_request")
    elif parse_key_id(key_id) is None:
        expected = (400, "invalid_key_id")
    elif not 0 < count <= xgb_parts:
        expected = (400, "invalid_part")
    else:
        expected = (400, "missing_parts")  # no part was ever sent for this key id
    assert_answer(http.post(f"/v1/models/{XGB}/keys/{key_id}/complete", params={"parts": parts}), expected)


def _form(boundary: str, fields: list[tuple[str, str | None, bytes]]) -> bytes:
    parts = []
    for name, filename, value in fields:
        disposition = f'form-data; name="{name}"' + (
            f'; filename="{filename}"' if filename is not None else ""
        )
        parts.append(f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + value + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode()


forms = st.builds(
    _form,
    st.just("fuzzboundary"),
    st.lists(
        st.tuples(
            st.sampled_from(["key", "model_input", "uid", "x"]),
            st.one_of(st.none(), st.just("f.bin")),
            st.one_of(st.binary(max_size=40), st.just(KEY_ID.encode())),
        ),
        max_size=3,
    ),
)


Field = tuple[str, str | None, bytes]  # name, filename (None: a text field), content
Form = dict[str, bytes | str]  # a parsed form: field name -> a file's content (bytes) or a text field's value
MAX_FILES, MAX_TEXT_FIELDS = 1, 4  # a Zama-compatible form's: one file, uid and the hybrid client's 3 names
MULTIPART = "multipart/form-data"


def expected_form(route: str, form: Form, store: Store) -> Answer:
    """A parsed form on a Zama-compatible route (service/compat.py, docs/http-api.md): the hybrid
    client's circuit names when it has them, then the route's fields in the order it reads them, then the
    key upload or the prediction of the default model."""
    if "model_name" in form:  # the hybrid client: its three names, then its circuit (no hybrid is served)
        if not all(isinstance(form.get(name), str) for name in ("model_name", "module_name", "input_shape")):
            return 400, "missing_field"
        return 404, "unknown_model"
    uid = form.get("uid")
    if route == "/compute" and not isinstance(uid, str):
        return 400, "missing_field"
    data = form.get("key" if route == "/add_key" else "model_input")
    if not isinstance(data, bytes):
        return 400, "missing_field"
    if not data:
        return 400, "empty_body"
    if route == "/add_key":
        return upload_answer(DEFAULT_MODEL, data, store)
    return key_answer(DEFAULT_MODEL, uid, store) or rows_answer([data], DEFAULT_MODEL)


def expected_zama(route: str, fields: list[Field], store: Store) -> Answer:
    """A well-formed form: at most MAX_FILES files and MAX_TEXT_FIELDS text fields, the last field of a
    name wins (starlette), text fields read as UTF-8."""
    if (
        sum(f is not None for _, f, _ in fields) > MAX_FILES
        or sum(f is None for _, f, _ in fields) > MAX_TEXT_FIELDS
    ):
        return 400, "invalid_multipart"
    form = {name: value if filename is not None else value.decode() for name, filename, value in fields}
    return expected_form(route, form, store)


text_values = st.one_of(
    st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=70),
    st.just(KEY_ID),
    st.just(KEY_ID.upper()),
)
well_formed_fields = st.lists(
    st.one_of(
        st.tuples(
            st.sampled_from(["key", "model_input", "uid", "x"]), st.just("f.bin"), st.binary(max_size=40)
        ),
        st.tuples(
            st.sampled_from(["key", "model_input", "uid", "x"]), st.none(), text_values.map(str.encode)
        ),
    ),
    max_size=3,
)


@HTTP
@given(route=st.sampled_from(["/add_key", "/compute"]), fields=well_formed_fields)
def test_zama_multipart_routes_give_a_well_formed_form_its_answer(http, store, route, fields):
    body = _form("fuzzboundary", fields)
    expected = expected_zama(route, fields, store)
    response = http.post(
        route, content=body, headers={"Content-Type": "multipart/form-data; boundary=fuzzboundary"}
    )
    assert_answer(response, expected)


def parsed_form(body: bytes, content_type: str) -> Form | None:
    """The form that starlette's multipart parser, the routes' own, reads from `body` under the routes'
    limits (MAX_FILES, MAX_TEXT_FIELDS); None when it refuses the body (a missing boundary, a part without
    a name, too many parts, ...), which the routes answer 400 invalid_multipart."""

    async def parse() -> Form:
        async def chunks():
            if body:
                yield body

        parser = MultiPartParser(
            Headers({"content-type": content_type}), chunks(), max_files=MAX_FILES, max_fields=MAX_TEXT_FIELDS
        )
        form = await parser.parse()
        try:
            return {
                name: value if isinstance(value, str) else await value.read()
                for name, value in form.multi_items()
            }
        finally:
            await form.close()

    try:
        return asyncio.run(parse())
    except Exception:  # starlette raises several errors for a body it cannot parse
        return None


@HTTP
@given(
    route=st.sampled_from(["/add_key", "/compute"]),
    body=st.one_of(mutated(forms), st.binary(max_size=60)),
    content_type=st.sampled_from(
        [
            "multipart/form-data; boundary=fuzzboundary",
            "multipart/form-data",
            "multipart/form-data; boundary=",
            "application/x-www-form-urlencoded",
        ]
    ),
)
def test_zama_multipart_routes_give_a_mangled_form_its_answer(http, store, route, body, content_type):
    if content_type.split(";")[0].strip() != MULTIPART:
        expected = (415, "unsupported_media_type")
    elif (form := parsed_form(body, content_type)) is None:
        expected = (400, "invalid_multipart")
    else:
        expected = expected_form(route, form, store)
    assert_answer(http.post(route, content=body, headers={"Content-Type": content_type}), expected)
