"""`fhe-bento sagemaker build-image`: `bentoml build` + `bentoml containerize` into a SageMaker image.

The committed bentofile.yaml stays free of deployment choices; this adds them to a temporary copy: the
base image (a setting, default the public python image) and `FHE_BENTO_MODEL_DIR=/opt/ml/model`, where
SageMaker unpacks `ModelDataUrl`. The bento version is a hash of what goes into it, so rebuilding
unchanged sources reuses the bento and the image.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_BASE_IMAGE = "python:3.11-slim"
SAGEMAKER_ENV = {"FHE_BENTO_MODEL_DIR": "/opt/ml/model", "PORT": "8080"}


def bentofile_for_image(base_image: str) -> str:
    config = yaml.safe_load((ROOT / "bentofile.yaml").read_text())
    config.setdefault("docker", {})["base_image"] = base_image
    envs = [e for e in config.get("envs") or [] if e["name"] not in SAGEMAKER_ENV]
    config["envs"] = envs + [{"name": k, "value": v} for k, v in SAGEMAKER_ENV.items()]
    return yaml.safe_dump(config, sort_keys=False)


def source_version(bentofile: str) -> str:
    """A digest of the bentofile and of every file it packs (its `include` globs and docker/)."""
    digest = hashlib.sha256(bentofile.encode())
    patterns = [*yaml.safe_load(bentofile).get("include", []), "docker/*"]
    for path in sorted({path for pattern in patterns for path in ROOT.glob(pattern)}):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def _bentoml(*args: str, env: dict[str, str] | None = None) -> None:
    subprocess.run(
        [sys.executable, "-m", "bentoml", *args],
        cwd=ROOT,
        check=True,
        env={**os.environ, **(env or {})},
        stdout=sys.stderr,
    )


def _bento_exists(tag: str) -> bool:
    import bentoml

    try:
        bentoml.bentos.get(tag)
        return True
    except bentoml.exceptions.NotFound:
        return False


def _image_exists(backend: str, image: str) -> bool:
    tool = "podman" if backend in ("buildah", "podman") else backend
    return subprocess.run([tool, "image", "inspect", image], capture_output=True).returncode == 0


def build_image(backend: str, base_image: str | None = None, repository: str = "localhost/fhe-bento") -> str:
    """Build (or reuse) the bento and its image; returns the image name."""
    bentofile = bentofile_for_image(base_image or os.environ.get("FHE_BENTO_BASE_IMAGE", DEFAULT_BASE_IMAGE))
    version = source_version(bentofile)
    image = f"{repository}:{version}"
    if _image_exists(backend, image):
        return image
    if not _bento_exists(f"fhe_bento:{version}"):
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "bentofile.yaml"
            path.write_text(bentofile)
            _bentoml("build", "-f", str(path), "--version", version, str(ROOT))
    # chroot isolation lets buildah run RUN steps inside an unprivileged container (no nested namespaces).
    _bentoml(
        "containerize",
        f"fhe_bento:{version}",
        "--backend",
        backend,
        "-t",
        image,
        env={"BUILDAH_ISOLATION": "chroot"} if backend == "buildah" else None,
    )
    return image
