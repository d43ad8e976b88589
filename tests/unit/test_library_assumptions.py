"""What fhe-bento assumes of libraries where they offer no public setting: these fail when a release changes
the assumption, instead of letting the product break silently."""

from __future__ import annotations

import asyncio

from fhe_bento.runtime.settings import RUNNER_KEEPALIVE_SECONDS


def test_bentomls_client_pool_drops_idle_connections_before_a_standalone_runner_does():
    """BentoML's client of a standalone runner uses aiohttp's connector defaults (BentoML has no setting
    for its keep-alive), so the runner is served with a longer `--timeout-keep-alive`
    (service/remote_runner.py). aiohttp exposes the default only on the connector's private attribute."""
    import aiohttp

    async def default_keepalive() -> float:
        connector = aiohttp.TCPConnector()
        try:
            return connector._keepalive_timeout
        finally:
            await connector.close()

    assert asyncio.run(default_keepalive()) < RUNNER_KEEPALIVE_SECONDS
