"""`FHEClient(url).hybrid(NAME, torch_model, module_names)`: a torch model whose chosen modules run in FHE
on an fhe-bento server (a hybrid model imported from concrete-ml's `HybridFHEModel`).

Each remote module is replaced by a `RemoteCircuitModule`. A call with rows of shape (n, *rest) goes to
the module's circuit for input shape (1, *rest): all n rows encrypted, sent in one batch request (at most
the client's `batch_size` rows a request), decrypted. Each circuit is a `RemoteModel` of its own, so its
client.zip and keys are fetched and generated once, kept in the client's cache, and its evaluation key
is uploaded once (and again only if the server lost it). A forward pass shows one progress bar over its
remote module calls.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

if TYPE_CHECKING:
    from fhe_bento.client.api import FHEClient, RemoteModel


class RemoteCircuitModule(torch.nn.Module):
    """A module of a hybrid model computed by the server, one circuit per compiled input shape."""

    def __init__(
        self,
        model: str,
        module: str,
        circuits: dict[str, Callable[[], RemoteModel]],
        on_call: Callable[[], None],
    ) -> None:
        super().__init__()
        self.model_name = model
        self.module_name = module
        # input shape (concrete-ml's repr) -> its RemoteModel (`FHEClient.model`, which makes each once)
        self._circuits = circuits
        self._on_call = on_call

    def circuit(self, shape: str) -> RemoteModel:
        if shape not in self._circuits:
            raise ValueError(
                f"module {self.module_name!r} of {self.model_name!r} is compiled for input shapes "
                f"{sorted(self._circuits)}, not {shape}"
            )
        return self._circuits[shape]()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.detach().cpu().numpy()
        results = self.circuit(str((1, *rows.shape[1:]))).call_rows(rows)
        self._on_call()
        return torch.tensor(results, dtype=x.dtype, device=x.device)


def hybrid(client: FHEClient, name: str, model: torch.nn.Module, module_names: list[str]) -> torch.nn.Module:
    """`model` (modified in place, and returned) with `module_names` computed by the server's hybrid model
    `name`. The model keeps only its public weights' use: the remote modules' own weights are not read."""
    info = client.transport.get_model(name)
    if not info.get("hybrid"):
        raise ValueError(f"{name!r} is not a hybrid model on this server")
    missing = set(module_names) - set(info["modules"])
    if missing:
        raise ValueError(f"{name!r} serves modules {sorted(info['modules'])}, not {sorted(missing)}")
    progress = _PassProgress(name, len(module_names), client.progress)
    for module in module_names:
        circuits: dict[str, Callable[[], RemoteModel]] = {
            shape: partial(client.model, circuit["name"])
            for shape, circuit in info["modules"][module].items()
        }
        parent_name, _, attribute = module.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attribute, RemoteCircuitModule(name, module, circuits, progress.step))
    model.register_forward_pre_hook(lambda *_: progress.start())
    model.register_forward_hook(lambda *_: progress.close())
    return model


class _PassProgress:
    """One progress bar per forward pass, over its remote module calls."""

    def __init__(self, name: str, calls: int, enabled: bool) -> None:
        self.name = name
        self.calls = calls
        self.enabled = enabled
        self.bar: tqdm | None = None

    def start(self) -> None:
        self.bar = tqdm(total=self.calls, unit="call", desc=f"forward {self.name}", disable=not self.enabled)

    def step(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
