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
from typing import Any

import bentoml
import numpy as np

from fhe_bento.checks import radix_wire
from fhe_bento.checks.capnp_wire import first_difference, read_shape
from fhe_bento.checks.payloads import check_keyset_params
from fhe_bento.models.repository import (
    HYBRID_FILE,
    METADATA_FILE,
    HybridLayout,
    Layout,
    ModelMetadata,
    TrainingFacts,
    sha256_file,
    zip_versions,
)
from fhe_bento.runners import fhe_server


def _throwaway_keys(folder: Path, key_dir: Path, count: int):
    """A client with fresh keys, and `count` serialized evaluation keys of fresh key sets."""
    from concrete.ml.deployment import FHEModelClient

    keys = []
    for index in range(count):
        client = FHEModelClient(str(folder), key_dir=str(key_dir / str(index)))
        client.generate_private_and_evaluation_keys(force=True)
        # Not get_serialized_evaluation_keys(): for a TFHE-rs model it generates again, and replaces the
        # radix secret key with one the Concrete keyset was not made from.
        keys.append(client.client.evaluation_keys.serialize())
    return client, keys


def _measure(
    server_zip_dir: str, tfhe_rs: bool, inputs: bytes | tuple[bytes, ...], keys: list[bytes], queue
) -> None:
    """In a fresh process: the resident bytes that one more warm key costs (RSS after a second key was
    deserialized and used, minus RSS after the first one was), the seconds of FHE for one row (or one
    training step), and that run's serialized result."""
    import time

    import psutil
    from concrete import fhe

    server = fhe_server.load_server(Path(server_zip_dir), tfhe_rs)
    process = psutil.Process()
    warm = [fhe.EvaluationKeys.deserialize(keys[0])]
    fhe_server.run(server, inputs, warm[0])  # pays the one-time costs (OpenMP pool, first expansion)
    before = process.memory_info().rss
    warm.append(fhe.EvaluationKeys.deserialize(keys[1]))
    started = time.perf_counter()
    result = fhe_server.run(server, inputs, warm[1])
    seconds = time.perf_counter() - started
    queue.put((max(0, process.memory_info().rss - before), seconds, result))


def _measure_in_fresh_process(
    folder: Path, tfhe_rs: bool, inputs: bytes | tuple[bytes, ...], keys: list[bytes]
) -> tuple[int, float, bytes | tuple[bytes, ...]]:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_measure, args=(str(folder), tfhe_rs, inputs, keys, queue))
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
        processing = _processing(folder)
        tfhe_rs = processing.get("ciphertext_format") == "tfhe-rs"
        dims, output_dims = _io_dimensions(folder, tfhe_rs)
        radix = None
        if processing.get("is_training"):
            inputs: bytes | tuple[bytes, ...] = _training_inputs(client, dims)
        elif len(dims) == 1:  # an inference circuit of concrete-ml takes one encrypted tensor
            inputs = _inference_input(client, np.zeros(dims[0]))
            if tfhe_rs:
                radix = _radix_layout(inputs, _inference_input(client, np.ones(dims[0])))
        else:
            raise ValueError(
                f"{folder} holds a circuit of {len(dims)} inputs that is not a training circuit: "
                "fhe-bento serves concrete-ml's inference circuits (one input) and training circuits"
            )
        key_shape = read_shape(keys[0])
        if first_difference(read_shape(keys[1]), key_shape) or len(keys[1]) != len(keys[0]):
            raise ValueError(
                "two key sets of this circuit serialize to different layouts: it cannot be checked"
            )
        check_keyset_params(key_shape, folder / "client.zip")
        keyset = client.client.specs.program_info.get_keyset_info()
        needs_key = bool(keyset.bootstrap_keys() or keyset.keyswitch_keys())
        warm_key_bytes, row_seconds, result = _measure_in_fresh_process(folder, tfhe_rs, inputs, keys)
    first = inputs[0] if isinstance(inputs, tuple) else inputs
    training = _training_facts(client, dims, inputs, result) if isinstance(inputs, tuple) else None
    return ModelMetadata(
        model_class=type(client.model).__name__,
        # a training circuit's features: its weights' rows; an inference circuit's: its input's last axis
        n_features=dims[2][1] if training else dims[0][-1],
        classes=[0, 1] if training else classes,
        n_outputs=len(classes) if classes else output_dims[-1],
        client_sha256=sha256_file(folder / "client.zip"),
        needs_key=needs_key,
        eval_key_bytes=len(keys[0]),
        key_shape=key_shape,
        ciphertext_bytes=len(first),
        ciphertext_shape=[] if radix else read_shape(first),
        radix=radix,
        builtin_key=None if needs_key else keys[0].hex(),
        warm_key_bytes=warm_key_bytes if needs_key else 0,
        row_seconds=row_seconds,
        versions=zip_versions(folder / "server.zip"),
        machine=platform.machine(),
        training=training,
    )


def _processing(folder: Path) -> dict[str, Any]:
    """client.zip's serialized_processing.json: `is_training` is set when `FHEModelDev(...).save(mode=
    "training")` wrote the folder, `ciphertext_format` is "tfhe-rs" for a model compiled for radix inputs."""
    with zipfile.ZipFile(folder / "client.zip") as archive:
        return dict(json.loads(archive.read("serialized_processing.json")))


def _inference_input(client: Any, x: np.ndarray) -> bytes:
    """One row as the model's client encrypts it: Concrete's serialized value, or for a TFHE-rs model the
    one radix array of its 1-tuple."""
    encrypted = client.quantize_encrypt_serialize(x)
    return encrypted[0] if isinstance(encrypted, tuple) else encrypted


def _radix_layout(first: bytes, second: bytes) -> radix_wire.RadixLayout:
    """The radix layout every row of a TFHE-rs model must have, from two rows of its client."""
    layout = radix_wire.read_radix(first)
    if radix_wire.read_radix(second) != layout or layout.bytes != len(first):
        raise ValueError(
            "two rows of this TFHE-rs circuit serialize to different layouts: it cannot be checked"
        )
    return layout


def _training_inputs(client: Any, dims: list[list[int]]) -> tuple[bytes, ...]:
    """One step's inputs as the model's client encrypts them: a batch (x, y), then initial (weights, bias)."""
    if len(dims) != 4:
        raise ValueError(f"a training circuit takes (x, y, weights, bias), this one takes {len(dims)} inputs")
    x, y, _, _ = client.quantize_encrypt_serialize(np.zeros(dims[0]), np.zeros(dims[1]), None, None)
    _, _, weights, bias = client.quantize_encrypt_serialize(None, None, np.zeros(dims[2]), np.zeros(dims[3]))
    return x, y, weights, bias


def _training_facts(
    client: Any, dims: list[list[int]], inputs: tuple[bytes, ...], result: bytes | tuple[bytes, ...]
) -> TrainingFacts:
    weights_quantizer = client.model.input_quantizers[2]
    assert isinstance(result, tuple), "a training step returns (weights, bias)"
    return TrainingFacts(
        batch_size=dims[0][1],
        parameters_range=(float(weights_quantizer.rmin), float(weights_quantizer.rmax)),
        inputs=[Layout(bytes=len(value), shape=read_shape(value)) for value in inputs],
        outputs=[Layout(bytes=len(value), shape=read_shape(value)) for value in result],
    )


def _dimensions(gate: dict) -> list[int]:
    return gate["typeInfo"]["lweCiphertext"]["abstractShape"]["dimensions"]


def _io_dimensions(folder: Path, tfhe_rs: bool) -> tuple[list[list[int]], list[int]]:
    """The shapes of the circuit's inputs, and of its first output, as the model's client sees them: a
    TFHE-rs circuit's Concrete gates carry one more axis (the radix blocks), its TFHE-rs specs the tensors'."""
    specs = _client_specs(folder)
    if tfhe_rs:
        (inputs,) = specs["tfhers_specs"]["input_shapes_per_func"].values()
        (outputs,) = specs["tfhers_specs"]["output_shapes_per_func"].values()
        return [list(dims) for dims in inputs], list(outputs[0])
    circuit = specs["circuits"][0]
    return [_dimensions(gate) for gate in circuit["inputs"]], _dimensions(circuit["outputs"][0])


def _client_specs(folder: Path) -> dict:
    """client.zip's `client.specs.json`."""
    with zipfile.ZipFile(folder / "client.zip") as archive:
        return dict(json.loads(archive.read("client.specs.json")))


def _circuit_specs(folder: Path) -> dict:
    """The circuit's entry in the client specs (concrete-ml models have one circuit)."""
    return dict(_client_specs(folder)["circuits"][0])


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


GLWE_ONLY = (
    "{source} is a HybridFHEModel folder with no FHE circuit: concrete-ml 1.9 saves none when every remote "
    "layer is a linear layer of 512x512 or more, which it runs on its GLWE executor (concrete-ml-extensions), "
    "and that executor has no remote path in concrete-ml 1.9. fhe-bento serves a hybrid model's Concrete "
    "circuits: compile the model with layers under 512 inputs or outputs, or without the GLWE backend"
)


def import_model(source: Path, name: str, classes: list | None = None) -> bentoml.Tag:
    if not (source / "client.zip").is_file():
        if circuits := hybrid_circuits(source):
            return import_hybrid(circuits, name)
        if (source / "model.pth").is_file():  # save_and_clear_private_info wrote it, and no circuit
            raise ValueError(GLWE_ONLY.format(source=source))
    for name_ in ("client.zip", "server.zip"):
        if not (source / name_).is_file():
            raise FileNotFoundError(f"{source / name_} is missing: pass a concrete-ml FHEModelDev folder")
    meta = describe(source, classes)
    labels = {"framework": "concrete-ml", "fhe-bento": "1"}
    metadata = meta.model_dump(
        exclude={"key_shape", "ciphertext_shape", "radix", "builtin_key"}, exclude_none=True
    )
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
