"""A server built like Zama's reference hybrid server (concrete-ml's `use_case_examples/hybrid_model`):
FastAPI routes straight onto concrete-ml's `HybridFHEModelServer`, one process, no limits or checks. The
tests compare fhe-bento's answers with its answers, and `bench/` its speed.

    python -m harness.zama_hybrid_server MODELS_DIR PORT     (or `started(MODELS_DIR)` from Python)

MODELS_DIR holds one folder per model, as `save_and_clear_private_info` writes it, named by model name.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import uvicorn
from concrete.ml.torch.hybrid_model import HybridFHEModelServer
from fastapi import FastAPI, Form, UploadFile
from fastapi.responses import FileResponse, StreamingResponse

CHUNK = 1024 * 1024  # Zama's server streams its results in chunks of this size


def app(models: Path, keys: Path) -> FastAPI:
    server = HybridFHEModelServer(keys, models, None)
    api = FastAPI()

    @api.get("/list_models")
    def list_models() -> dict:
        return {model: list(modules) for model, modules in server.modules.items()}

    @api.get("/list_shapes")
    def list_shapes(model_name: str = Form(), module_name: str = Form()) -> list[str]:
        return list(server.list_shapes(model_name, module_name))

    @api.get("/get_client")
    def get_client(
        model_name: str = Form(), module_name: str = Form(), input_shape: str = Form()
    ) -> FileResponse:
        return FileResponse(
            server.get_client(model_name, module_name, input_shape), media_type="application/zip"
        )

    @api.post("/add_key")
    async def add_key(
        key: UploadFile, model_name: str = Form(), module_name: str = Form(), input_shape: str = Form()
    ) -> dict:
        return server.add_key(await key.read(), model_name, module_name, input_shape)

    @api.post("/compute")
    async def compute(
        model_input: UploadFile,
        uid: str = Form(),
        model_name: str = Form(),
        module_name: str = Form(),
        input_shape: str = Form(),
    ) -> StreamingResponse:
        data = await model_input.read()
        result = server.compute(data, uid, model_name, module_name, input_shape)
        return StreamingResponse(result[i : i + CHUNK] for i in range(0, len(result), CHUNK))  # as Zama's

    return api


@contextmanager
def started(models: Path) -> Iterator[str]:
    """The server in a subprocess on a free port, once it answers: its URL. Stopped on exit."""
    from harness.devserver import ROOT, free_port

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "harness.zama_hybrid_server", str(models), str(port)], cwd=ROOT
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    try:
        while True:
            try:
                httpx.get(f"{url}/list_models", timeout=5)
                break
            except httpx.TransportError:
                assert proc.poll() is None and time.monotonic() < deadline, (
                    "the reference server did not start"
                )
                time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        proc.wait()


if __name__ == "__main__":
    uvicorn.run(
        app(Path(sys.argv[1]), Path(tempfile.mkdtemp(prefix="zama-keys-"))),
        host="127.0.0.1",
        port=int(sys.argv[2]),
        log_level="warning",
    )
