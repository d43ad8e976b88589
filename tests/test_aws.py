"""Deploy and async paths against moto's server mode over HTTP on 127.0.0.1 (S3 + SageMaker)."""

from __future__ import annotations

import io
import subprocess
import sys
import tarfile
from pathlib import Path

import boto3
import httpx
import pytest

from fhe_bento.client import FHEClient, FHEServiceError
from conftest import LOGREG, XGB
from fhe_bento.runners.model_repo import load_specs
from fhe_bento.runners.settings import Settings

ROLE = "arn:aws:iam::123456789012:role/fhe-bento-sagemaker"
FHE_BENTO = str(Path(sys.executable).parent / "fhe-bento")


def cli(*args: str) -> str:
    done = subprocess.run([FHE_BENTO, *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.fixture(scope="module")
def bucket(moto_url) -> str:
    boto3.client("s3").create_bucket(Bucket="fhe-bento-test")
    return "fhe-bento-test"


@pytest.mark.parametrize("mode", ["realtime", "async"])
def test_deploy_creates_model_config_endpoint_and_artifacts(mode, demo, bucket, tmp_path):
    name = f"fhe-{mode}"
    args = ["sagemaker", "deploy", "--endpoint-name", name, "--role", ROLE, "--bucket", bucket,
            "--prefix", f"models/{mode}", "--image-uri", "123456789012.dkr.ecr.us-east-1.amazonaws.com/fhe-bento:1",
            "--models", f"{XGB}:latest,{LOGREG}:latest", "--instance-type", "ml.c5.2xlarge",
            "--instance-count", "2", "--env", "FHE_BENTO_WORKERS=4", "--wait"]
    if mode == "async":
        args += ["--async-output", f"s3://{bucket}/out", "--async-failure", f"s3://{bucket}/failed",
                 "--max-concurrent", "2"]
    assert f"endpoint {name} is InService" in cli(*args)

    sm, s3 = boto3.client("sagemaker"), boto3.client("s3")
    model = sm.describe_model(ModelName=f"{name}-model")
    container = model["PrimaryContainer"]
    assert container["Image"].endswith("/fhe-bento:1") and model["ExecutionRoleArn"] == ROLE
    assert container["ModelDataUrl"] == f"s3://{bucket}/models/{mode}/model.tar.gz"
    assert container["Environment"] == {"FHE_BENTO_MODEL_DIR": "/opt/ml/model", "FHE_BENTO_WORKERS": "4"}
    config = sm.describe_endpoint_config(EndpointConfigName=f"{name}-config")
    (variant,) = config["ProductionVariants"]
    assert (variant["ModelName"], variant["InstanceType"], variant["InitialInstanceCount"]) == (
        f"{name}-model", "ml.c5.2xlarge", 2)
    if mode == "async":
        assert config["AsyncInferenceConfig"] == {
            "OutputConfig": {"S3OutputPath": f"s3://{bucket}/out", "S3FailurePath": f"s3://{bucket}/failed"},
            "ClientConfig": {"MaxConcurrentInvocationsPerInstance": 2},
        }
    else:
        assert "AsyncInferenceConfig" not in config

    # model.tar.gz unpacks into exactly what the image serves from /opt/ml/model.
    archive = s3.get_object(Bucket=bucket, Key=f"models/{mode}/model.tar.gz")["Body"].read()
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
        assert sorted(tar.getnames()) == sorted(
            f"{m}/{f}" for m in (XGB, LOGREG) for f in ("client.zip", "server.zip", "fhe-bento.json"))
        tar.extractall(tmp_path / "opt-ml-model", filter="data")
    assert set(load_specs(Settings(model_dir=tmp_path / "opt-ml-model"))) == {XGB, LOGREG}

    cli("sagemaker", "delete", "--endpoint-name", name)
    with pytest.raises(sm.exceptions.ClientError):
        sm.describe_endpoint(EndpointName=name)


def test_async_failure_object_raises_the_service_error(demo, bucket, moto_url, tmp_path):
    failure = '{"error": {"code": "unknown_key", "message": "key is not registered"}}'
    httpx.post(f"{moto_url}/moto-api/static/sagemaker/async-endpoint-results",
               json={"results": [{"is_failure": True, "data": failure}]}).raise_for_status()
    client = FHEClient.sagemaker("fhe-async", mode="async", input_prefix=f"s3://{bucket}/in2",
                                 models=demo_model_dir(demo, tmp_path), cache_dir=tmp_path / "cache", progress=False)
    remote = client.model(LOGREG)
    with pytest.raises(FHEServiceError) as err:
        remote.transport.submit(LOGREG, None, remote.encrypt(demo.x_test[:1])).result(poll=0.1, progress=False)
    assert err.value.code == "unknown_key"


def demo_model_dir(demo, tmp_path: Path) -> Path:
    """The deployed model folders, as the async client reads them (a local copy of model.tar.gz)."""
    from fhe_bento.modelkit.sagemaker_deploy import model_folders_from_store, pack_models

    tarball = pack_models(model_folders_from_store([f"{XGB}:latest", f"{LOGREG}:latest"]), tmp_path / "m.tar.gz")
    with tarfile.open(tarball) as tar:
        tar.extractall(tmp_path / "models", filter="data")
    return tmp_path / "models"
