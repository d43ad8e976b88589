"""The key store named by a URL: `file:///path` (the embedded default) or `s3://bucket/prefix`."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlparse

from fhe_bento.keys.s3_store import S3KeyStore
from fhe_bento.keys.store import FileKeyStore, KeyStore


def open_store(url: str) -> KeyStore:
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return FileKeyStore(Path(unquote(parsed.path)))
    if parsed.scheme == "s3" and parsed.netloc:
        return S3KeyStore(parsed.netloc, parsed.path)
    raise ValueError(f"unsupported key store URL {url!r} (use file:///path or s3://bucket/prefix)")
