"""`fhe-bento import`: describe a concrete-ml `FHEModelDev` folder, or a `HybridFHEModel` folder written by
`save_and_clear_private_info`, and put it in the BentoML model store.

This is model-owner tooling. It uses concrete-ml's client side once, with two throwaway key sets that are
deleted right away, to learn the exact layout of the circuit's keys and ciphertexts and the memory a warm
key costs; the server never holds a private key.
"""

from __future__ import annotations

import json
import multiprocessing
import platform
import shutil
import tempfile
import zipfile
from pathlib import Path

import bentoml
import numpy as np

from fhe_bento.checks.capnp_wire import first_difference, read_shape
from fhe_bento.checks.payloads import check_keyset_params
from fhe_bento.models.repository import (
    HYBRID_FILE,
    METADATA_FILE,
    HybridLayout,
    ModelMetadata,
    sha256_file,
    zip_versions,
)


def _throwaway_keys(folder: Path, key_dir: Path, count: int):
    """A client with fresh keys, and `count` serialized evaluation keys of fresh key sets."""
    from concrete.ml.deployment import FHEModelClient

    keys = []
    for index in range(count):
        client = FHEModelClient(str(folder), key_dir=str(key_dir / str(index)))
        client.generate_private_and_evaluation_keys(force=True)
        keys.append(client.get_serialized_evaluation_keys())
    return client, keys


def _measure(server_zip_dir: str, ciphertext: bytes, keys: list[bytes], queue) -> None:
    """In a fresh process: the resident bytes that one more warm key costs (RSS after a second key was
    deserialized and used, minus RSS after the first one was), and the seconds of FHE for one row."""
    import time

    import psutil
    from concrete import fhe
    from concrete.ml.deployment import FHEModelServer

    server = FHEModelServer(server_zip_dir)
    process = psutil.Process()
    warm = [fhe.EvaluationKeys.deserialize(keys[0])]
    server.run(ciphertext, warm[0])  # pays the one-time costs (OpenMP pool, first expansion)
    before = process.memory_info().rss
    warm.append(fhe.EvaluationKeys.deserialize(keys[1]))
    started = time.perf_counter()
    server.run(ciphertext, warm[1])
    seconds = time.perf_counter() - started
    queue.put((max(0, process.memory_info().rss - before), seconds))


def _measure_in_fresh_process(folder: Path, ciphertext: bytes, keys: list[bytes]) -> tuple[int, float]:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_measure, args=(str(folder), ciphertext, keys, queue))
    process.start()
    try:
        return queue.get(timeout=600)
    finally:
        process.join(60)


def describe(folder: Path, classes: list | None = None) -> ModelMetadata:
    """Derive the metadata the server needs from client.zip and server.zip, with throwaway keys that are
    deleted right away: the shapes every ciphertext and key must have, and the cost of a warm key."""
    with tempfile.TemporaryDirectory(prefix="fhe-bento-keygen-") as key_dir:
        client, keys = _throwaway_keys(folder, Path(key_dir), 2)
        circuit = _circuit_specs(folder)
        (input_gate,) = circuit["inputs"]  # concrete-ml circuits take one encrypted tensor
        dims = _dimensions(input_gate)
        n_outputs = _dimensions(circuit["outputs"][0])[-1]
        ciphertext = client.quantize_encrypt_serialize(np.zeros(dims))
        key_shape = read_shape(keys[0])
        if first_difference(read_shape(keys[1]), key_shape) or len(keys[1]) != len(keys[0]):
            raise ValueError(
                "two key sets of this circuit serialize to different layouts: it cannot be checked"
            )
        check_keyset_params(key_shape, folder / "client.zip")
        keyset = client.client.specs.program_info.get_keyset_info()
        needs_key = bool(keyset.bootstrap_keys() or keyset.keyswitch_keys())
        warm_key_bytes, row_seconds = _measure_in_fresh_process(folder, ciphertext, keys)
    return ModelMetadata(
        model_class=type(client.model).__name__,
        n_features=dims[-1],
        classes=classes,
        n_outputs=len(classes) if classes else n_outputs,
        client_sha256=sha256_file(folder / "client.zip"),
        needs_key=needs_key,
        eval_key_bytes=len(keys[0]),
        key_shape=key_shape,
        ciphertext_bytes=len(ciphertext),
        ciphertext_shape=read_shape(ciphertext),
        builtin_key=None if needs_key else keys[0].hex(),
        warm_key_bytes=warm_key_bytes if needs_key else 0,
        row_seconds=row_seconds,
        versions=zip_versions(folder / "server.zip"),
        machine=platform.machine(),
    )


def _dimensions(gate: dict) -> list[int]:
    return gate["typeInfo"]["lweCiphertext"]["abstractShape"]["dimensions"]


def _circuit_specs(folder: Path) -> dict:
    """The circuit's entry in its client.zip's `client.specs.json` (concrete-ml models have one circuit)."""
    with zipfile.ZipFile(folder / "client.zip") as archive:
        return json.loads(archive.read("client.specs.json"))["circuits"][0]


def circuit_shape(folder: Path) -> str:
    """A circuit's input shape as concrete-ml's hybrid client names it: the repr of a tuple, `(1, 6, 32)`."""
    return str(tuple(_dimensions(_circuit_specs(folder)["inputs"][0])))


def hybrid_circuits(source: Path) -> dict[str, dict[str, Path]]:
    """The circuits of a `save_and_clear_private_info` folder: module -> input shape -> circuit folder.
    Empty if `source` is not one."""
    circuits: dict[str, dict[str, Path]] = {}
    for module in sorted(p for p in source.iterdir() if p.is_dir()):
        for shape_dir in sorted(p for p in module.iterdir() if (p / "client.zip").is_file()):
            circuits.setdefault(module.name, {})[circuit_shape(shape_dir)] = shape_dir
    return circuits


def write_model_folder(source: Path, target: Path, meta: ModelMetadata) -> None:
    """Lay out one served model folder: client.zip, server.zip and fhe-bento.json."""
    target.mkdir(parents=True, exist_ok=True)
    for name in ("client.zip", "server.zip"):
        shutil.copyfile(source / name, target / name)
    (target / METADATA_FILE).write_text(meta.model_dump_json(indent=2))


def import_model(source: Path, name: str, classes: list | None = None) -> bentoml.Tag:
    if not (source / "client.zip").is_file() and (circuits := hybrid_circuits(source)):
        return import_hybrid(circuits, name)
    for name_ in ("client.zip", "server.zip"):
        if not (source / name_).is_file():
            raise FileNotFoundError(f"{source / name_} is missing: pass a concrete-ml FHEModelDev folder")
    meta = describe(source, classes)
    labels = {"framework": "concrete-ml", "fhe-bento": "1"}
    metadata = meta.model_dump(exclude={"key_shape", "ciphertext_shape", "builtin_key"}, exclude_none=True)
    with bentoml.models.create(name, labels=labels, metadata=metadata) as ref:
        write_model_folder(source, Path(ref.path), meta)
    return ref.tag


def import_hybrid(circuits: dict[str, dict[str, Path]], name: str) -> bentoml.Tag:
    """A hybrid model: each (module, shape) circuit described and laid out as a model folder of its own,
    under `MODULE/SHAPE_DIR`, and listed in `fhe-bento-hybrid.json`. The weights (`model.pth`, and
    `complete_model.pth`, which holds the private ones) stay behind: the server needs only the circuits."""
    layout = HybridLayout(
        modules={
            module: {shape: f"{module}/{folder.name}" for shape, folder in shapes.items()}
            for module, shapes in circuits.items()
        }
    )
    metas = {
        (module, shape): describe(folder)
        for module, shapes in circuits.items()
        for shape, folder in shapes.items()
    }
    labels = {"framework": "concrete-ml", "fhe-bento": "1", "kind": "hybrid"}
    metadata = {"modules": sorted(circuits), "circuits": len(metas)}
    with bentoml.models.create(name, labels=labels, metadata=metadata) as ref:
        for (module, shape), meta in metas.items():
            write_model_folder(circuits[module][shape], Path(ref.path) / layout.modules[module][shape], meta)
        (Path(ref.path) / HYBRID_FILE).write_text(layout.model_dump_json(indent=2))
    return ref.tag
