"""Deploy to SageMaker: pack model folders as model.tar.gz, upload to S3, optionally push the image to
ECR, then create the Model, EndpointConfig (real time or async) and Endpoint, and wait for it.

Creating, waiting and deleting go through the sagemaker SDK: its `Session` helpers create and wait (its
`sagemaker.core.resources` classes cannot: their strict models reject the answers of moto, which the
tests run against, since an empty `VpcConfig` or `DataCaptureConfig` fails their validation), and its
resources delete, as they read no answer. Batch Transform is the SDK's `TransformJob`
(`client/batch_transform.py`).

`model.tar.gz` holds one folder per model at its root (`<name>/client.zip`, `<name>/server.zip`,
`<name>/fhe-bento.json`); SageMaker unpacks it into `/opt/ml/model`, which the image serves.
"""

from __future__ import annotations

import base64
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel, Field, model_validator

from fhe_bento.modelkit.image import SAGEMAKER_ENV
from fhe_bento.models.repository import HYBRID_FILE, METADATA_FILE, ModelLoadError, load_model
from fhe_bento.runtime.cloudwatch import ENDPOINT_ENV

if TYPE_CHECKING:
    from sagemaker.core.helper.session_helper import Session

VARIANT = "AllTraffic"
MODEL_FILES = ("client.zip", "server.zip", METADATA_FILE)
KEY_STORE_ENV = "FHE_BENTO_KEY_STORE"
# What `create_model_and_config` sets in every Model's environment, whatever `--env` says.
MANAGED_ENV = (*SAGEMAKER_ENV, KEY_STORE_ENV, ENDPOINT_ENV)


class DeployConfig(BaseModel):
    endpoint_name: str
    image_uri: str
    role_arn: str
    model_data_url: str
    key_store: str  # FHE_BENTO_KEY_STORE of every instance
    instance_type: str = "ml.m5.xlarge"
    instance_count: int = Field(default=1, ge=1)
    max_instances: int = Field(default=1, ge=1)  # the most instances the fleet may reach (autoscaling)
    async_output_path: str | None = None  # s3://... makes an asynchronous endpoint
    async_failure_path: str | None = None
    max_concurrent_invocations: int | None = Field(default=None, ge=1)
    environment: dict[str, str] = {}

    @model_validator(mode="after")
    def _shared_keys(self) -> DeployConfig:
        check_key_store(self.key_store, max(self.instance_count, self.max_instances))
        return self


def check_key_store(url: str, instances: int) -> None:
    """Keys uploaded through one instance must be there on every other, and survive a replacement."""
    if not url.startswith(("s3://", "file://")):
        raise ValueError("--key-store is s3://bucket/prefix (or file:// for a single instance)")
    if url.startswith("file://") and instances > 1:
        raise ValueError(
            "a file:// key store is one instance's own disk: more instances, or autoscaling, "
            "need an s3:// key store"
        )


def resource_names(endpoint_name: str) -> dict[str, str]:
    """The Model and EndpointConfig names that belong to an endpoint."""
    return {"model": f"{endpoint_name}-model", "config": f"{endpoint_name}-config"}


def model_folders_from_store(tags: list[str]) -> dict[str, Path]:
    import bentoml

    models = [bentoml.models.get(tag) for tag in tags]
    return {model.tag.name: Path(model.path) for model in models}


def checked_model_folders(model_dir: Path | None, tags: list[str]) -> dict[str, Path]:
    """The model folders to pack (from `model_dir`, else the BentoML store), each loaded as the server loads
    it; a ValueError says what is missing or broken."""
    from bentoml.exceptions import BentoMLException

    try:
        folders = model_folders_from_dir(model_dir) if model_dir else model_folders_from_store(tags)
        for name, folder in folders.items():
            load_model(folder, name)
    except (ModelLoadError, BentoMLException, OSError) as exc:
        raise ValueError(f"the models do not load: {exc}") from None
    if not folders:
        raise ValueError(f"no model folders in {model_dir}")
    return folders


def parse_environment(pairs: Iterable[str]) -> dict[str, str]:
    """`--env NAME=VALUE` items as a dict."""
    env = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not (sep and name):
            raise ValueError(f"--env takes NAME=VALUE, not {pair!r}")
        env[name] = value
    return env


def slowest_row_seconds(folders: dict[str, Path]) -> float:
    """The largest FHE seconds per row measured at import among the packed models."""
    return max(spec.meta.row_seconds for name, folder in folders.items() for spec in load_model(folder, name))


def model_folders_from_dir(root: Path) -> dict[str, Path]:
    return {
        p.name: p
        for p in sorted(root.iterdir())
        if (p / METADATA_FILE).is_file() or (p / HYBRID_FILE).is_file()
    }


def pack_models(folders: dict[str, Path], out: Path) -> Path:
    """Write model.tar.gz in the layout the image expects under /opt/ml/model."""
    if not folders:
        raise ValueError("no model folders to pack")
    with tarfile.open(out, "w:gz") as tar:
        for name, folder in folders.items():
            for file in MODEL_FILES:
                tar.add(folder / file, arcname=f"{name}/{file}")
    return out


def write_model_dir(folders: dict[str, Path], root: Path) -> Path:
    """Lay out folders as SageMaker unpacks model.tar.gz into /opt/ml/model, readable by any user (the
    image runs as an unprivileged user)."""
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o755)
    for name, folder in folders.items():
        (root / name).mkdir(mode=0o755, exist_ok=True)
        for file in MODEL_FILES:
            shutil.copyfile(folder / file, root / name / file)
            (root / name / file).chmod(0o644)
    return root


def model_data_url(bucket: str, prefix: str) -> str:
    return f"s3://{bucket}/" + f"{prefix.strip('/')}/model.tar.gz".lstrip("/")


def upload_model_data(s3, tarball: Path, url: str) -> None:
    bucket, key = url.removeprefix("s3://").split("/", 1)
    s3.upload_file(str(tarball), bucket, key)


def upload_models(s3, folders: dict[str, Path], url: str) -> None:
    """Pack the folders as model.tar.gz and upload it to `url`."""
    with tempfile.TemporaryDirectory() as tmp:
        upload_model_data(s3, pack_models(folders, Path(tmp) / "model.tar.gz"), url)


def push_image(ecr, local_image: str, repository: str, tool: str = "podman") -> str:
    """Tag and push a local image to ECR (creating the repository if needed); returns the image URI."""
    try:
        uri = ecr.create_repository(repositoryName=repository)["repository"]["repositoryUri"]
    except ecr.exceptions.RepositoryAlreadyExistsException:
        uri = ecr.describe_repositories(repositoryNames=[repository])["repositories"][0]["repositoryUri"]
    auth = ecr.get_authorization_token()["authorizationData"][0]
    user, password = base64.b64decode(auth["authorizationToken"]).decode().split(":", 1)
    registry = uri.split("/", 1)[0]
    target = f"{uri}:{local_image.rsplit(':', 1)[-1]}"
    subprocess.run(
        [tool, "login", "--username", user, "--password-stdin", registry], input=password.encode(), check=True
    )
    subprocess.run([tool, "tag", local_image, target], check=True)
    subprocess.run([tool, "push", target], check=True)
    return target


def create_model_and_config(
    session: Session, config: DeployConfig, model_name: str, config_name: str
) -> None:
    """Create the Model (the image, the model data and the environment every instance needs) and the
    EndpointConfig (real time or async) with the sagemaker SDK's `Session`."""
    session.create_model(
        model_name,
        role=config.role_arn,
        container_defs={
            "Image": config.image_uri,
            "ModelDataUrl": config.model_data_url,
            "Environment": {
                **SAGEMAKER_ENV,
                KEY_STORE_ENV: config.key_store,
                ENDPOINT_ENV: config.endpoint_name,
                **config.environment,
            },
        },
    )
    async_config: dict[str, dict[str, str | int]] | None = None
    if config.async_output_path:
        output: dict[str, str | int] = {"S3OutputPath": config.async_output_path}
        if config.async_failure_path:
            output["S3FailurePath"] = config.async_failure_path
        async_config = {"OutputConfig": output}
        if config.max_concurrent_invocations:
            async_config["ClientConfig"] = {
                "MaxConcurrentInvocationsPerInstance": config.max_concurrent_invocations
            }
    session.create_endpoint_config(
        config_name,
        [
            {
                "VariantName": VARIANT,
                "ModelName": model_name,
                "InstanceType": config.instance_type,
                "InitialInstanceCount": config.instance_count,
            }
        ],
        async_inference_config_dict=async_config,
    )


def create_endpoint(session: Session, config: DeployConfig) -> dict:
    """Create the Model, EndpointConfig and Endpoint with the sagemaker SDK's `Session`; returns the names
    and the endpoint ARN."""
    names = resource_names(config.endpoint_name)
    create_model_and_config(session, config, names["model"], names["config"])
    session.create_endpoint(config.endpoint_name, names["config"], wait=False)
    return {**names, "endpoint": config.endpoint_name, "endpoint_arn": session.endpoint_arn}


def wait_in_service(session: Session, endpoint_name: str, poll: int = 15) -> str:
    """Wait with the SDK's `wait_for_endpoint` (it gives up on a status other than InService); returns the
    final status."""
    from sagemaker.core.exceptions import UnexpectedStatusException

    try:
        return session.wait_for_endpoint(endpoint_name, poll=poll)["EndpointStatus"]
    except UnexpectedStatusException:
        return session.sagemaker_client.describe_endpoint(EndpointName=endpoint_name)["EndpointStatus"]


def delete_endpoint(endpoint_name: str, configs: Iterable[str], models: Iterable[str]) -> None:
    """Tear down the endpoint, then the EndpointConfigs and Models it held (`fhe-bento sagemaker delete` asks
    `sagemaker_update.held_resources` which), with the sagemaker SDK's resources, in the environment's AWS
    account and region."""
    from sagemaker.core.resources import Endpoint, EndpointConfig, Model

    Endpoint(endpoint_name=endpoint_name).delete()
    for config in configs:
        EndpointConfig(endpoint_config_name=config).delete()
    for model in models:
        Model(model_name=model).delete()
