"""Responses shared by the native, SageMaker and Zama-compatible routes, and the error shape of all of them."""

from __future__ import annotations

from fastapi.responses import FileResponse, JSONResponse, Response

from fhe_bento.contract.errors import FHEBentoError
from fhe_bento.contract.runner_api import KeyFacts
from fhe_bento.models.repository import ModelSpec
from fhe_bento.protocol import wire
from fhe_bento.protocol.names import CLIENT_SHA_HEADER, TRAINING_STEP_HEADER
from fhe_bento.runtime import metrics
from fhe_bento.service.trainings import Session, StepState


def error_response(exc: FHEBentoError, method: str, *, counted: bool = True) -> Response:
    """The service's one error shape (`{"error": {"code", "message"}}`), with the error's headers. Every error
    answer is rendered here, and counted by code (`fhe_bento_errors_total`), but for `/ping`'s readiness
    (`counted=False`): a platform polls it, and a 503 while loading or draining is an answer, not an error."""
    if counted:
        metrics.ERRORS.labels(code=exc.code).inc()
    if method == "HEAD":
        return Response(status_code=exc.status, headers=exc.headers)
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


def client_zip_response(spec: ModelSpec) -> FileResponse:
    return FileResponse(
        spec.path / "client.zip",
        media_type="application/zip",
        filename=f"{spec.name.replace('/', '_')}-client.zip",
        headers={CLIENT_SHA_HEADER: spec.meta.client_sha256},
    )


def registered_status(facts: KeyFacts) -> int:
    """A key upload's status: 201 when the key is new, 200 when it was registered already."""
    return 201 if facts.created else 200


def key_registered(facts: KeyFacts) -> JSONResponse:
    """A key upload's answer, with `registered_status`."""
    return JSONResponse({"key_id": facts.key_id, "bytes": facts.bytes}, status_code=registered_status(facts))


def training_started(session: Session) -> JSONResponse:
    """A new training session's answer: 201, at step 0."""
    return JSONResponse({"training_id": session.training_id, "step": 0}, status_code=201)


def training_weights(state: StepState, step_in_body: bool = False) -> Response:
    """A session's encrypted [weights, bias] in batch framing, its step in a header; or for SageMaker,
    which passes no response header through, as the batch's first value: [step, weights, bias]."""
    values = (
        [str(state.step).encode(), state.weights, state.bias] if step_in_body else [state.weights, state.bias]
    )
    return Response(
        wire.encode_batch(values),
        media_type=wire.CONTENT_TYPE,
        headers={TRAINING_STEP_HEADER: str(state.step)},
    )
