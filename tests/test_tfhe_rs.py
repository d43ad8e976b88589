"""Models compiled with `ciphertext_format="tfhe-rs"` (docs/models.md, "TFHE-rs ciphertexts"), in process: the
service's app around a real `Runner` serving the TFHE-rs demo (an 8-bit XGB whose rows and results are
TFHE-rs radix ciphertexts) beside the tiny XGB. Rows are real FHE, about 2 s each."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
from conftest import XGB, Demo, TfheRs, assert_error, served_app
from fastapi.testclient import TestClient

from fhe_bento.checks.radix_wire import BLOCK_TAIL, ELEMENT_TAIL
from fhe_bento.client import FHEClient
from fhe_bento.client.http_transport import HTTPTransport
from fhe_bento.protocol.names import KEY_ID_HEADER

OCTET = {"Content-Type": "application/octet-stream"}


@pytest.fixture(scope="module")
def http(tfhe_rs: TfheRs, demo: Demo, tmp_path_factory):
    from fhe_bento.service.settings import ServiceSettings

    root = tmp_path_factory.mktemp("tfhe-rs-app")
    settings = ServiceSettings(
        models=f"{tfhe_rs.name}:latest,{XGB}:latest",
        key_store=(root / "keys").as_uri(),
        staging_dir=root / "staging",
    )
    with served_app(settings) as (client, _):
        yield client


def _client(http: TestClient, cache: Path) -> FHEClient:
    return FHEClient(
        transport=HTTPTransport(str(http.base_url), client=http), cache_dir=cache, progress=False
    )


class ZamaClient:
    """concrete-ml's own client of the TFHE-rs demo, used as concrete-ml's docs show: one call makes its keys
    and gives the evaluation key, then rows are encrypted and results decrypted."""

    def __init__(self, tfhe_rs: TfheRs, http: TestClient, key_dir: Path) -> None:
        from concrete.ml.deployment import FHEModelClient

        self.http, self.name = http, tfhe_rs.name
        self.fhe = FHEModelClient(str(tfhe_rs.dev_dir), key_dir=str(key_dir))
        key = self.fhe.get_serialized_evaluation_keys()
        self.key_id = HTTPTransport(str(http.base_url), client=http).put_whole_key(self.name, key)["key_id"]

    def row(self, x: np.ndarray) -> bytes:
        (radix,) = self.fhe.quantize_encrypt_serialize(x)  # a tuple of one radix array
        return radix

    def predict(self, body: bytes):
        return self.http.post(
            f"/v1/models/{self.name}/predict",
            content=body,
            headers={**OCTET, KEY_ID_HEADER: self.key_id},
        )


@pytest.fixture(scope="module")
def zama(tfhe_rs: TfheRs, http: TestClient, tmp_path_factory) -> ZamaClient:
    return ZamaClient(tfhe_rs, http, tmp_path_factory.mktemp("zama-keys"))


def test_the_listing_describes_a_tfhe_rs_model(http: TestClient, tfhe_rs: TfheRs) -> None:
    listed = {m["name"]: m for m in http.get("/v1/models").json()}
    model = listed[tfhe_rs.name]
    assert (model["ciphertext_format"], model["n_features"], model["n_outputs"]) == ("tfhe-rs", 4, 2)
    assert model["needs_key"] is True
    assert listed[XGB]["ciphertext_format"] == "concrete"


def test_concrete_mls_own_client_gets_the_clear_predictions(zama: ZamaClient, tfhe_rs: TfheRs) -> None:
    """concrete-ml's FHEModelClient, unmodified: a radix row in, a radix result out, decrypted to exactly
    the clear model's scores, row by row."""
    for x in tfhe_rs.x_test[:2]:
        answer = zama.predict(zama.row(x[np.newaxis]))
        assert answer.status_code == 200, answer.text
        np.testing.assert_array_equal(
            zama.fhe.deserialize_decrypt_dequantize(answer.content),
            tfhe_rs.model.predict_proba(x[np.newaxis], fhe="disable"),
        )


def test_fhe_bento_client_keeps_the_radix_key_with_its_keyset(
    http: TestClient, tfhe_rs: TfheRs, tmp_path: Path
) -> None:
    """The client's predictions equal the clear ones; a second client on the same key cache (another
    process, as far as concrete-ml is concerned) encrypts and decrypts with the same radix key, whose
    keyset the server holds: its predictions are right too, with no new key upload."""
    x = tfhe_rs.x_test[:3]
    expected = tfhe_rs.model.predict(x, fhe="disable")
    first = _client(http, tmp_path).model(tfhe_rs.name)
    np.testing.assert_array_equal(first.predict(x), expected)
    assert (first.folder / "tfhe-rs-secret-key").stat().st_mode & 0o777 == 0o600
    again = _client(http, tmp_path).model(tfhe_rs.name)
    assert again.evaluation_key() == first.evaluation_key()
    np.testing.assert_array_equal(again.predict(x[::-1]), expected[::-1])


def _with_word(row: bytes, offset: int, value: int) -> bytes:
    return row[:offset] + struct.pack("<Q", value) + row[offset + 8 :]


def _mutations(row: bytes) -> dict[str, tuple[bytes, int, str]]:
    """Crafted variants of a real radix row: name -> (body, status, code), as docs/http-api.md lists them."""
    lwe_size = struct.unpack_from("<Q", row, 16)[0]
    block = 8 + lwe_size * 8 + BLOCK_TAIL
    first_tail = 16 + block - BLOCK_TAIL
    degree = first_tail + 24  # the block's degree, after its ciphertext modulus (16 + 8 bytes)
    tails = [16 + b * block + block - BLOCK_TAIL for b in range(4)]  # the first integer's four blocks
    every_degree = bytearray(row)
    for element in range(4):
        for tail in tails:
            at = tail + element * (8 + 4 * block + ELEMENT_TAIL) + 24
            every_degree[at : at + 8] = struct.pack("<Q", 15)
    return {
        "truncated": (row[:-1], 400, "invalid_ciphertext"),
        "padded": (row + bytes(8), 400, "invalid_ciphertext"),
        "element count past the body": (_with_word(row, 0, 2**40), 400, "invalid_ciphertext"),
        "an element count too many": (_with_word(row, 0, 5), 400, "invalid_ciphertext"),
        "a block count too few": (_with_word(row, 8, 3), 400, "invalid_ciphertext"),
        "a shorter LWE": (_with_word(row, 16, lwe_size - 1), 400, "invalid_ciphertext"),
        "one block of another degree": (_with_word(row, degree, 15), 400, "invalid_ciphertext"),
        "every block of another degree": (bytes(every_degree), 422, "ciphertext_mismatch"),
        "garbage": (np.random.default_rng(0).bytes(len(row)), 400, "invalid_ciphertext"),
    }


def test_crafted_radix_rows_get_documented_answers_and_never_reach_concrete(
    zama: ZamaClient, tfhe_rs: TfheRs, demo: Demo, tmp_path: Path
) -> None:
    """Every crafted variant of a real row is refused by the layout check with its documented answer; so
    are a Concrete ciphertext sent to the TFHE-rs model, a radix row sent to a Concrete model, a radix row
    of another width, and another model's key. The engine never saw any of them: a real row still gets the
    clear prediction afterwards."""
    import concrete_ml_extensions as fhext
    from concrete.ml.deployment import FHEModelClient

    row = zama.row(tfhe_rs.x_test[:1])
    for name, (body, status, code) in _mutations(row).items():
        response = zama.predict(body)
        assert response.status_code == status, (name, response.text)
        assert_error(response, status, code)
    secret, _, _ = fhext.keygen_radix()
    five_wide = fhext.encrypt_radix(np.zeros((1, 5), dtype=np.uint8), secret)
    assert_error(zama.predict(five_wide), 422, "ciphertext_mismatch")
    concrete_row = FHEModelClient(str(demo.dev_dirs[XGB]), key_dir=str(tmp_path)).quantize_encrypt_serialize(
        demo.x_test[:1]
    )
    assert_error(zama.predict(concrete_row), 400, "invalid_ciphertext")
    xgb = FHEModelClient(str(demo.dev_dirs[XGB]), key_dir=str(tmp_path / "xgb"))
    xgb.generate_private_and_evaluation_keys()
    xgb_key = xgb.get_serialized_evaluation_keys()
    refused = zama.http.post(f"/v1/models/{tfhe_rs.name}/keys", content=xgb_key, headers=OCTET)
    assert_error(refused, 422, "key_mismatch")
    xgb_key_id = HTTPTransport(str(zama.http.base_url), client=zama.http).put_whole_key(XGB, xgb_key)[
        "key_id"
    ]
    to_xgb = zama.http.post(
        f"/v1/models/{XGB}/predict", content=row, headers={**OCTET, KEY_ID_HEADER: xgb_key_id}
    )
    assert_error(to_xgb, 400, "invalid_ciphertext")
    answer = zama.predict(row)
    assert answer.status_code == 200, answer.text
    np.testing.assert_array_equal(
        zama.fhe.deserialize_decrypt_dequantize(answer.content),
        tfhe_rs.model.predict_proba(tfhe_rs.x_test[:1], fhe="disable"),
    )
