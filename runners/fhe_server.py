"""concrete-ml's `FHEModelServer` on one model folder, for both of concrete-ml's ciphertext formats.

concrete-ml 1.9's `FHEModelServer.__init__` calls `load()`, which builds the TFHE-rs bridge of a model
compiled with `ciphertext_format="tfhe-rs"`, and then sets that bridge back to None: `run` would read the
radix ciphertexts as Concrete values and fail. concrete-ml's own client-server tests call `load()` a second
time, as `load_server` does. The bridge converts with the model's Concrete evaluation keys only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def load_server(folder: Path, tfhe_rs: bool) -> Any:
    """The model's FHEModelServer, with its TFHE-rs bridge when `tfhe_rs`."""
    from concrete.ml.deployment import FHEModelServer

    server = FHEModelServer(str(folder))
    if tfhe_rs:
        server.load()
    return server


def run(server: Any, inputs: bytes | tuple[bytes, ...], key: Any) -> bytes | tuple[bytes, ...]:
    """One row (or a training step's four inputs) through the circuit. A TFHE-rs model answers a tuple of
    one radix array, which is the row's result."""
    result = server.run(inputs, key)
    return result[0] if isinstance(result, tuple) and len(result) == 1 else result
