"""Every error code the server sends, with its HTTP status: the one registry. An error answer is
`{"error": {"code": ..., "message": ...}}`; the error table of docs/http-api.md lists exactly these codes (a test
checks), and the fuzz tests check that every rejection is one of them."""

from __future__ import annotations

ERROR_CODES: dict[str, int] = {
    **dict.fromkeys(
        (
            "empty_body",
            "incomplete_body",
            "invalid_ciphertext",
            "invalid_batch",
            "invalid_key",
            "invalid_key_id",
            "missing_key_id",
            "invalid_multipart",
            "missing_field",
            "invalid_request",
            "invalid_attributes",
            "invalid_envelope",
            "invalid_part",
            "missing_parts",
            "digest_mismatch",
            "invalid_scope",
            "invalid_record",
            "invalid_session",
            "not_training_model",
            "training_model",
        ),
        400,
    ),
    "auth_required": 401,
    "invalid_token": 401,
    "forbidden": 403,
    "unknown_model": 404,
    "unknown_key": 404,
    "unknown_module": 404,
    "unknown_shape": 404,
    "unknown_training": 404,
    "method_not_allowed": 405,
    "version_conflict": 409,
    "step_conflict": 409,
    "version_retired": 410,
    "body_timeout": 408,
    "payload_too_large": 413,
    "key_store_full": 413,
    "batch_too_long": 413,
    "unsupported_media_type": 415,
    "ciphertext_mismatch": 422,
    "key_mismatch": 422,
    "too_many_uploads": 429,
    "too_many_trainings": 429,
    "headers_too_large": 431,
    "not_ready": 503,
    "runner_unavailable": 503,
    "overloaded": 503,
    "draining": 503,
    "request_timeout": 504,
}

# Codes a client retries after the answer's Retry-After: the model is overloaded, its runner is
# restarting, or the instance is shutting down (another one takes the retry).
RETRYABLE_CODES = frozenset({"overloaded", "runner_unavailable", "draining"})
# The client's code for an error answer without the service's JSON error (a proxy in front of it).
HTTP_ERROR = "http_error"


def is_retryable(status: int, code: str) -> bool:
    """Whether a client retries this answer: a retryable code, or a bare 503 from a proxy."""
    return status in (429, 503) and (code in RETRYABLE_CODES or code == HTTP_ERROR)
