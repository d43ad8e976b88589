"""Bearer tokens as the settings configure them (service/auth.py `parse_token_settings`): the answers a
caller gets, and the tenant id its keys are scoped by. The refused settings themselves are tested in
tests/test_service_rules.py."""

from __future__ import annotations

import hashlib

import pytest

from fhe_bento.contract.errors import FHEBentoError
from fhe_bento.service.auth import Caller, parse_token_settings

CHALLENGE = {"WWW-Authenticate": 'Bearer realm="fhe-bento"'}


@pytest.fixture
def auth():
    return parse_token_settings("tok-p1,tok-p2", "tok-admin")


def refusal(auth, authorization: str | None, need_admin: bool) -> FHEBentoError:
    with pytest.raises(FHEBentoError) as refused:
        auth.caller(authorization, need_admin=need_admin)
    return refused.value


def test_the_tenant_is_the_first_half_of_the_tokens_sha256(auth):
    """Keys are stored under it: a different derivation would orphan every stored key."""
    assert auth.caller("Bearer tok-p1", need_admin=False) == Caller(
        tenant=hashlib.sha256(b"tok-p1").hexdigest()[:32], admin=False
    )
    assert auth.caller("Bearer tok-admin", need_admin=False) == Caller(
        tenant=hashlib.sha256(b"tok-admin").hexdigest()[:32], admin=True
    )


def test_without_tokens_every_caller_is_an_admin_of_the_shared_scope():
    assert parse_token_settings("", "").caller(None, need_admin=True) == Caller(tenant="", admin=True)


@pytest.mark.parametrize("authorization", ["bearer tok-p1", "BEARER tok-p1", "Bearer  tok-p1 "])
def test_the_scheme_is_case_insensitive_and_the_token_stripped(auth, authorization):
    assert auth.caller(authorization, need_admin=False) == auth.caller("Bearer tok-p1", need_admin=False)


@pytest.mark.parametrize(
    ("authorization", "code"),
    [
        (None, "auth_required"),
        ("", "auth_required"),
        ("Bearer", "invalid_token"),
        ("Bearer    ", "invalid_token"),
        ("Basic tok-p1", "invalid_token"),
        ("tok-p1", "invalid_token"),
        ("Bearer tok-P1", "invalid_token"),  # tokens are case-sensitive
        ("Bearer tok-p1,tok-p2", "invalid_token"),  # one token, not the setting's list
    ],
)
def test_a_401_carries_the_bearer_challenge(auth, authorization, code):
    error = refusal(auth, authorization, need_admin=False)
    assert (error.code, error.status, error.headers) == (code, 401, CHALLENGE)
    assert "tok-" not in error.message


def test_a_predict_token_on_an_admin_route_is_403_without_a_challenge(auth):
    error = refusal(auth, "Bearer tok-p2", need_admin=True)
    assert (error.code, error.status, error.headers) == ("forbidden", 403, {})
    assert error.message == "this route needs an admin token"


def test_an_admin_only_configuration_refuses_every_other_token():
    auth = parse_token_settings("", "tok-admin")
    assert auth.enabled
    assert refusal(auth, "Bearer tok-p1", need_admin=False).code == "invalid_token"
