"""`fhe-bento import`: describe a concrete-ml `FHEModelDev` folder and put it in the BentoML model store.

This is model-owner tooling. It uses concrete-ml's client side once, to learn the circuit's
evaluation-key layout from two throwaway key sets that are deleted right away; the server never does.
"""

from __future__ import annotations

import json
import platform
import shutil
import tempfile
import zipfile
from pathlib import Path

import bentoml

from runners.model_repo import METADATA_FILE, ModelMetadata, sha256_file, zip_versions


def _throwaway_eval_key(folder: Path):
    from concrete.ml.deployment import FHEModelClient

    with tempfile.TemporaryDirectory(prefix="fhe-bento-keygen-") as key_dir:
        client = FHEModelClient(str(folder), key_dir=key_dir)
        client.generate_private_and_evaluation_keys(force=True)
        return client, client.get_serialized_evaluation_keys()


def _common_prefix(a: bytes, b: bytes) -> bytes:
    size = min(len(a), len(b))
    for index in range(size):
        if a[index] != b[index]:
            return a[:index]
    return a[:size]


def describe(folder: Path, classes: list | None = None) -> ModelMetadata:
    """Derive the metadata the server needs from client.zip and server.zip."""
    client, first = _throwaway_eval_key(folder)
    _, second = _throwaway_eval_key(folder)
    keyset = client.client.specs.program_info.get_keyset_info()
    with zipfile.ZipFile(folder / "client.zip") as archive:
        circuit = json.loads(archive.read("client.specs.json"))["circuits"][0]
    (input_gate,) = circuit["inputs"]  # concrete-ml built-in models take one encrypted row
    n_features = input_gate["typeInfo"]["lweCiphertext"]["abstractShape"]["dimensions"][-1]
    n_outputs = circuit["outputs"][0]["typeInfo"]["lweCiphertext"]["abstractShape"]["dimensions"][-1]
    return ModelMetadata(
        model_class=type(client.model).__name__,
        n_features=n_features,
        classes=classes,
        n_outputs=len(classes) if classes else n_outputs,
        client_sha256=sha256_file(folder / "client.zip"),
        needs_key=bool(keyset.bootstrap_keys() or keyset.keyswitch_keys()),
        eval_key_bytes=len(first),
        eval_key_header=_common_prefix(first, second).hex(),
        versions=zip_versions(folder / "server.zip"),
        machine=platform.machine(),
    )


def write_model_folder(source: Path, target: Path, meta: ModelMetadata) -> None:
    """Lay out one served model folder: client.zip, server.zip and fhe-bento.json."""
    target.mkdir(parents=True, exist_ok=True)
    for name in ("client.zip", "server.zip"):
        shutil.copyfile(source / name, target / name)
    (target / METADATA_FILE).write_text(meta.model_dump_json(indent=2))


def import_model(source: Path, name: str, classes: list | None = None) -> bentoml.Tag:
    for name_ in ("client.zip", "server.zip"):
        if not (source / name_).is_file():
            raise FileNotFoundError(f"{source / name_} is missing: pass a concrete-ml FHEModelDev folder")
    meta = describe(source, classes)
    labels = {"framework": "concrete-ml", "fhe-bento": "1"}
    metadata = meta.model_dump(exclude={"eval_key_header"}, exclude_none=True)
    with bentoml.models.create(name, labels=labels, metadata=metadata) as ref:
        write_model_folder(source, Path(ref.path), meta)
    return ref.tag
