"""Fuzzing (hypothesis) of every parser the server owns: the batch framing, the async envelope, the
SageMaker custom attributes, the upload part routes and the Zama-compatible multipart forms.

The pure parsers are fuzzed in process, with many examples: they may only answer or raise their one
documented error. Then the same parsers are fuzzed through a real `bentoml serve`: no input may get a 5xx,
and every rejection must carry a documented code with its documented status."""

from __future__ import annotations

import httpx
import pytest
from conftest import LOGREG, XGB, assert_documented_rejection
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fhe_bento.core.errors import FHEBentoError
from fhe_bento.protocol import wire
from fhe_bento.protocol.names import ATTRIBUTES_HEADER
from fhe_bento.service.sagemaker import Attributes, parse_attributes

KEY_ID = "ab" * 32
HTTP = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


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
def test_predict_batch_route_rejects_fuzz_with_documented_codes(http, body, content_type):
    response = http.post(
        f"/v1/models/{LOGREG}/predict_batch", content=body, headers={"Content-Type": content_type}
    )
    if response.status_code != 200:  # a fuzzed batch of garbage rows is never a valid set of ciphertexts
        assert_documented_rejection(response)


@HTTP
@given(body=st.one_of(envelopes, batches), attributes=attribute_texts)
def test_invocations_reject_fuzz_with_documented_codes(http, body, attributes):
    response = http.post(
        "/invocations",
        content=body,
        headers={
            # HTTP drops the whitespace around a header value anyway (and h11 refuses to send it).
            "Content-Type": "application/octet-stream",
            ATTRIBUTES_HEADER: attributes.strip(),
        },
    )
    if response.status_code != 200:  # e.g. op=list_models answers whatever the body
        assert_documented_rejection(response)


@HTTP
@given(
    # Path segments that still reach these routes (an empty or dotted segment is another path, which
    # BentoML's router answers).
    key_id=st.one_of(
        st.just(KEY_ID), st.text(alphabet="0123456789abcdefABCDEF-_xyz", min_size=1, max_size=70)
    ),
    index=st.one_of(
        st.integers(-5, 2000).map(str), st.text(alphabet="0123456789-+ex", min_size=1, max_size=8)
    ),
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
def test_upload_part_routes_reject_fuzz_with_documented_codes(http, key_id, index, body, headers):
    response = http.put(f"/v1/models/{XGB}/keys/{key_id}/parts/{index}", content=body, headers=headers)
    if response.status_code != 200:
        assert_documented_rejection(response)
    for check in (
        http.get(f"/v1/models/{XGB}/keys/{key_id}/parts"),
        http.post(f"/v1/models/{XGB}/keys/{key_id}/complete", params={"parts": index}),
    ):
        if check.status_code != 200:
            assert_documented_rejection(check)


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
def test_zama_multipart_routes_reject_fuzz_with_documented_codes(http, route, body, content_type):
    response = http.post(route, content=body, headers={"Content-Type": content_type})
    assert_documented_rejection(response)  # never a 200: no fuzzed key is a real key, no uid is registered
