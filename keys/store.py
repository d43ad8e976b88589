"""Evaluation-key storage, content-addressed by SHA-256 and scoped per model (its `client_sha256`).

Stores are chosen by URL (`FHE_BENTO_KEY_STORE`, see `runners.key_store_url`). `file://` is the embedded
default: a key becomes visible under its final name only by an atomic rename of a complete, verified file,
so a crash can never leave a partial key behind, and everything survives a restart.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple, Protocol
from urllib.parse import quote, unquote

from fhe_bento.contract.errors import FHEBentoError
from fhe_bento.keys.rules import check_key_id
from fhe_bento.protocol.keys import is_key_id


def tenant_scope(model_scope: str, tenant: str) -> str:
    """Where one tenant's keys for one model live: the model's own scope when tokens are off, else a
    scope derived from both, so that a key id alone never reaches another tenant's key."""
    return hashlib.sha256(f"{model_scope}:{tenant}".encode()).hexdigest() if tenant else model_scope


class Upload(NamedTuple):
    """An unfinished chunked upload as its store holds it."""

    parts: dict[int, int]  # part index -> bytes
    last_part: float  # epoch seconds of the newest part (or of the upload's start)

    @property
    def bytes(self) -> int:
        return sum(self.parts.values())


def check_scope(scope: str, key_id: str) -> None:
    check_key_id(key_id)
    if not is_key_id(scope):
        raise ValueError(f"bad key scope {scope!r}")


class KeyStore(Protocol):
    def has(self, scope: str, key_id: str) -> bool: ...

    def read(self, scope: str, key_id: str) -> bytes: ...

    def size(self, scope: str, key_id: str) -> int: ...

    def info(self, scope: str, key_id: str) -> dict:
        """What `put` recorded (model, bytes, owner, created) and when the key was last used."""

    def put(self, scope: str, key_id: str, source: Path, info: dict) -> bool:
        """Store a verified key file; False when it was already there (idempotent)."""

    def delete(self, scope: str, key_id: str) -> bool: ...

    def scope_bytes(self, scope: str) -> int:
        """Bytes of all keys stored for one model."""

    def touch(self, scope: str, key_id: str) -> None:
        """Record that the key was just used (for the unused-key TTL)."""

    def last_used(self, scope: str, key_id: str) -> float | None: ...

    def list_keys(self) -> Iterator[tuple[str, str]]:
        """(scope, key_id) of every stored key."""

    def open_uploads(self) -> dict[tuple[str, str], Upload]:
        """(scope, key_id) -> every unfinished chunked upload in the store, from one listing."""

    def put_part(self, scope: str, key_id: str, index: int, data: bytes) -> None:
        """Hold one part of a chunked upload; rewriting a part is harmless (resumable uploads)."""

    def list_parts(self, scope: str, key_id: str) -> dict[int, int]:
        """Part index -> size of the parts held for an unfinished upload."""

    def assemble_parts(self, scope: str, key_id: str, count: int) -> Iterator[bytes]:
        """The bytes of parts 0..count-1 in order; raises FHEBentoError if one is missing."""

    def drop_parts(self, scope: str, key_id: str) -> None: ...

    def read_document(self, name: str) -> bytes | None:
        """A small state document the server keeps beside the keys (a model's versions), or None."""

    def write_document(self, name: str, data: bytes) -> None:
        """Replace a state document whole: a reader sees the old one or the new one, never a mix."""

    def create_document(self, name: str, data: bytes) -> bool:
        """Write a state document whole unless one of that name exists (then False, and nothing changes):
        of two writers racing for one name, exactly one wins, on one machine or across replicas."""

    def list_documents(self, prefix: str) -> list[str]:
        """The names of the state documents that start with `prefix`, sorted."""

    def delete_document(self, name: str) -> None:
        """Delete a state document (none of that name: nothing to do)."""


DOCUMENT_SUFFIX = ".json"


def document_file(name: str) -> str:
    """A state document's file name: its name quoted, so a model name's slashes stay in one segment."""
    return f"{quote(name, safe='')}{DOCUMENT_SUFFIX}"


def document_name(file: str) -> str:
    """The name of the state document stored as `file` (`document_file`'s inverse)."""
    return unquote(file.removesuffix(DOCUMENT_SUFFIX))


class FileKeyStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)

    def _key_path(self, scope: str, key_id: str) -> Path:
        check_scope(scope, key_id)
        return self.root / scope / f"{key_id}.key"

    def has(self, scope: str, key_id: str) -> bool:
        return self._key_path(scope, key_id).is_file()

    def read(self, scope: str, key_id: str) -> bytes:
        return self._key_path(scope, key_id).read_bytes()

    def size(self, scope: str, key_id: str) -> int:
        return self._key_path(scope, key_id).stat().st_size

    def info(self, scope: str, key_id: str) -> dict:
        try:
            recorded = json.loads(self._key_path(scope, key_id).with_suffix(".json").read_bytes())
        except (FileNotFoundError, ValueError):
            recorded = {}
        return {**recorded, "last_used": self.last_used(scope, key_id)}

    def put(self, scope: str, key_id: str, source: Path, info: dict) -> bool:
        final = self._key_path(scope, key_id)
        if final.is_file():
            return False
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.parent / f".tmp-{uuid.uuid4().hex}"
        try:
            _write_synced(final.with_suffix(".json"), json.dumps({**info, "created": time.time()}).encode())
            shutil.copyfile(source, tmp)
            with tmp.open("rb") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, final)  # atomic: readers see no key or the whole key
        finally:
            tmp.unlink(missing_ok=True)
        return True

    def delete(self, scope: str, key_id: str) -> bool:
        final = self._key_path(scope, key_id)
        existed = final.is_file()
        final.unlink(missing_ok=True)
        final.with_suffix(".json").unlink(missing_ok=True)
        return existed

    def scope_bytes(self, scope: str) -> int:
        return sum(path.stat().st_size for path in (self.root / scope).glob("*.key"))

    def touch(self, scope: str, key_id: str) -> None:
        os.utime(self._key_path(scope, key_id))

    def last_used(self, scope: str, key_id: str) -> float | None:
        try:
            return self._key_path(scope, key_id).stat().st_mtime
        except FileNotFoundError:
            return None

    def list_keys(self) -> Iterator[tuple[str, str]]:
        for path in self.root.glob("*/*.key"):
            yield path.parent.name, path.stem

    def open_uploads(self) -> dict[tuple[str, str], Upload]:
        uploads = {}
        for folder in self.root.glob("*/uploads/*"):
            try:
                stats, last = {}, folder.stat().st_mtime
                for path in folder.iterdir():
                    try:
                        stats[path.name] = path.stat()
                    except FileNotFoundError:  # a .tmp- file renamed, or a part dropped, meanwhile
                        continue
            except FileNotFoundError:  # the upload completed or was dropped meanwhile
                continue
            # A part being written (.tmp-*) counts for the upload's age, not yet for its bytes.
            last = max((st.st_mtime for st in stats.values()), default=last)
            parts = {
                int(name[: -len(".part")]): st.st_size for name, st in stats.items() if name.endswith(".part")
            }
            uploads[(folder.parent.parent.name, folder.name)] = Upload(parts, last)
        return uploads

    def _parts_dir(self, scope: str, key_id: str) -> Path:
        return self._key_path(scope, key_id).parent / "uploads" / key_id

    def put_part(self, scope: str, key_id: str, index: int, data: bytes) -> None:
        folder = self._parts_dir(scope, key_id)
        folder.mkdir(parents=True, exist_ok=True)
        _write_synced(folder / f"{index:06d}.part", data)

    def list_parts(self, scope: str, key_id: str) -> dict[int, int]:
        folder = self._parts_dir(scope, key_id)
        return {int(p.stem): p.stat().st_size for p in folder.glob("*.part")} if folder.is_dir() else {}

    def assemble_parts(self, scope: str, key_id: str, count: int) -> Iterator[bytes]:
        folder = self._parts_dir(scope, key_id)
        missing = [i for i in range(count) if not (folder / f"{i:06d}.part").is_file()]
        if missing:
            raise FHEBentoError("missing_parts", f"parts {missing[:20]} of key {key_id} have not arrived")
        for index in range(count):
            try:
                yield (folder / f"{index:06d}.part").read_bytes()
            except FileNotFoundError:  # dropped meanwhile by a concurrent completion
                raise FHEBentoError("missing_parts", f"part {index} of key {key_id} is gone") from None

    def drop_parts(self, scope: str, key_id: str) -> None:
        shutil.rmtree(self._parts_dir(scope, key_id), ignore_errors=True)

    def _document(self, name: str) -> Path:
        return self.root / "documents" / document_file(name)  # never a scope: scopes are hex ids

    def read_document(self, name: str) -> bytes | None:
        try:
            return self._document(name).read_bytes()
        except FileNotFoundError:
            return None

    def write_document(self, name: str, data: bytes) -> None:
        path = self._document(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_synced(path, data)

    def create_document(self, name: str, data: bytes) -> bool:
        path = self._document(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".tmp-{uuid.uuid4().hex}"
        _write_synced(tmp, data)
        try:
            os.link(tmp, path)  # atomic, and refused if the name exists: the one winner of a race
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink()

    def list_documents(self, prefix: str) -> list[str]:
        folder = self.root / "documents"
        start = quote(prefix, safe="")
        files = folder.iterdir() if folder.is_dir() else iter(())
        return sorted(document_name(f.name) for f in files if f.name.startswith(start))

    def delete_document(self, name: str) -> None:
        self._document(name).unlink(missing_ok=True)


def _write_synced(path: Path, data: bytes) -> None:
    tmp = path.parent / f".tmp-{uuid.uuid4().hex}"
    with tmp.open("wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
