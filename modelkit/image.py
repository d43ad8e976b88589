"""`fhe-bento sagemaker build-image`: `bentoml build` + `bentoml containerize` into a SageMaker image.

The build context is made from the installed `fhe_bento` package (a checkout's editable install or a
wheel: both ship `bentofile.yaml` and the image's setup script in `fhe_bento.modelkit`), copied with its
symlinks resolved, so the bento holds the same `fhe_bento/<folder>` layout as the wheel. The committed
bentofile.yaml stays free of deployment choices; this adds them to the copy: the base image (a setting,
default the public python image) and `FHE_BENTO_MODEL_DIR=/opt/ml/model`, where SageMaker unpacks
`ModelDataUrl`. The bento version is a hash of what goes into it, so rebuilding unchanged sources reuses
the bento and the image.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

PACKAGE = Path(__file__).parent.parent  # the installed fhe_bento; not resolved: in a checkout, a symlink
MODELKIT = PACKAGE / "modelkit"
DEFAULT_BASE_IMAGE = "python:3.11-slim"
SAGEMAKER_ENV = {"FHE_BENTO_MODEL_DIR": "/opt/ml/model", "PORT": "8080"}


def bentofile_for_image(base_image: str) -> str:
    config = yaml.safe_load((MODELKIT / "bentofile.yaml").read_text())
    config.setdefault("docker", {})["base_image"] = base_image
    envs = [e for e in config.get("envs") or [] if e["name"] not in SAGEMAKER_ENV]
    config["envs"] = envs + [{"name": k, "value": v} for k, v in SAGEMAKER_ENV.items()]
    return yaml.safe_dump(config, sort_keys=False)


def build_context(bentofile: str, context: Path) -> Path:
    """Lay out what the bento packs under `context`: the bentofile, the package's `.py` files that its
    `include` globs name, and the image's setup script."""
    (context / "bentofile.yaml").write_text(bentofile)
    for pattern in yaml.safe_load(bentofile)["include"]:
        for source in PACKAGE.glob(pattern.removeprefix("fhe_bento/")):
            target = context / "fhe_bento" / source.relative_to(PACKAGE)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
    setup = context / yaml.safe_load(bentofile)["docker"]["setup_script"]
    setup.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(MODELKIT / "trim.sh", setup)
    return context


def source_version(context: Path) -> str:
    """A digest of every file in the build context."""
    digest = hashlib.sha256()
    for path in sorted(p for p in context.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(context)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def _bentoml(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> None:
    subprocess.run(
        [sys.executable, "-m", "bentoml", *args],
        cwd=cwd,
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


def build_bento(base_image: str | None = None) -> str:
    """Build (or reuse) the bento of the installed package; returns its version."""
    bentofile = bentofile_for_image(base_image or os.environ.get("FHE_BENTO_BASE_IMAGE", DEFAULT_BASE_IMAGE))
    with tempfile.TemporaryDirectory() as tmp:
        context = build_context(bentofile, Path(tmp))
        version = source_version(context)
        if not _bento_exists(f"fhe_bento:{version}"):
            _bentoml("build", "--version", version, str(context), cwd=context)
    return version


def build_image(backend: str, base_image: str | None = None, repository: str = "localhost/fhe-bento") -> str:
    """Build (or reuse) the bento and its image; returns the image name."""
    version = build_bento(base_image)
    image = f"{repository}:{version}"
    if _image_exists(backend, image):
        return image
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
