"""The HTTP service's own rules in process: request limits and token settings."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCOPE = "a" * 64


def test_request_limits_answer_431_and_504_in_the_error_shape():
    import asyncio

    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route
    from starlette.testclient import TestClient

    from fhe_bento.service.limits import RequestLimits

    async def slow(request):
        await asyncio.sleep(float(request.query_params["s"]))
        return PlainTextResponse("done")

    app = RequestLimits(Starlette(routes=[Route("/", slow)]), max_header_bytes=2048, timeout=0.5)
    with TestClient(app) as http:
        assert http.get("/?s=0").text == "done"
        late = http.get("/?s=3")
        assert late.status_code == 504 and late.json()["error"]["code"] == "request_timeout"
        big = http.get("/?s=0", headers={"X-Big": "x" * 3000})
        assert big.status_code == 431 and big.json()["error"]["code"] == "headers_too_large"


@pytest.mark.parametrize(
    ("predict", "admin", "variable"),
    [
        (" , ", "", "FHE_BENTO_PREDICT_TOKENS"),
        ("tok-p1,,tok-p2", "tok-admin", "FHE_BENTO_PREDICT_TOKENS"),
        ("tok-p1, ", "tok-admin", "FHE_BENTO_PREDICT_TOKENS"),
        ("", " , ", "FHE_BENTO_ADMIN_TOKENS"),
        ("", "tok-admin,", "FHE_BENTO_ADMIN_TOKENS"),
        ("tok-p1", "", "FHE_BENTO_ADMIN_TOKENS"),  # predict tokens need an admin token
        ("tok-p1", "  ", "FHE_BENTO_ADMIN_TOKENS"),
    ],
)
def test_token_settings_that_could_turn_auth_off_are_refused(predict, admin, variable):
    from fhe_bento.service.auth import TokenSettingsError, parse_token_settings

    with pytest.raises(TokenSettingsError, match=variable) as refused:
        parse_token_settings(predict, admin)
    assert "tok-" not in str(refused.value)  # the message never shows a token


def test_token_settings_accepted_forms():
    from fhe_bento.service.auth import parse_token_settings

    assert not parse_token_settings("", "").enabled and not parse_token_settings("  ", " ").enabled
    auth = parse_token_settings(" tok-p1 , tok-p2 ", "tok-admin")
    assert not auth.caller("Bearer tok-p2", need_admin=False).admin
    assert auth.caller("Bearer tok-admin", need_admin=True).admin
    assert (
        parse_token_settings("", "tok-admin").caller("Bearer tok-admin", need_admin=True).admin
    )  # admin only


def test_bad_token_settings_stop_the_service_when_it_is_declared():
    import subprocess
    import sys

    env = {**os.environ, "FHE_BENTO_PREDICT_TOKENS": "tok-p1,,tok-p2", "FHE_BENTO_ADMIN_TOKENS": "tok-admin"}
    done = subprocess.run(
        [sys.executable, "-c", "import fhe_bento.service.app"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode != 0 and "TokenSettingsError: FHE_BENTO_PREDICT_TOKENS" in done.stderr
    assert "tok-" not in done.stderr
