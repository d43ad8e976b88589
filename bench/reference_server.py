"""The baseline for `bench/cheap.py`: a server built the way Zama's reference deployment server is
(concrete-ml's `use_case_examples/deployment/server`), written here from its description, not copied.

One uvicorn process, one FastAPI app; `/add_key` keeps the uploaded key's bytes in a dict under a uuid;
`/compute` runs `FHEModelServer.run` on the multipart upload in the request handler, with the serialized
key (so concrete deserializes it on every call). No checks, no limits, no isolation from concrete.

    python bench/reference_server.py MODEL_FOLDER PORT
"""

from __future__ import annotations

import sys
import uuid

import uvicorn
from fastapi import FastAPI, Form, UploadFile
from fastapi.responses import Response


def build(folder: str) -> FastAPI:
    from concrete.ml.deployment import FHEModelServer

    server = FHEModelServer(folder)
    keys: dict[str, bytes] = {}
    app = FastAPI()

    @app.post("/add_key")
    async def add_key(key: UploadFile) -> dict[str, str]:
        uid = str(uuid.uuid4())
        keys[uid] = await key.read()
        return {"uid": uid}

    @app.post("/compute")
    async def compute(model_input: UploadFile, uid: str = Form()) -> Response:
        return Response(server.run(await model_input.read(), keys[uid]))

    return app


if __name__ == "__main__":
    uvicorn.run(build(sys.argv[1]), host="127.0.0.1", port=int(sys.argv[2]), log_level="warning")
