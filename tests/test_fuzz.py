"""Fuzzing (hypothesis) of every parser the server owns: the batch framing, the async envelope, the
SageMaker custom attributes, the upload part routes and the Zama-compatible multipart forms.

The pure parsers are fuzzed in process, with many examples: they may only answer or raise their one
documented error. Then the same parsers are fuzzed through a real `bentoml serve`, and each input must get
the answer its own bytes call for (`expected_*` below, worked out from the documented order of checks and
the wire format, never from the server): no fuzzed input is a real ciphertext or key, so none gets a 200
except where the route answers any well-formed request."""

from __future__ import annotations

import httpx
import pytest
from conftest import LOGREG, XGB, assert_documented_rejection
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import TypeAdapter, ValidationError

from fhe_bento.checks.capnp_wire import MalformedMessage, read_shape
from fhe_bento.contract.errors import FHEBentoError
from fhe_bento.protocol import wire
from fhe_bento.protocol.keys import is_key_id, part_count
from fhe_bento.protocol.names import ATTRIBUTES_HEADER, OCTET_STREAM, PART_BYTES
from fhe_bento.service.sagemaker import Attributes, parse_attributes

KEY_ID = "ab" * 32  # the one upload the part routes' fuzz opens
NO_PARTS_KEY_ID = "cd" * 32  # a key id no part is ever sent for
HTTP = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MAX_BATCH_ROWS = 256  # FHE_BENTO_MAX_BATCH_ROWS's default
Answer = tuple[int, str | None]  # status, error code (None for a 200)
OK: Answer = (200, None)


def verdict(data: bytes, what: str) -> Answer:
    """What a ciphertext or key that is not the model's gets (every fuzzed one: the demo models' are
    thousands of bytes): 400 when it is not a Cap'n Proto message, 422 when it is one of the wrong size."""
    try:
        read_shape(data)
    except MalformedMessage:
        return 400, f"invalid_{what}"
    return 422, f"{what}_mismatch"


def expected_batch(body: bytes, content_type: str) -> Answer:
    """A batch route: content type, then an empty body, the framing, then the first row (every row is
    checked before any runs)."""
    if content_type not in (wire.CONTENT_TYPE, OCTET_STREAM):
        return 415, "unsupported_media_type"
    if not body:
        return 400, "empty_body"
    try:
        rows = wire.decode_batch(body, MAX_BATCH_ROWS)
    except wire.FramingError:
        return 400, "invalid_batch"
    return verdict(rows[0], "ciphertext")


def assert_answer(response: httpx.Response, expected: Answer) -> None:
    status, code = expected
    if code is None:
        assert response.status_code == status, (response.status_code, response.text[:300])
    else:
        assert assert_documented_rejection(response) == code, (expected, response.text[:300])
        assert response.status_code == status


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


@settings(max_examples=2000, deadline=None)
@given(batches)
def test_batch_framing_answers_or_raises_its_own_error(data):
    try:
        decoded = wire.decode_batch(data, max_rows=4)
    except wire.FramingError:
        return
    assert 1 <= len(decoded) <= 4 and wire.encode_batch(decoded) == data


@settings(max_examples=2000, deadline=None)
@given(envelopes)
def test_envelope_header_answers_or_raises_its_own_error(data):
    try:
        header, offset = wire.read_envelope_header(data)
    except wire.FramingError:
        return
    assert header.key_bytes >= 0 and offset <= len(data)


@settings(max_examples=2000, deadline=None)
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


@HTTP
@given(
    body=batches, content_type=st.sampled_from([wire.CONTENT_TYPE, "application/octet-stream", "text/plain"])
)
def test_predict_batch_route_gives_fuzz_its_answer(http, body, content_type):
    response = http.post(
        f"/v1/models/{LOGREG}/predict_batch", content=body, headers={"Content-Type": content_type}
    )
    assert_answer(response, expected_batch(body, content_type))


def expected_invocation(attributes: str) -> Answer:
    """`/invocations` with an empty octet-stream body: the attributes first, then each op's own order of
    checks (docs/sagemaker.md); every op that reads a body stops at the empty one."""
    try:
        attrs = parse_attributes(attributes)
    except FHEBentoError as exc:
        return exc.status, exc.code
    unknown_model = attrs.model is not None and attrs.model not in (XGB, LOGREG)
    op = attrs.op or "envelope"
    if op == "list_models":
        return OK
    if op == "has_key" and attrs.key is None:  # has_key asks for its key before its model
        return 400, "invalid_attributes"
    if unknown_model:
        return 404, "unknown_model"
    if op == "transform":
        return 415, "unsupported_media_type"
    if op in ("put_key", "put_key_part", "predict", "predict_batch", "envelope"):
        return 400, "empty_body"
    if op == "get_client":
        return OK
    if attrs.key is None or (op == "complete_key" and attrs.parts is None):
        return 400, "invalid_attributes"
    if not is_key_id(attrs.key):
        return 400, "invalid_key_id"
    if op == "complete_key":
        return (400, "missing_parts") if attrs.parts and 0 < attrs.parts <= 64 else (400, "invalid_part")
    return OK  # has_key, key_parts: any well-formed key id has an answer


@HTTP
@given(attributes=attribute_texts)
def test_invocations_give_fuzzed_attributes_their_answer(http, attributes):
    attributes = (
        attributes.strip()
    )  # HTTP drops the whitespace around a header value (h11 refuses to send it)
    expected = expected_invocation(attributes)
    if expected == (400, "missing_parts") and KEY_ID in attributes:
        return  # the part routes' fuzz may have sent parts for KEY_ID: its answer depends on them
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


@HTTP
@given(body=envelopes)
def test_invocations_refuse_a_fuzzed_envelope(http, body):
    response = http.post("/invocations", content=body, headers={"Content-Type": OCTET_STREAM})
    if not body:
        assert_answer(response, (400, "empty_body"))
        return
    try:
        header, _ = wire.read_envelope_header(body)
    except wire.FramingError:
        assert_answer(response, (400, "invalid_envelope"))
        return
    if header.model and header.model not in (XGB, LOGREG):
        assert_answer(response, (404, "unknown_model"))
        return
    # Past its header, what an envelope gets depends on its inline key, its batch and its key id, in turn.
    assert assert_documented_rejection(response) in {
        "invalid_envelope",
        "invalid_key",
        "key_mismatch",
        "invalid_batch",
        "invalid_ciphertext",
        "ciphertext_mismatch",
        "invalid_key_id",
        "missing_key_id",
        "unknown_key",
    }


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


# Path segments that still reach the part routes (an empty or dotted segment is another path, which
# BentoML's router answers), and integers as a path or query parameter may spell them.
fuzzed_key_ids = st.text(alphabet="0123456789abcdefABCDEF-_xyz", min_size=1, max_size=70)
integer_texts = st.one_of(
    st.integers(-5, 2000).map(str), st.text(alphabet="0123456789-+ex", min_size=1, max_size=8)
)


@HTTP
@given(
    key_id=st.one_of(st.just(KEY_ID), fuzzed_key_ids),
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
    if index_value is None:
        expected = (400, "invalid_request")
    elif content_type != OCTET_STREAM:
        expected = (415, "unsupported_media_type")
    elif not body:
        expected = (400, "empty_body")
    elif not is_key_id(key_id):
        expected = (400, "invalid_key_id")
    elif not 0 <= index_value < xgb_parts:
        expected = (400, "invalid_part")
    else:
        expected = OK
    assert_answer(
        http.put(f"/v1/models/{XGB}/keys/{key_id}/parts/{index}", content=body, headers=headers), expected
    )
    listed = http.get(f"/v1/models/{XGB}/keys/{key_id}/parts")
    assert_answer(listed, OK if is_key_id(key_id) else (400, "invalid_key_id"))


@HTTP
@given(
    key_id=st.one_of(st.just(NO_PARTS_KEY_ID), fuzzed_key_ids),
    parts=integer_texts,
)
def test_complete_route_gives_fuzz_its_answer(http, xgb_parts, key_id, parts):
    count = parsed_int(parts)
    if count is None:
        expected = (400, "invalid_request")
    elif not is_key_id(key_id):
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


def expected_zama(route: str, fields: list[Field]) -> Answer:
    """A well-formed form on a Zama-compatible route: one file and four text fields at most (uid and the
    hybrid client's three names), the last field of a name wins (starlette), then the route's fields in the
    order it reads them."""
    if sum(f is not None for _, f, _ in fields) > 1 or sum(f is None for _, f, _ in fields) > 4:
        return 400, "invalid_multipart"
    form = {name: (filename, value) for name, filename, value in fields}
    if route == "/compute":
        uid = form.get("uid")
        if uid is None or uid[0] is not None:
            return 400, "missing_field"
    needed = form.get("key" if route == "/add_key" else "model_input")
    if needed is None or needed[0] is None:
        return 400, "missing_field"
    if not needed[1]:
        return 400, "empty_body"
    if route == "/add_key":
        return verdict(needed[1], "key")
    if not is_key_id(form["uid"][1].decode().strip().lower()):
        return 400, "invalid_key_id"
    return 404, "unknown_key"  # the default model needs a key, looked up before any row: none is registered


text_values = st.one_of(
    st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=70), st.just(KEY_ID)
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
def test_zama_multipart_routes_give_a_well_formed_form_its_answer(http, route, fields):
    body = _form("fuzzboundary", fields)
    response = http.post(
        route, content=body, headers={"Content-Type": "multipart/form-data; boundary=fuzzboundary"}
    )
    assert_answer(response, expected_zama(route, fields))


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
def test_zama_multipart_routes_refuse_a_mangled_form(http, route, body, content_type):
    response = http.post(route, content=body, headers={"Content-Type": content_type})
    code = assert_documented_rejection(
        response
    )  # never a 200: no fuzzed key is a real key, no uid is registered
    if content_type.startswith("application/"):
        assert code == "unsupported_media_type"
    else:
        assert code in {
            "invalid_multipart",
            "missing_field",
            "empty_body",
            "invalid_key_id",
            "unknown_key",
        } | {f"{prefix}{what}" for what in ("key", "ciphertext") for prefix in ("invalid_", "")} | {
            "key_mismatch",
            "ciphertext_mismatch",
        }, code
