"""Hybrid models (concrete-ml's `HybridFHEModel`): imported whole, served per (module, shape) circuit, and
driven by concrete-ml's own client, unmodified, against a real `bentoml serve`.

Two models: the demo's GPT-2-shaped `tiny-gpt2` (its first attention projection in FHE, compiled for two
context sizes: a levelled circuit, so FHE is exact and decrypted values equal the quantized clear ones),
and `tiny-relu`, a linear layer + ReLU whose circuit bootstraps and so needs a real evaluation key.
"""

from __future__ import annotations

import copy
import io
from pathlib import Path

import httpx
import numpy as np
import pytest
import requests
import torch
from conftest import LOGREG, assert_documented_rejection, assert_error

from fhe_bento.modelkit import tinygpt
from harness.devserver import Server
from harness.zama_hybrid_server import started

GPT = "tiny-gpt2"
RELU = "tiny-relu"
CONTEXTS = (2, 3)
ATTN = tinygpt.REMOTE_MODULES[0]


class ReluBlock(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.act = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
        self.out = torch.nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.act(x))


def relu_block() -> ReluBlock:
    torch.manual_seed(1)
    return ReluBlock()


RELU_INPUT = torch.randn(1, 2, 4, generator=torch.Generator().manual_seed(2))


@pytest.fixture(scope="module")
def hybrid_folders(demo, tmp_path_factory) -> dict[str, Path]:
    """Both models compiled, saved with `save_and_clear_private_info` under one folder named by model (as
    Zama's hybrid server reads them), and imported: model name -> its saved folder."""
    from concrete.ml.torch.hybrid_model import HybridFHEModel

    from fhe_bento.modelkit.importer import import_model

    root = tmp_path_factory.mktemp("hybrid")
    tinygpt.compile_hybrid(root / GPT, CONTEXTS)
    relu = HybridFHEModel(relu_block(), ["act"])
    relu.compile_model(
        torch.randn(64, 2, 4, generator=torch.Generator().manual_seed(3)), n_bits=3, rounding_threshold_bits=3
    )
    relu.save_and_clear_private_info(root / RELU)
    for name in (GPT, RELU):
        import_model(root / name, name)
    return {GPT: root / GPT, RELU: root / RELU}


@pytest.fixture(scope="module")
def hybrid_server(hybrid_folders, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("hybrid-server")
    server = Server(
        workdir,
        {
            "FHE_BENTO_MODELS": f"{LOGREG}:latest,{GPT}:latest,{RELU}:latest",
            "FHE_BENTO_KEY_STORE": (workdir / "keys").as_uri(),
            "FHE_BENTO_STAGING_DIR": str(workdir / "staging"),
        },
    )
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def zama_server(hybrid_folders):
    """The reference: concrete-ml's `HybridFHEModelServer` on the same folders."""
    with started(next(iter(hybrid_folders.values())).parent) as url:
        yield url


def remote_model(model: torch.nn.Module, modules: list[str], url: str, name: str, work: Path):
    """concrete-ml's own client, as its docs use it: remote modules computed by the server at `url`."""
    from concrete.ml.torch.hybrid_model import HybridFHEModel

    hybrid = HybridFHEModel(model, modules, server_remote_address=url, model_name=name)
    work.mkdir(parents=True, exist_ok=True)
    hybrid.init_client(path_to_clients=work / "clients", path_to_keys=work / "keys")
    hybrid.set_fhe_mode("remote")
    return hybrid


def quantized_clear(model: torch.nn.Module, modules: list[str], calibration: torch.Tensor, **compile_kw):
    """The same model compiled the same way, run with its modules' quantized clear computation."""
    from concrete.ml.torch.hybrid_model import HybridFHEModel

    hybrid = HybridFHEModel(copy.deepcopy(model), modules)
    hybrid.compile_model(calibration, **compile_kw)
    return lambda x: hybrid(x, fhe="disable")


def test_import_keeps_only_the_circuits_and_describes_each(hybrid_folders, hybrid_server):
    import bentoml

    stored = Path(bentoml.models.get(f"{GPT}:latest").path)
    files = {p.relative_to(stored).as_posix() for p in stored.rglob("*") if p.is_file()}
    assert not any(name.endswith(".pth") for name in files)  # neither model.pth nor complete_model.pth
    listing = httpx.get(f"{hybrid_server.url}/v1/models/{GPT}").json()
    shapes = {f"(1, {n}, 16)" for n in CONTEXTS}
    assert listing["hybrid"] is True and set(listing["modules"]) == {ATTN}
    assert set(listing["modules"][ATTN]) == shapes
    for shape, circuit in listing["modules"][ATTN].items():
        assert circuit["hybrid"] == {"model": GPT, "module": ATTN, "shape": shape}
        assert circuit["eval_key_bytes"] > 0 and circuit["row_seconds"] > 0
    assert httpx.get(f"{hybrid_server.url}/list_models").json()[GPT][ATTN].keys() == shapes


def test_concrete_ml_client_unmodified_equals_zama_server_and_quantized_clear(
    hybrid_server, zama_server, tmp_path
):
    """Generation through concrete-ml's remote modules: fhe-bento's decrypted values equal those of
    concrete-ml's own server on the same folder, and the quantized clear model's (a levelled circuit)."""
    prompt = [5, 9]
    ours = remote_model(
        tinygpt.TinyGPT.build(), tinygpt.REMOTE_MODULES, hybrid_server.url, GPT, tmp_path / "a"
    )
    zama = remote_model(tinygpt.TinyGPT.build(), tinygpt.REMOTE_MODULES, zama_server, GPT, tmp_path / "b")
    ids = torch.tensor([prompt, [1, 2]])
    with torch.no_grad():
        served, reference = ours.model(ids).numpy(), zama.model(ids).numpy()
    np.testing.assert_array_equal(served, reference)
    clear = quantized_clear(
        tinygpt.TinyGPT.build(), tinygpt.REMOTE_MODULES, tinygpt.calibration_ids(2), n_bits=8
    )
    with torch.no_grad():
        np.testing.assert_allclose(served, clear(ids).detach().numpy(), rtol=0, atol=1e-5)
        float_logits = tinygpt.TinyGPT.build()(ids).numpy()
    assert np.abs(served - float_logits).max() < 0.1 * np.abs(float_logits).max()
    assert tinygpt.generate(ours.model, prompt, 1) == tinygpt.generate(zama.model, prompt, 1)


def test_keys_survive_a_restart_without_a_new_add_key(hybrid_server, tmp_path):
    """A bootstrapped circuit: its key is content-addressed in the store, so after a restart the uid the
    client got at `init_client` still computes, and the client uploads nothing again."""
    client = remote_model(relu_block(), ["act"], hybrid_server.url, RELU, tmp_path)
    name = f"{RELU}/act/1x2x4"
    assert hybrid_server.metric("fhe_bento_key_uploads_total", model=name) == 1
    with torch.no_grad():
        before = client.model(RELU_INPUT).numpy()
    hybrid_server.restart()
    with torch.no_grad():
        after = client.model(RELU_INPUT).numpy()
    assert hybrid_server.metric("fhe_bento_key_uploads_total", model=name) == 0  # fresh process, no upload
    assert hybrid_server.metric("fhe_bento_rows_total", model=name, outcome="ok") == 1
    clear = relu_block()(RELU_INPUT).detach().numpy()
    for result in (before, after):
        np.testing.assert_allclose(result, clear, atol=0.25)


def test_native_batch_route_answers_a_module_call_in_order(hybrid_server, tmp_path):
    """One request per module call, all its rows, in the batch framing, on the circuit's served name."""
    from concrete.ml.deployment import FHEModelClient

    from fhe_bento.protocol import wire

    name = f"{GPT}/{ATTN}/1x2x16"
    (tmp_path / "client.zip").write_bytes(
        httpx.get(f"{hybrid_server.url}/v1/models/{name}/client.zip").content
    )
    client = FHEModelClient(str(tmp_path), key_dir=str(tmp_path / "keys"))
    rows = [np.random.default_rng(i).normal(size=(1, 2, 16)) for i in range(3)]
    body = wire.encode_batch([client.quantize_encrypt_serialize(row) for row in rows])
    answer = httpx.post(
        f"{hybrid_server.url}/v1/models/{name}/predict_batch",
        content=body,
        headers={"Content-Type": wire.CONTENT_TYPE},
        timeout=120,
    )
    assert answer.status_code == 200, answer.text
    results = [client.deserialize_decrypt_dequantize(r) for r in wire.decode_batch(answer.content, 8)]
    assert len(results) == 3
    # each row's own answer: different inputs, different outputs, in the order sent
    assert all(not np.array_equal(results[i], results[j]) for i in range(3) for j in range(i))


def _form(url: str, route: str, method: str = "GET", **fields: str | bytes) -> requests.Response:
    """What concrete-ml's client sends: text fields as a form (in a GET's body too), bytes as files."""
    data = {k: v for k, v in fields.items() if isinstance(v, str)}
    files = {k: io.BytesIO(v) for k, v in fields.items() if isinstance(v, bytes)}
    return requests.request(method, f"{url}/{route}", data=data, files=files or None, timeout=60)


@pytest.mark.parametrize(
    ("fields", "status", "code"),
    [
        (
            {"model_name": "no-such-model", "module_name": ATTN, "input_shape": "(1, 2, 16)"},
            404,
            "unknown_model",
        ),
        ({"model_name": GPT, "module_name": "h.9.mlp", "input_shape": "(1, 2, 16)"}, 404, "unknown_module"),
        ({"model_name": GPT, "module_name": ATTN, "input_shape": "(1, 7, 16)"}, 404, "unknown_shape"),
        ({"model_name": GPT, "module_name": ATTN}, 400, "missing_field"),
    ],
)
def test_unknown_names_and_shapes_get_a_json_4xx_on_every_hybrid_route(hybrid_server, fields, status, code):
    url = hybrid_server.url
    assert_error(_form(url, "get_client", **fields), status, code)
    assert_error(_form(url, "add_key", "POST", key=b"\x00" * 64, **fields), status, code)
    assert_error(
        _form(url, "compute", "POST", model_input=b"\x00" * 64, uid="0" * 64, **fields), status, code
    )
    if fields["model_name"] == "no-such-model":
        assert_error(_form(url, "list_modules", model_name="no-such-model"), 404, "unknown_model")
    if code == "unknown_module":
        assert_error(_form(url, "list_shapes", model_name=GPT, module_name="h.9.mlp"), 404, "unknown_module")


def test_hostile_ciphertexts_and_keys_per_circuit_are_refused_before_concrete(hybrid_server, tmp_path):
    """Garbage, Cap'n Proto-crafted ciphertexts (every structural attack family on a real ciphertext of the
    circuit) and a key made for another circuit: each gets exactly the answer the circuit's layout check
    owes it (`layout_refusal`), and no engine process dies."""
    import random

    import bentoml
    from concrete.ml.deployment import FHEModelClient

    from fhe_bento.models.repository import circuit_name, load_model
    from harness.capnp_attacks import FAMILIES, layout_refusal, mutate

    url = hybrid_server.url
    fields = {"model_name": GPT, "module_name": ATTN, "input_shape": "(1, 3, 16)"}
    served = circuit_name(GPT, ATTN, fields["input_shape"])  # the circuit, as the server loads it
    spec = next(
        s for s in load_model(Path(bentoml.models.get(f"{GPT}:latest").path), GPT) if s.name == served
    )
    # A levelled circuit needs no key: every row of /compute reaches its layout check (the uid is not
    # looked up).
    assert not spec.meta.needs_key
    for name, circuit in [
        (RELU, {"model_name": RELU, "module_name": "act", "input_shape": "(1, 2, 4)"}),
        (GPT, fields),
    ]:
        (tmp_path / name / "client.zip").parent.mkdir()
        (tmp_path / name / "client.zip").write_bytes(_form(url, "get_client", **circuit).content)
    other_key = FHEModelClient(
        str(tmp_path / RELU), key_dir=str(tmp_path / "keys")
    ).get_serialized_evaluation_keys()
    expected = layout_refusal(spec, other_key, "key")
    assert expected is not None, "the other circuit's key has this circuit's layout"
    assert_documented_rejection(_form(url, "add_key", "POST", key=other_key, **fields), expected)
    real = FHEModelClient(str(tmp_path / GPT), key_dir=str(tmp_path / "keys")).quantize_encrypt_serialize(
        np.zeros((1, 3, 16))
    )
    rng = random.Random(0)
    crafted = [
        mutate(real, family, rng.randint) for family in FAMILIES if family != "blob content" for _ in range(3)
    ]
    restarts = hybrid_server.metric("fhe_bento_engine_restarts_total")
    for body in [b"garbage" * 50, real[:-8], *crafted]:
        answer = _form(url, "compute", "POST", model_input=body, uid="0" * 64, **fields)
        expected = (400, "empty_body") if not body else layout_refusal(spec, body, "ciphertext")
        if expected is None:  # the circuit's exact layout: computed
            assert answer.status_code == 200, answer.text
        else:
            assert_documented_rejection(answer, expected)
    assert hybrid_server.metric("fhe_bento_engine_restarts_total") == restarts


def test_fhe_bento_client_generates_as_the_quantized_clear_model(hybrid_server, tmp_path):
    """`FHEClient.hybrid`: the demo model's attention projection on the server, one batch request per
    module call, over contexts of two lengths (two circuits)."""
    from concrete.ml.torch.hybrid_model import HybridFHEModel

    from fhe_bento.client.api import FHEClient

    client = FHEClient(hybrid_server.url, cache_dir=tmp_path, progress=False)
    model = client.hybrid(GPT, tinygpt.TinyGPT.build(), tinygpt.REMOTE_MODULES)
    clear: dict[int, HybridFHEModel] = {}
    for length in CONTEXTS:  # each circuit's own quantization, as compile_hybrid made it
        clear[length] = HybridFHEModel(tinygpt.TinyGPT.build(), tinygpt.REMOTE_MODULES)
        clear[length].compile_model(tinygpt.calibration_ids(length), n_bits=8)
    prompt = [5, 9]
    served = tinygpt.generate(model, prompt, len(CONTEXTS))
    assert served == tinygpt.generate(
        lambda ids: clear[ids.shape[1]](ids, fhe="disable"), prompt, len(CONTEXTS)
    )
    batch = torch.tensor([[1, 2, 3], [4, 5, 6]])
    with torch.no_grad():
        np.testing.assert_allclose(model(batch).numpy(), clear[3](batch, fhe="disable").numpy(), atol=1e-5)


def test_fhe_bento_client_uploads_a_circuit_key_once(hybrid_server, tmp_path):
    from fhe_bento.client.api import FHEClient

    name = f"{RELU}/act/1x2x4"
    created = hybrid_server.metric("fhe_bento_key_uploads_total", model=name, outcome="created")
    for _ in range(2):  # two clients on one cache: one key, uploaded by the first
        model = FHEClient(hybrid_server.url, cache_dir=tmp_path, progress=False).hybrid(
            RELU, relu_block(), ["act"]
        )
        with torch.no_grad():
            np.testing.assert_allclose(model(RELU_INPUT).numpy(), relu_block()(RELU_INPUT).numpy(), atol=0.25)
    assert hybrid_server.metric("fhe_bento_key_uploads_total", model=name, outcome="created") == created + 1


def test_sagemaker_invocations_and_transform_records_name_a_circuit(hybrid_server, tmp_path):
    """The SageMaker contract on a hybrid model's circuit: `op=get_model` lists its modules, `predict_batch`
    and Batch Transform records name the circuit by its served name; results decrypt as the native route's."""
    from concrete.ml.deployment import FHEModelClient

    from fhe_bento.protocol import transform, wire
    from fhe_bento.protocol.names import ATTRIBUTES_HEADER

    name = f"{GPT}/{ATTN}/1x3x16"
    invocations = f"{hybrid_server.url}/invocations"
    described = httpx.post(invocations, headers={ATTRIBUTES_HEADER: f"op=get_model;model={GPT}"}).json()
    assert described["modules"][ATTN]["(1, 3, 16)"]["name"] == name
    zipped = httpx.post(invocations, headers={ATTRIBUTES_HEADER: f"op=get_client;model={name}"})
    (tmp_path / "client.zip").write_bytes(zipped.content)
    client = FHEModelClient(str(tmp_path), key_dir=str(tmp_path / "keys"))
    rows = [np.random.default_rng(i).normal(size=(1, 3, 16)) for i in range(2)]
    ciphertexts = [client.quantize_encrypt_serialize(row) for row in rows]
    batch = httpx.post(
        invocations,
        content=wire.encode_batch(ciphertexts),
        headers={ATTRIBUTES_HEADER: f"op=predict_batch;model={name}", "Content-Type": wire.CONTENT_TYPE},
        timeout=120,
    )
    assert batch.status_code == 200, batch.text
    records = b"\n".join(transform.encode_record(c, None, name) for c in ciphertexts)
    lines = httpx.post(
        invocations, content=records, headers={"Content-Type": transform.CONTENT_TYPE}, timeout=120
    )
    assert lines.status_code == 200, lines.text
    from_batch = [client.deserialize_decrypt_dequantize(r) for r in wire.decode_batch(batch.content, 8)]
    from_records = [
        client.deserialize_decrypt_dequantize(transform.decode_answer(line))
        for line in lines.content.splitlines()
    ]
    for one, other in zip(from_batch, from_records, strict=True):
        np.testing.assert_array_equal(one, other)  # a levelled circuit: both exact


def test_concrete_ml_client_through_a_standalone_runner(hybrid_folders, tmp_path):
    """`FHE_BENTO_RUNNER_URL`: the HTTP service holds no engine; the runner served alone computes the
    circuits of both hybrid models, keys registered through the service."""
    common = {
        "FHE_BENTO_MODELS": f"{GPT}:latest,{RELU}:latest",
        "FHE_BENTO_KEY_STORE": (tmp_path / "keys").as_uri(),
    }
    runner = Server.runner(
        tmp_path / "runner", {**common, "FHE_BENTO_STAGING_DIR": str(tmp_path / "runner-staging")}
    )
    service = Server(
        tmp_path / "service",
        {
            **common,
            "FHE_BENTO_STAGING_DIR": str(tmp_path / "service-staging"),
            "FHE_BENTO_RUNNER_URL": runner.url,
        },
    )
    try:
        runner.start()
        service.start()
        assert not service.engines()
        client = remote_model(relu_block(), ["act"], service.url, RELU, tmp_path / "client")
        with torch.no_grad():
            np.testing.assert_allclose(
                client.model(RELU_INPUT).numpy(), relu_block()(RELU_INPUT).numpy(), atol=0.25
            )
        assert runner.metric("fhe_bento_rows_total", model=f"{RELU}/act/1x2x4", outcome="ok") == 1
    finally:
        service.stop()
        runner.stop()


def test_a_model_dir_serves_an_imported_hybrid_folder(hybrid_folders, tmp_path):
    """`FHE_BENTO_MODEL_DIR` (SageMaker's /opt/ml/model): an imported hybrid folder beside a single model."""
    import shutil

    import bentoml

    from fhe_bento.models.repository import load_specs
    from fhe_bento.runtime.settings import Settings

    for name in (GPT, LOGREG):
        shutil.copytree(bentoml.models.get(f"{name}:latest").path, tmp_path / name)
    specs = load_specs(Settings(model_dir=tmp_path))
    assert {spec.name for spec in specs.values()} == {LOGREG, *(f"{GPT}/{ATTN}/1x{n}x16" for n in CONTEXTS)}
    assert {spec.circuit.shape for spec in specs.values() if spec.circuit} == {
        f"(1, {n}, 16)" for n in CONTEXTS
    }


def test_a_gets_form_is_bounded_before_it_is_read(hybrid_server):
    """The hybrid client's GET forms are bodies too: one over 64 KiB is refused while it streams in."""
    body = b"model_name=" + b"a" * (80 * 1024)
    answer = httpx.request(
        "GET",
        f"{hybrid_server.url}/list_modules",
        content=body,
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert_error(answer, 413, "payload_too_large")
