"""`s3://bucket/prefix` key store, shared by every replica (boto3; honours `AWS_ENDPOINT_URL`).

Layout under the prefix:
    keys/<scope>/<key_id>.key          the verified key; S3 metadata: model, bytes, owner, created
    keys/<scope>/<key_id>.used         empty marker rewritten when the key is used (for the TTL)
    uploads/<scope>/<key_id>/<i>.part  parts of an unfinished chunked upload (any replica may add one)
A key object appears only when its (multipart) upload completes: S3 never shows a half-written object,
and the bytes were verified before the upload started.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

from fhe_bento.contract.errors import FHEBentoError
from fhe_bento.keys.store import Upload, check_scope, document_file, document_name


class S3KeyStore:
    def __init__(self, bucket: str, prefix: str, client=None) -> None:
        import boto3

        self.s3 = client or boto3.client("s3")
        self.bucket = bucket
        self.prefix = prefix.strip("/")

    def _path(self, *parts: str) -> str:
        return "/".join(p for p in (self.prefix, *parts) if p)

    def _key(self, scope: str, key_id: str, suffix: str = ".key") -> str:
        check_scope(scope, key_id)
        return self._path("keys", scope, f"{key_id}{suffix}")

    def _uploads(self, scope: str, key_id: str) -> str:
        check_scope(scope, key_id)
        return self._path("uploads", scope, key_id) + "/"

    def _head(self, key: str) -> dict | None:
        from botocore.exceptions import ClientError

        try:
            return self.s3.head_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            if exc.response["Error"]["Code"] in ("404", "NoSuchKey", "NotFound"):
                return None
            raise

    def _list(self, prefix: str) -> Iterator[dict]:
        for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            yield from page.get("Contents", [])

    def has(self, scope: str, key_id: str) -> bool:
        return self._head(self._key(scope, key_id)) is not None

    def read(self, scope: str, key_id: str) -> bytes:
        return self.s3.get_object(Bucket=self.bucket, Key=self._key(scope, key_id))["Body"].read()

    def size(self, scope: str, key_id: str) -> int:
        head = self._head(self._key(scope, key_id))
        if head is None:
            raise FileNotFoundError(key_id)
        return int(head["ContentLength"])

    def info(self, scope: str, key_id: str) -> dict:
        head = self._head(self._key(scope, key_id)) or {}
        recorded: dict = dict(head.get("Metadata", {}))  # S3 metadata holds strings
        for name, kind in (("bytes", int), ("created", float)):
            if name in recorded:
                recorded[name] = kind(recorded[name])
        return {**recorded, "last_used": self.last_used(scope, key_id)}

    def put(self, scope: str, key_id: str, source: Path, info: dict) -> bool:
        key = self._key(scope, key_id)
        if self._head(key) is not None:
            return False
        metadata = {name: str(value) for name, value in {**info, "created": time.time()}.items()}
        self.s3.upload_file(str(source), self.bucket, key, ExtraArgs={"Metadata": metadata})
        self.touch(scope, key_id)
        return True

    def delete(self, scope: str, key_id: str) -> bool:
        key = self._key(scope, key_id)
        existed = self._head(key) is not None
        self.s3.delete_objects(
            Bucket=self.bucket, Delete={"Objects": [{"Key": key}, {"Key": self._key(scope, key_id, ".used")}]}
        )
        return existed

    def scope_bytes(self, scope: str) -> int:
        return sum(o["Size"] for o in self._list(self._path("keys", scope, "")) if o["Key"].endswith(".key"))

    def touch(self, scope: str, key_id: str) -> None:
        self.s3.put_object(Bucket=self.bucket, Key=self._key(scope, key_id, ".used"), Body=b"")

    def last_used(self, scope: str, key_id: str) -> float | None:
        head = self._head(self._key(scope, key_id, ".used")) or self._head(self._key(scope, key_id))
        return head["LastModified"].timestamp() if head else None

    def list_keys(self) -> Iterator[tuple[str, str]]:
        for obj in self._list(self._path("keys", "")):
            scope, name = obj["Key"].split("/")[-2:]
            if name.endswith(".key"):
                yield scope, name[: -len(".key")]

    def put_part(self, scope: str, key_id: str, index: int, data: bytes) -> None:
        self.s3.put_object(
            Bucket=self.bucket, Key=f"{self._uploads(scope, key_id)}{index:06d}.part", Body=data
        )

    def list_parts(self, scope: str, key_id: str) -> dict[int, int]:
        return {
            int(o["Key"].rsplit("/", 1)[1].split(".")[0]): o["Size"]
            for o in self._list(self._uploads(scope, key_id))
        }

    def assemble_parts(self, scope: str, key_id: str, count: int) -> Iterator[bytes]:
        held = self.list_parts(scope, key_id)
        missing = [i for i in range(count) if i not in held]
        if missing:
            raise FHEBentoError("missing_parts", f"parts {missing[:20]} of key {key_id} have not arrived")
        for index in range(count):
            key = f"{self._uploads(scope, key_id)}{index:06d}.part"
            try:
                yield self.s3.get_object(Bucket=self.bucket, Key=key)["Body"].read()
            except self.s3.exceptions.NoSuchKey:  # dropped meanwhile by a concurrent completion
                raise FHEBentoError("missing_parts", f"part {index} of key {key_id} is gone") from None

    def drop_parts(self, scope: str, key_id: str) -> None:
        self._delete_all(list(self._list(self._uploads(scope, key_id))))

    def open_uploads(self) -> dict[tuple[str, str], Upload]:
        uploads: dict[tuple[str, str], Upload] = {}
        for obj in self._list(self._path("uploads", "")):
            scope, key_id, name = obj["Key"].split("/")[-3:]
            held = uploads.get((scope, key_id), Upload({}, 0.0))
            held.parts[int(name.split(".")[0])] = obj["Size"]
            uploads[(scope, key_id)] = held._replace(
                last_part=max(held.last_part, obj["LastModified"].timestamp())
            )
        return uploads

    def _delete_all(self, objects: list[dict]) -> None:
        for start in range(0, len(objects), 1000):
            batch = [{"Key": o["Key"]} for o in objects[start : start + 1000]]
            self.s3.delete_objects(Bucket=self.bucket, Delete={"Objects": batch})

    def read_document(self, name: str) -> bytes | None:
        from botocore.exceptions import ClientError

        try:
            return self.s3.get_object(Bucket=self.bucket, Key=self._path("documents", document_file(name)))[
                "Body"
            ].read()
        except ClientError as exc:
            if exc.response["Error"]["Code"] in ("404", "NoSuchKey", "NotFound"):
                return None
            raise

    def write_document(self, name: str, data: bytes) -> None:
        # One PUT: S3 replaces an object whole, and a reader gets the old or the new one.
        self.s3.put_object(Bucket=self.bucket, Key=self._path("documents", document_file(name)), Body=data)

    def create_document(self, name: str, data: bytes) -> bool:
        from botocore.exceptions import ClientError

        # S3's conditional write: If-None-Match: * fails with 412 when the object exists.
        try:
            self.s3.put_object(
                Bucket=self.bucket,
                Key=self._path("documents", document_file(name)),
                Body=data,
                IfNoneMatch="*",
            )
            return True
        except ClientError as exc:
            if exc.response["Error"]["Code"] in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
                return False
            raise

    def list_documents(self, prefix: str) -> list[str]:
        folder = self._path("documents") + "/"
        objects = self._list(folder + quote(prefix, safe=""))
        return sorted(document_name(obj["Key"].removeprefix(folder)) for obj in objects)

    def delete_document(self, name: str) -> None:
        self.s3.delete_object(Bucket=self.bucket, Key=self._path("documents", document_file(name)))
