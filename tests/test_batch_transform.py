"""SageMaker Batch Transform on the real image, run as Batch Transform runs it (its environment, port
8080, nothing but /ping, /execution-parameters and /invocations): a multi-record JSON Lines body with a
bad line in the middle gets one answer per line, in order; every good line decrypts to the clear
prediction, and the bad line gets its error."""

from __future__ import annotations

import httpx
import pytest
from conftest import LOGREG, XGB

from fhe_bento.client import FHEClient
from fhe_bento.client.sagemaker_transport import LocalInvoker, SageMakerTransport
from fhe_bento.protocol import transform
from harness.container import URL, running, wait_for_ping

BATCH_ENV = {
    "SAGEMAKER_BATCH": "true",
    "SAGEMAKER_MAX_PAYLOAD_IN_MB": "1",
    "SAGEMAKER_BATCH_STRATEGY": "MultiRecord",
}


@pytest.fixture(scope="module")
def batch_container(image, model_dir):
    with running(image, model_dir, BATCH_ENV) as name:
        wait_for_ping()
        yield name


def test_execution_parameters_answer_the_defaults(batch_container):
    params = httpx.get(f"{URL}/execution-parameters", timeout=10).json()
    assert params == {"MaxConcurrentTransforms": 1, "BatchStrategy": "MULTI_RECORD", "MaxPayloadInMB": 1}


def test_multi_record_body_answers_every_line_in_order(batch_container, demo, tmp_path):
    # The XGB key is registered first (in the store the records' key ids refer to), never sent in a record.
    client = FHEClient(transport=SageMakerTransport(LocalInvoker(URL)), cache_dir=tmp_path, progress=False)
    xgb, logreg = client.model(XGB), client.model(LOGREG)
    key_id = xgb.ensure_key()
    x = demo.x_test[:2]
    xgb_rows, logreg_rows = xgb.encrypt(x), logreg.encrypt(x)
    body = (
        b"\n".join(
            [
                transform.encode_record(xgb_rows[0], key_id, XGB),
                transform.encode_record(logreg_rows[0], None, LOGREG),
                b'{"model": "' + XGB.encode() + b'", "ciphertext": 12}',  # the bad line
                transform.encode_record(xgb_rows[1], key_id, XGB),
                transform.encode_record(logreg_rows[1], None, LOGREG),
            ]
        )
        + b"\n"
    )
    answer = httpx.post(
        f"{URL}/invocations", content=body, headers={"Content-Type": transform.CONTENT_TYPE}, timeout=600
    )
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith(transform.CONTENT_TYPE)
    answers = [transform.decode_answer(line) for line in transform.lines(answer.content)]
    assert len(answers) == 5 and answers[2]["code"] == "invalid_record"

    def label(model, result: bytes):
        return model.labels(model.decrypt(result).reshape(1, -1))[0]

    assert [label(xgb, answers[0]), label(xgb, answers[3])] == list(demo.clear_predict(XGB, x))
    assert [label(logreg, answers[1]), label(logreg, answers[4])] == list(demo.clear_predict(LOGREG, x))
