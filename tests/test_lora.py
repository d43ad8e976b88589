"""LoRA fine-tuning through hybrid models (concrete-ml's `LoraTrainer`): each outsourced linear layer
becomes two remote modules, `<layer>.forward_module` and `<layer>.backward_module`, which speak the hybrid
protocol. A small LoRA model's saved folder imports as a hybrid model, and concrete-ml's own client runs a
training step (a forward call and a backward call) against a real `bentoml serve`."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import torch
from torch import nn

from harness.devserver import Server

LORA = "tiny-lora"


class LoraLinear(nn.Module):
    """A linear layer with a LoRA adapter, as concrete-ml's LoraTraining finds them (`lora_a`, `lora_b`,
    `lora_dropout`); the adapter runs on the client."""

    def __init__(self, inputs: int, outputs: int) -> None:
        super().__init__()
        self.base = nn.Linear(inputs, outputs)
        self.lora_a = nn.Linear(inputs, 2, bias=False)
        self.lora_b = nn.Linear(2, outputs, bias=False)
        self.lora_dropout = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.lora_b(self.lora_a(self.lora_dropout(x)))


class TinyLora(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.adapter = LoraLinear(8, 16)
        self.head = nn.Linear(16, 2)
        for name, parameter in self.named_parameters():
            parameter.requires_grad = "lora" in name

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(torch.relu(self.adapter(x)))


BATCH = (torch.randn(4, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1, 1, 0]))


def _compiled_trainer(root: Path):
    """concrete-ml's LoraTrainer of the tiny model, compiled on the batch."""
    from concrete.ml.torch.lora import LoraTrainer

    root.mkdir(parents=True, exist_ok=True)
    model = TinyLora()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    trainer = LoraTrainer(model, optimizer, loss_fn=nn.CrossEntropyLoss(), train_log_path=str(root / "log"))
    trainer.compile(BATCH, n_bits=8)
    return trainer


@pytest.fixture(scope="module")
def lora_server(demo, tmp_path_factory):
    from fhe_bento.modelkit.importer import import_model

    root = tmp_path_factory.mktemp("lora")
    trainer = _compiled_trainer(root)
    trainer.hybrid_model.save_and_clear_private_info(root / LORA)
    import_model(root / LORA, LORA)
    server = Server(
        root / "server",
        {
            "FHE_BENTO_MODELS": f"{LORA}:latest",
            "FHE_BENTO_KEY_STORE": (root / "keys").as_uri(),
            "FHE_BENTO_STAGING_DIR": str(root / "staging"),
        },
    )
    server.start()
    yield server, trainer.remote_names
    server.stop()


def test_a_lora_model_imports_with_its_forward_and_backward_modules(lora_server) -> None:
    server, remote_names = lora_server
    described = httpx.get(f"{server.url}/v1/models/{LORA}").json()
    assert described["hybrid"] is True
    assert set(described["modules"]) == set(remote_names)
    assert {"inference_model.head.forward_module", "inference_model.head.backward_module"} <= set(
        remote_names
    )


def test_concrete_mls_client_runs_a_forward_and_a_backward_call(lora_server, tmp_path: Path) -> None:
    """One LoRA training step with concrete-ml's remote modules: the LoRA weights get gradients, and the
    server ran the forward and the backward circuits (its row counters)."""
    from concrete.ml.torch.hybrid_model import HybridFHEModel
    from concrete.ml.torch.lora import LoraTraining, get_remote_names

    server, _ = lora_server
    training = LoraTraining(TinyLora(), loss_fn=nn.CrossEntropyLoss())
    hybrid = HybridFHEModel(
        training, get_remote_names(training), server_remote_address=server.url, model_name=LORA
    )
    hybrid.init_client(path_to_clients=tmp_path / "clients", path_to_keys=tmp_path / "keys")
    hybrid.set_fhe_mode("remote")
    loss, _ = hybrid(BATCH, fhe="remote")
    gradients = [p.grad for name, p in training.named_parameters() if "lora" in name]
    assert len(gradients) == 2 and all(g is not None for g in gradients)

    # The same step, compiled the same way, in concrete-ml's quantized clear mode: the remote circuits are
    # linear (levelled), so FHE is exact and the loss and gradients are equal.
    reference = _compiled_trainer(tmp_path / "reference")
    reference.lora_training_module.zero_grad()  # compiling ran the batch once (calibration)
    clear_loss, _ = reference.hybrid_model(BATCH, fhe="disable")
    clear_gradients = [
        p.grad for name, p in reference.lora_training_module.named_parameters() if "lora" in name
    ]
    torch.testing.assert_close(loss, clear_loss, rtol=0, atol=0)
    for ours, theirs in zip(gradients, clear_gradients, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    for module in ("inference_model.head.forward_module", "inference_model.head.backward_module"):
        rows = server.metric(
            "fhe_bento_rows_total", outcome="ok", model=f"{LORA}/{module}/" + _shape(server, module)
        )
        assert rows >= 1, module


def _shape(server: Server, module: str) -> str:
    (shape,) = httpx.get(f"{server.url}/v1/models/{LORA}").json()["modules"][module]
    return "x".join(part.strip() for part in shape.strip("()").split(",") if part.strip())
