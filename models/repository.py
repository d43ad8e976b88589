"""Where served models come from and what we know about them.

A served model is a folder with concrete-ml's `client.zip` + `server.zip` and our `fhe-bento.json`
(written by `fhe-bento import`). A hybrid model (concrete-ml's `HybridFHEModel`: chosen layers of a torch
model in FHE) is a folder of such circuit folders, one per (module, input shape), listed by its
`fhe-bento-hybrid.json`; each circuit is served as a model of its own, named `MODEL/MODULE/SHAPE`
(`circuit_name`), with its own keys, limits and metrics. Folders come from the BentoML model store
(`FHE_BENTO_MODELS`) or from a plain directory of model folders (`FHE_BENTO_MODEL_DIR`, `/opt/ml/model` in
the SageMaker image).

This module reads only JSON and zip entries: it must stay importable without concrete, so the HTTP
process starts fast and never loads FHE code.
"""

from __future__ import annotations

import hashlib
import json
import platform
import zipfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from pydantic import BaseModel, ValidationError

from fhe_bento.checks.payloads import check_keyset_params
from fhe_bento.checks.radix_wire import RadixLayout
from fhe_bento.contract.errors import FHEBentoError
from fhe_bento.protocol import wire
from fhe_bento.runtime.settings import Settings

METADATA_FILE = "fhe-bento.json"
HYBRID_FILE = "fhe-bento-hybrid.json"
CHECKED_PACKAGES = ("concrete-python", "concrete-ml")


class ModelMetadata(BaseModel):
    """Facts derived once at import time, stored beside the zips."""

    model_class: str
    n_features: int
    classes: list[int | float | str] | None = None
    n_outputs: int
    client_sha256: str
    needs_key: bool
    # What concrete-ml's client produces for this circuit (checks/payloads.py): every ciphertext and
    # evaluation key must have exactly these sizes and Cap'n Proto shapes before concrete sees it.
    eval_key_bytes: int
    key_shape: list
    ciphertext_bytes: int
    ciphertext_shape: list  # [] for a TFHE-rs model: its ciphertexts have the layout `radix` instead
    # A model compiled with `ciphertext_format="tfhe-rs"`: its rows are TFHE-rs radix ciphertexts.
    radix: RadixLayout | None = None
    # The whole evaluation key of a model that needs none (no bootstrapping, an empty keyset).
    builtin_key: str | None = None
    # Measured at import in a fresh process (modelkit/importer.py): resident bytes one more warm key
    # costs (deserialized and used once), and seconds of FHE for one row.
    warm_key_bytes: int
    row_seconds: float
    versions: dict[str, str]
    machine: str
    training: TrainingFacts | None = None  # set for a training circuit


class Layout(BaseModel):
    """The exact size and Cap'n Proto shape of one serialized value (`checks/payloads.py`)."""

    bytes: int
    shape: list


class TrainingFacts(BaseModel):
    """A training circuit (concrete-ml's `SGDClassifier(fit_encrypted=True)`, saved with
    `FHEModelDev(...).save(mode="training")`): one SGD step, `(x, y, weights, bias) -> (weights, bias)`.
    Every position's layout as the model's client encrypts it, and the weights' and bias' layouts as the
    circuit returns them: a step's inputs must match one or the other, position by position."""

    batch_size: int
    parameters_range: tuple[float, float]
    inputs: list[Layout]  # x (1, batch, features), y (1, batch, 1), weights (1, features, 1), bias (1, 1, 1)
    outputs: list[Layout]  # weights, bias as a step returns them

    def accepts(self, position: int) -> list[Layout]:
        """The layouts a value at `position` may have: the client's, or (weights, bias) a step's."""
        return [self.inputs[position]] + ([self.outputs[position - 2]] if position >= 2 else [])


def training_inputs(row: bytes) -> list[bytes]:
    """A training step's row: its four inputs (x, y, weights, bias), each a serialized value, in the
    batch framing of `protocol/wire.py`; 400 invalid_batch unless it holds exactly four."""
    try:
        values = wire.decode_batch(row, 4)
    except wire.FramingError as exc:
        raise FHEBentoError("invalid_batch", str(exc)) from None
    if len(values) != 4:
        raise FHEBentoError("invalid_batch", f"a training step takes 4 values, got {len(values)}")
    return values


class HybridLayout(BaseModel):
    """A hybrid model's circuits: module name -> input shape as concrete-ml's client writes it (the repr
    of a tuple, `(1, 6, 32)`) -> the circuit's folder, relative to the model's."""

    modules: dict[str, dict[str, str]]


class Circuit(BaseModel):
    """Where a hybrid model's circuit belongs: concrete-ml's `model_name`, `module_name`, `input_shape`."""

    model: str
    module: str
    shape: str


def circuit_name(model: str, module: str, shape: str) -> str:
    """The served name of one circuit of a hybrid model: `tinygpt/h0.attn.c_attn/1x6x32`."""
    dims = "x".join(part.strip() for part in shape.strip("()").split(",") if part.strip())
    return f"{model}/{module}/{dims}"


class ModelSpec(BaseModel):
    name: str
    version: str
    path: Path
    meta: ModelMetadata
    circuit: Circuit | None = None  # set for each circuit of a hybrid model

    def public(self) -> dict:
        """The model as `GET /v1/models` shows it."""
        return {
            "name": self.name,
            "version": self.version,
            "model_class": self.meta.model_class,
            "n_features": self.meta.n_features,
            "n_outputs": self.meta.n_outputs,
            "classes": self.meta.classes,
            "client_sha256": self.meta.client_sha256,
            "ciphertext_format": "tfhe-rs" if self.meta.radix else "concrete",
            "needs_key": self.meta.needs_key,
            "eval_key_bytes": self.meta.eval_key_bytes,
            "warm_key_bytes": self.meta.warm_key_bytes,
            "row_seconds": self.meta.row_seconds,
            **({"hybrid": self.circuit.model_dump()} if self.circuit else {}),
            **(self._training() if self.meta.training else {}),
        }

    def _training(self) -> dict:
        facts = self.meta.training
        assert facts is not None
        return {"training": True, "batch_size": facts.batch_size, "parameters_range": facts.parameters_range}

    @property
    def key_scope(self) -> str:
        return self.meta.client_sha256

    @property
    def tag(self) -> str:
        """`name:version`, as BentoML tags it: what identifies one served version, between the service, the
        runner and its engines, where several versions of a model are served side by side."""
        return f"{self.name}:{self.version}"


def served_spec(specs: dict[str, ModelSpec], tag: str) -> ModelSpec:
    """The served model version `tag` (`name:version`), or 404 `unknown_model`: the one lookup of a served
    version by its tag, in the service's operations and in the runner alike."""
    try:
        return specs[tag]
    except KeyError:
        raise FHEBentoError("unknown_model", f"no model {tag[:128]!r} is served") from None


class ModelLoadError(RuntimeError):
    pass


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def zip_versions(zip_path: Path) -> dict[str, str]:
    with zipfile.ZipFile(zip_path) as archive:
        return json.loads(archive.read("versions.json"))


def check_compatible(name: str, folder: Path, meta: ModelMetadata) -> None:
    """Refuse, at load time, a circuit this machine cannot run (never later, at the first request)."""
    built_with = zip_versions(folder / "server.zip")
    for package in CHECKED_PACKAGES:
        try:
            installed = version(package)
        except PackageNotFoundError:  # the HTTP-only image has no concrete; the runner checks again
            continue
        if built_with.get(package) != installed:
            raise ModelLoadError(
                f"model {name!r} was compiled with {package}=={built_with.get(package)} "
                f"but this server has {package}=={installed}; recompile it or pin {package}"
            )
    if meta.machine != platform.machine():
        raise ModelLoadError(
            f"model {name!r} was compiled on {meta.machine} but this server is {platform.machine()}"
        )


def load_folder(folder: Path, name: str, model_version: str | None = None) -> ModelSpec:
    for required in ("client.zip", "server.zip", METADATA_FILE):
        if not (folder / required).is_file():
            raise ModelLoadError(
                f"model {name!r}: {folder / required} is missing; "
                "import FHEModelDev folders with `fhe-bento import`"
            )
    try:
        meta = ModelMetadata.model_validate_json((folder / METADATA_FILE).read_text())
    except ValidationError as exc:
        raise ModelLoadError(
            f"model {name!r}: {folder / METADATA_FILE} is not this fhe-bento's metadata ({exc.error_count()} "
            "errors); import the FHEModelDev folder again with `fhe-bento import`"
        ) from None
    if sha256_file(folder / "client.zip") != meta.client_sha256:
        raise ModelLoadError(f"model {name!r}: client.zip does not match its recorded SHA-256")
    try:
        check_keyset_params(meta.key_shape, folder / "client.zip")
    except (ValueError, IndexError, TypeError, KeyError) as exc:
        raise ModelLoadError(
            f"model {name!r}: the recorded key shape does not fit client.specs.json: {exc}"
        ) from None
    check_compatible(name, folder, meta)
    return ModelSpec(name=name, version=model_version or meta.client_sha256[:12], path=folder, meta=meta)


def load_model(folder: Path, name: str, model_version: str | None = None) -> list[ModelSpec]:
    """The served specs of one imported model folder: itself, or each circuit of a hybrid model."""
    if not (folder / HYBRID_FILE).is_file():
        return [load_folder(folder, name, model_version)]
    try:
        layout = HybridLayout.model_validate_json((folder / HYBRID_FILE).read_text())
    except ValidationError as exc:
        raise ModelLoadError(f"model {name!r}: {folder / HYBRID_FILE} is not valid: {exc}") from None
    return [
        load_folder(folder / relative, circuit_name(name, module, shape), model_version).model_copy(
            update={"circuit": Circuit(model=name, module=module, shape=shape)}
        )
        for module, shapes in layout.modules.items()
        for shape, relative in shapes.items()
    ]


def _from_bentoml_store(tag: str) -> list[ModelSpec]:
    import bentoml

    try:
        model = bentoml.models.get(tag)
    except bentoml.exceptions.NotFound as exc:
        raise ModelLoadError(
            f"model {tag!r} is not in the BentoML model store; run `fhe-bento demo-models` "
            "or `fhe-bento import DIR --name NAME`"
        ) from exc
    return load_model(Path(model.path), model.tag.name, model.tag.version)


def _from_model_dir(root: Path) -> list[ModelSpec]:
    if not root.is_dir():
        raise ModelLoadError(f"model dir {root} does not exist")
    specs = [spec for p in sorted(root.iterdir()) if p.is_dir() for spec in load_model(p, p.name)]
    if not specs:
        raise ModelLoadError(f"model dir {root} holds no model folders")
    return specs


def load_specs(settings: Settings) -> dict[str, ModelSpec]:
    """Every configured model, validated. Raises ModelLoadError with a message meant for operators."""
    if settings.model_dir is not None:
        specs = _from_model_dir(settings.model_dir)
    else:
        specs = [spec for tag in settings.model_tags() for spec in _from_bentoml_store(tag)]
    if not specs:
        raise ModelLoadError("no models configured: set FHE_BENTO_MODELS or FHE_BENTO_MODEL_DIR")
    served: dict[str, ModelSpec] = {}
    for spec in specs:
        if spec.tag in served:
            raise ModelLoadError(f"model {spec.tag!r} is configured twice")
        served[spec.tag] = spec
    circuits = [
        (spec.circuit.model, spec.circuit.module, spec.circuit.shape) for spec in specs if spec.circuit
    ]
    if len(set(circuits)) < len(circuits):
        raise ModelLoadError("a hybrid model is configured in two versions: serve one version at a time")
    return served


def default_model(settings: Settings, specs: dict[str, ModelSpec]) -> str:
    """The name of the model of requests that name none (its default version serves them):
    FHE_BENTO_DEFAULT_MODEL, else the first single model (a hybrid model's circuits are always named by its
    client), else the first circuit."""
    names = [spec.name for spec in specs.values()]
    if settings.default_model is None:
        singles = [spec.name for spec in specs.values() if spec.circuit is None]
        return (singles or names)[0]
    if settings.default_model not in names:
        raise ModelLoadError(f"FHE_BENTO_DEFAULT_MODEL={settings.default_model!r} is not served")
    return settings.default_model
