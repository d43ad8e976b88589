"""Hostile ciphertexts and keys: nothing reaches concrete before it has the exact shape that concrete-ml's
client produces for the model, and a crafted message never takes the FHE engine down.

In process: the attacks measured in issue 10 (payload split into several blobs, a shortened inner blob,
tiny fake key sets), and a structured fuzzer (hypothesis) that mutates real messages at the Cap'n Proto
level: pointer words (offsets, kinds, list lengths, struct sizes), data sections (key parameters),
segment tables, truncations, blob counts and sizes. Then the same fuzzer against a real served runner,
while honest clients predict: no engine death, every honest answer decrypts correctly, and every fuzzed
message gets exactly the answer that the documented layout checks owe it (`layout_refusal`, worked out
from the strict reader and the model's recorded size and shape, in the documented order).
"""

from __future__ import annotations

import struct
import threading

import httpx
import pytest
from conftest import LOGREG, XGB, assert_documented_rejection, imported_spec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fhe_bento.checks.capnp_wire import MalformedMessage, first_difference, read_shape
from fhe_bento.checks.payloads import check_ciphertext, check_key
from fhe_bento.client import FHEClient
from fhe_bento.contract.errors import FHEBentoError
from fhe_bento.models.repository import ModelSpec
from fhe_bento.protocol.keys import key_id
from harness.capnp_attacks import (
    FAMILIES,
    layout_refusal,
    mutate,
    payloads,
    split_blobs,
    unfar,
    write_message,
)

OCTET = {"Content-Type": "application/octet-stream"}
IN_PROCESS = settings(
    max_examples=200, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
SERVED = settings(
    max_examples=100,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@pytest.fixture(scope="module")
def real(server, demo, client_cache):
    """Real ciphertexts and evaluation keys of both demo models, made by the fhe-bento client."""
    client = FHEClient(server.url, cache_dir=client_cache, progress=False)
    xgb, logreg = client.model(XGB), client.model(LOGREG)
    row = demo.x_test[:1]
    return {
        "xgb": xgb,
        "logreg": logreg,
        "xgb_key": xgb.evaluation_key(),
        "xgb_key_id": xgb.ensure_key(),
        "xgb_ct": xgb.encrypt(row)[0],
        "logreg_ct": logreg.encrypt(row)[0],
        "specs": {XGB: imported_spec(XGB), LOGREG: imported_spec(LOGREG)},
    }


def check(spec: ModelSpec, data: bytes, what: str) -> None:
    meta = spec.meta
    if what == "key":
        check_key(data, meta.eval_key_bytes, meta.key_shape, spec.name)
    else:
        check_ciphertext(data, meta.ciphertext_bytes, meta.ciphertext_shape, spec.name)


def refusal(spec: ModelSpec, data: bytes, what: str) -> FHEBentoError:
    """The check's refusal of `data`, which must be exactly the one its layout calls for."""
    expected = layout_refusal(spec, data, what)
    assert expected is not None, "this attack has the model's exact layout"
    with pytest.raises(FHEBentoError) as caught:
        check(spec, data, what)
    assert (caught.value.status, caught.value.code) == expected, caught.value.message
    return caught.value


def assert_checked(spec: ModelSpec, message: bytes, content_only: bool, what: str) -> None:
    """The model's check refuses a fuzzed message exactly as its layout calls for, or passes it when it has
    the model's exact layout: always when only its payload changed."""
    expected = layout_refusal(spec, message, what)
    assert expected is None or not content_only, expected
    if expected is not None:
        refusal(spec, message, what)
    else:
        check(spec, message, what)


# --- the attacks of issue 10, in process ---------------------------------------------------------------


@pytest.mark.parametrize("parts", [2, 4])
def test_a_payload_split_into_several_blobs_is_refused(real, parts):
    for name, what, data in [
        (LOGREG, "ciphertext", real["logreg_ct"]),
        (XGB, "ciphertext", real["xgb_ct"]),
        (XGB, "key", real["xgb_key"]),
    ]:
        error = refusal(real["specs"][name], split_blobs(data, parts), what)
        assert error.status == 422, error.message


def test_a_key_with_one_inner_blob_shortened_is_refused_even_at_the_right_size(real):
    key = real["xgb_key"]
    # Shorten the first bootstrap key's blob by 8 bytes and lengthen the last payload's by 8: same total.
    shape = read_shape(key, keep_blobs=True)
    first, last = payloads(shape)[0], payloads(shape)[-1]
    _, size, content = unfar(first[1][0])
    first[1] = [["B", size - 8, content[: size - 8]]]
    _, size, content = unfar(last[1][0])
    last[1] = [["B", size + 8, content + bytes(8)]]
    crafted = write_message(shape)
    error = refusal(real["specs"][XGB], crafted, "key")
    assert "blob" in error.message or "bytes" in error.message


@pytest.mark.parametrize("blob_bytes", [(8, 8), (7,), (8,), ()])
def test_a_tiny_fake_key_set_is_refused_by_its_size(real, blob_bytes):
    shape = read_shape(real["xgb_key"], keep_blobs=True)
    keys = unfar(shape[1][2][0])  # the bootstrap keys
    keys[3] = keys[3][:1]
    payload = payloads(["M", keys[3][0], []])[0]
    payload[1] = [["B", n, bytes(n)] for n in blob_bytes]
    shape[1][2][1] = shape[1][2][2] = None
    fake = write_message(shape)
    assert len(fake) < 200
    error = refusal(real["specs"][XGB], fake, "key")
    assert error.status == 422 and f"{len(fake)} bytes" in error.message


def test_real_messages_pass_and_foreign_ones_do_not(real):
    specs = real["specs"]
    check(specs[XGB], real["xgb_ct"], "ciphertext")
    check(specs[LOGREG], real["logreg_ct"], "ciphertext")
    check(specs[XGB], real["xgb_key"], "key")
    assert refusal(specs[LOGREG], real["xgb_ct"], "ciphertext").status == 422  # another circuit's variance
    assert refusal(specs[LOGREG], real["xgb_key"], "key").status == 422
    assert refusal(specs[XGB], real["xgb_key"][: len(real["xgb_key"]) // 3], "key").status == 400


def test_the_reader_refuses_double_far_and_shared_pointers(real):
    data = bytearray(real["logreg_ct"])
    root_at = 16  # two segments: 8 bytes of table, padded to 16
    root = struct.unpack_from("<Q", data, root_at)[0]
    struct.pack_into("<Q", data, root_at, root & ~3 | 2 | 4)  # made a double-far pointer
    with pytest.raises(MalformedMessage, match="far"):
        read_shape(bytes(data))
    # Point the rawInfo pointer (root struct's second pointer) at the payload struct: shared.
    data = bytearray(real["logreg_ct"])
    root_struct = root_at + 8 * (1 + ((root >> 2) & ((1 << 30) - 1)))
    payload_ptr = struct.unpack_from("<Q", data, root_struct)[0]
    target_words = (payload_ptr >> 2) & ((1 << 30) - 1)  # relative to word 0 of the root struct
    shared = ((target_words - 1) << 2) & 0xFFFFFFFF | payload_ptr & ~0xFFFFFFFF
    struct.pack_into("<Q", data, root_struct + 8, shared)
    with pytest.raises(MalformedMessage, match="share"):
        read_shape(bytes(data))


def test_rewriting_a_message_keeps_its_content(real):
    """The test tooling writes real Cap'n Proto: concrete's own types read back what it wrote."""
    from concrete import fhe

    rewritten = write_message(read_shape(real["xgb_ct"], keep_blobs=True))
    assert (
        first_difference(
            read_shape(rewritten, keep_blobs=True)[1],
            _flatten_far(read_shape(real["xgb_ct"], keep_blobs=True)[1]),
        )
        is None
    )
    assert fhe.Value.deserialize(rewritten).serialize() == fhe.Value.deserialize(real["xgb_ct"]).serialize()


def _flatten_far(node):
    if isinstance(node, list):
        node = unfar(node)
        return [_flatten_far(child) for child in node]
    return node


# --- structured fuzzing -----------------------------------------------------------------------------------


@st.composite
def mutation(draw, data: bytes, allow_content: bool = True):
    """A real message mutated by one attack family, and whether only blob content changed."""
    families = [f for f in FAMILIES if allow_content or f != "blob content"]
    family = draw(st.sampled_from(families))
    return mutate(data, family, lambda lo, hi: draw(st.integers(lo, hi))), family == "blob content"


@given(data=st.data())
@IN_PROCESS
def test_fuzzed_ciphertexts_are_refused_unless_only_their_payload_changed(real, data):
    name = data.draw(st.sampled_from([XGB, LOGREG]))
    message, content_only = data.draw(mutation(real[f"{'xgb' if name == XGB else 'logreg'}_ct"]))
    assert_checked(real["specs"][name], message, content_only, "ciphertext")


@given(data=st.data())
@settings(max_examples=12, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
def test_fuzzed_keys_are_refused_unless_only_their_payload_changed(real, data):
    message, content_only = data.draw(mutation(real["xgb_key"]))
    assert_checked(real["specs"][XGB], message, content_only, "key")


# --- the same fuzzer against a served runner ------------------------------------------------------------


class HonestClients:
    """Honest predictions in a loop while the fuzzer runs: every one must decrypt to the clear prediction."""

    def __init__(self, real, demo) -> None:
        self.real, self.demo = real, demo
        self.answers: list[bool] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        rows = self.demo.x_test
        index = 0
        while not self.stop.is_set() and index < 2000:  # bounded
            model = self.real["xgb"] if index % 25 == 0 else self.real["logreg"]
            row = rows[index % len(rows) : index % len(rows) + 1]
            self.answers.append(model.predict(row)[0] == self.demo.clear_predict(model.name, row)[0])
            index += 1

    def __enter__(self) -> HonestClients:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()


@pytest.fixture(scope="module")
def honest(real, demo, server):
    restarts = server.metric("fhe_bento_engine_restarts_total")
    logged = len(server.log())  # the session server's log: earlier tests restarted it
    with HonestClients(real, demo) as clients:
        yield clients
    assert clients.answers and all(clients.answers), clients.answers.count(False)
    assert server.metric("fhe_bento_engine_restarts_total") == restarts
    assert "FHE engine process died" not in server.log()[logged:]


Answer = tuple[int, str | None]  # status, error code (None for a 2xx)


def expected_prediction(spec: ModelSpec, message: bytes) -> Answer:
    """`POST /v1/models/{name}/predict` of `message` with the registered XGB key's id (runners/runner.py:
    the model, its key, then the row): an empty body is refused as it is read; then the model's layout
    check; a row of the model's exact layout is computed (the key is registered, or the model needs none),
    200."""
    if not message:
        return 400, "empty_body"
    return layout_refusal(spec, message, "ciphertext") or (200, None)


def expected_upload(server, spec: ModelSpec, message: bytes) -> Answer:
    """`POST /v1/models/{name}/keys` of `message` (keys/service.py): an empty body, then a key registered
    already is 200 unchecked, else the model's layout check, then the throwaway verifier, where concrete
    deserializes it. That last answer is concrete's: a key of the model's exact layout carries every
    parameter and blob size of the model's keyset (only blob contents are free, and concrete reads any bytes
    there as integers), so it deserializes and is stored, 201; were concrete's deserializer to die on it,
    the answer would be 400 invalid_key, and this test would say so."""
    if not message:
        return 400, "empty_body"
    head = httpx.head(f"{server.url}/v1/models/{spec.name}/keys/{key_id(message)}", timeout=60)
    if head.status_code == 200:
        return 200, None
    return layout_refusal(spec, message, "key") or (201, None)


@given(data=st.data())
@SERVED
def test_fuzzed_ciphertexts_never_take_the_served_engine_down(server, real, honest, data):
    name = data.draw(st.sampled_from([XGB, LOGREG]))
    # A content-only mutation of an XGB row would compute for seconds: those are covered in process.
    message, content_only = data.draw(
        mutation(real["xgb_ct" if name == XGB else "logreg_ct"], allow_content=name == LOGREG)
    )
    headers = {**OCTET, "X-FHE-Key-Id": real["xgb_key_id"]}
    expected = expected_prediction(real["specs"][name], message)
    assert not content_only or expected == (200, None)  # only a payload changed: the engine computes on it
    response = httpx.post(
        f"{server.url}/v1/models/{name}/predict", content=message, headers=headers, timeout=120
    )
    assert response.status_code == expected[0], (expected, response.text[:300])
    if expected[1] is not None:
        assert_documented_rejection(response, expected)


@given(data=st.data())
@settings(
    max_examples=10,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
def test_fuzzed_keys_never_take_the_served_engine_down(server, real, honest, data):
    message, _ = data.draw(mutation(real["xgb_key"], allow_content=False))
    expected = expected_upload(server, real["specs"][XGB], message)
    response = httpx.post(f"{server.url}/v1/models/{XGB}/keys", content=message, headers=OCTET, timeout=300)
    assert response.status_code == expected[0], (expected, response.text[:300])
    if expected[1] is not None:
        assert_documented_rejection(response, expected)
