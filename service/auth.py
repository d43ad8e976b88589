"""Optional bearer tokens (`FHE_BENTO_PREDICT_TOKENS`, `FHE_BENTO_ADMIN_TOKENS`).

With no token configured, every route is open (on SageMaker, IAM on `InvokeEndpoint` is the gate). With
tokens, every route but `/ping` needs `Authorization: Bearer <token>`:
- a predict token may read models, upload, check and delete its own keys, and predict;
- an admin token may also list and delete every key (`/v1/keys`).
Keys are scoped to the token that uploaded them: the tenant id (a hash of the token) is part of the
key's storage scope, so another token that knows a key id can neither use, see, nor delete that key.
Tokens are held only as SHA-256 digests, compared in constant time, and never logged.
Settings that could turn auth off by mistake stop the service at start: an empty entry in a token list
(`" , "`, `"a,,b"`, `"a, "`), or predict tokens without an admin token.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from dataclasses import dataclass

from fastapi import Request

from fhe_bento.contract.errors import FHEBentoError
from fhe_bento.runtime import metrics

CHALLENGE = 'Bearer realm="fhe-bento"'
log = logging.getLogger("bentoml.fhe_bento.auth")


@dataclass(frozen=True)
class Caller:
    tenant: str  # "" when tokens are off: keys then live in the model's shared scope
    admin: bool


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def _refused(code: str, message: str) -> FHEBentoError:
    metrics.AUTH_REFUSED.labels(code=code).inc()
    log.info("request refused: %s", code)  # never the token itself
    error = FHEBentoError(code, message)
    if error.status == 401:
        error.headers["WWW-Authenticate"] = CHALLENGE
    return error


class TokenAuth:
    def __init__(self, predict_tokens: list[str], admin_tokens: list[str]) -> None:
        self.tokens = [(_digest(t), False) for t in predict_tokens] + [
            (_digest(t), True) for t in admin_tokens
        ]

    @property
    def enabled(self) -> bool:
        return bool(self.tokens)

    def caller(self, authorization: str | None, need_admin: bool) -> Caller:
        if not self.enabled:
            return Caller(tenant="", admin=True)
        if not authorization:
            raise _refused("auth_required", "send Authorization: Bearer <token>")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise _refused("invalid_token", "the Authorization header is not 'Bearer <token>'")
        presented = _digest(token.strip())
        admin = None
        for digest, is_admin in self.tokens:  # no early exit: the time does not depend on which token matched
            if hmac.compare_digest(presented, digest):
                admin = is_admin
        if admin is None:
            raise _refused("invalid_token", "the bearer token is not valid here")
        if need_admin and not admin:
            raise _refused("forbidden", "this route needs an admin token")
        return Caller(tenant=presented.hex()[:32], admin=admin)


class TokenSettingsError(ValueError):
    """Token settings that would turn auth off, or on without an admin, by mistake: the service does not start."""


def _tokens(variable: str, value: str) -> list[str]:
    """The tokens of one comma-separated setting. An empty entry is refused, not skipped: skipping would
    turn `" , "` into no tokens at all, that is auth silently off. The message never holds a token."""
    if not value.strip():
        return []
    tokens = [token.strip() for token in value.split(",")]
    if not all(tokens):
        raise TokenSettingsError(
            f"{variable} holds an empty token: give non-empty comma-separated tokens, or leave it empty for no auth"
        )
    return tokens


def parse_token_settings(predict_tokens: str, admin_tokens: str) -> TokenAuth:
    """The token check of FHE_BENTO_PREDICT_TOKENS and FHE_BENTO_ADMIN_TOKENS, or TokenSettingsError."""
    predict = _tokens("FHE_BENTO_PREDICT_TOKENS", predict_tokens)
    admin = _tokens("FHE_BENTO_ADMIN_TOKENS", admin_tokens)
    if predict and not admin:
        raise TokenSettingsError(
            "FHE_BENTO_PREDICT_TOKENS is set but FHE_BENTO_ADMIN_TOKENS is empty: name at least one admin token"
        )
    return TokenAuth(predict, admin)


# FastAPI runs a plain `def` dependency in its thread pool: a thread hop per request. These are async.
async def predict_caller(request: Request) -> Caller:
    """FastAPI dependency of every route that predicts or manages the caller's own keys."""
    auth: TokenAuth = request.app.state.auth
    return auth.caller(request.headers.get("authorization"), need_admin=False)


async def admin_caller(request: Request) -> Caller:
    """FastAPI dependency of the routes that see or delete every caller's keys."""
    auth: TokenAuth = request.app.state.auth
    return auth.caller(request.headers.get("authorization"), need_admin=True)


# Evaluated at import, so that the service (every process that loads service/app.py) refuses to start on
# bad token settings instead of failing, or serving without auth, at the first request.
