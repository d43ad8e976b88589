"""A bounded burst of requests against a server on 127.0.0.1, run in a process of its own so that the test
process's own timing (its `/ping` probes) is not slowed by the load generator.

Half the connections ask HEAD for random key ids of a keyed model, half send one ciphertext of a keyless
model again and again, for `seconds`; returns the count of answers by status."""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter

import httpx


async def _burst(
    url: str, seconds: float, connections: int, keyed: str, keyless: str, ciphertext: bytes
) -> Counter:
    statuses: Counter = Counter()
    deadline = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=connections, keepalive_expiry=1.0)

    async def loop(client: httpx.AsyncClient, head: bool) -> None:
        while time.monotonic() < deadline:
            try:
                if head:
                    answer = await client.head(f"/v1/models/{keyed}/keys/{os.urandom(32).hex()}")
                else:
                    answer = await client.post(
                        f"/v1/models/{keyless}/predict",
                        content=ciphertext,
                        headers={"Content-Type": "application/octet-stream"},
                    )
                statuses[answer.status_code] += 1
            except httpx.TransportError as exc:
                statuses[type(exc).__name__] += 1

    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120) as client:
        await asyncio.gather(*(loop(client, head=i % 2 == 0) for i in range(connections)))
    return statuses


def burst(url: str, seconds: float, connections: int, keyed: str, keyless: str, ciphertext: bytes) -> Counter:
    return asyncio.run(_burst(url, seconds, connections, keyed, keyless, ciphertext))
