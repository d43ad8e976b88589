"""Deploy and async paths against moto's server mode over HTTP on 127.0.0.1 (S3 + SageMaker)."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import boto3
import httpx
import pytest
from click.testing import CliRunner
from conftest import LOGREG, XGB, imported_spec

from fhe_bento.client import FHEClient, FHEServiceError
from fhe_bento.modelkit.cli import main
from fhe_bento.models.repository import load_specs
from fhe_bento.runtime.settings import Settings

ROLE = "arn:aws:iam::123456789012:role/fhe-bento-sagemaker"


def cli(*args: str, ok: bool = True, env: dict[str, str] | None = None) -> str:
    """`fhe-bento ARGS` in this process (click's runner: its imports are paid once; tests/test_end_to_end.py
    runs the installed console script itself). Returns stdout, or stderr when the command must fail."""
    done = CliRunner().invoke(main, list(args), env=env)
    assert (done.exit_code == 0) == ok, (done.output, done.exception)
    return done.stdout if ok else done.stderr


def deploy_args(
    name: str, bucket: str, *extra: str, prefix: str | None = None, models: str = f"{XGB}:latest"
) -> list[str]:
    return [
        "sagemaker",
        "deploy",
        "--endpoint-name",
        name,
        "--role",
        ROLE,
        "--bucket",
        bucket,
        "--prefix",
        prefix or name,
        "--image-uri",
        "123456789012.dkr.ecr.us-east-1.amazonaws.com/fhe-bento:1",
        "--models",
        models,
        "--poll-seconds",
        "1",
        *extra,
    ]


@pytest.fixture(scope="module")
def bucket(moto_url) -> str:
    boto3.client("s3").create_bucket(Bucket="fhe-bento-test")
    return "fhe-bento-test"


@pytest.mark.parametrize("mode", ["realtime", "async"])
def test_deploy_creates_model_config_endpoint_and_artifacts(mode, demo, bucket, tmp_path):
    name = f"fhe-{mode}"
    args = deploy_args(
        name,
        bucket,
        "--instance-type",
        "ml.c5.2xlarge",
        "--instance-count",
        "2",
        "--env",
        "FHE_BENTO_WORKERS=4",
        "--wait",
        prefix=f"models/{mode}",
        models=f"{XGB}:latest,{LOGREG}:latest",
    )
    if mode == "async":
        args += [
            "--async-output",
            f"s3://{bucket}/out",
            "--async-failure",
            f"s3://{bucket}/failed",
            "--max-concurrent",
            "2",
        ]
    assert f"endpoint {name} is InService" in cli(*args)

    sm, s3 = boto3.client("sagemaker"), boto3.client("s3")
    model = sm.describe_model(ModelName=f"{name}-model")
    container = model["PrimaryContainer"]
    assert container["Image"].endswith("/fhe-bento:1") and model["ExecutionRoleArn"] == ROLE
    assert container["ModelDataUrl"] == f"s3://{bucket}/models/{mode}/model.tar.gz"
    assert container["Environment"] == {
        "FHE_BENTO_MODEL_DIR": "/opt/ml/model",
        "PORT": "8080",
        "FHE_BENTO_WORKERS": "4",
        "FHE_BENTO_KEY_STORE": f"s3://{bucket}/models/{mode}/keys",
        "FHE_BENTO_ENDPOINT_NAME": name,
    }  # shared by default
    config = sm.describe_endpoint_config(EndpointConfigName=f"{name}-config")
    (variant,) = config["ProductionVariants"]
    assert (variant["ModelName"], variant["InstanceType"], variant["InitialInstanceCount"]) == (
        f"{name}-model",
        "ml.c5.2xlarge",
        2,
    )
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
            f"{m}/{f}" for m in (XGB, LOGREG) for f in ("client.zip", "server.zip", "fhe-bento.json")
        )
        tar.extractall(tmp_path / "opt-ml-model", filter="data")
    assert {spec.name for spec in load_specs(Settings(model_dir=tmp_path / "opt-ml-model")).values()} == {
        XGB,
        LOGREG,
    }

    cli("sagemaker", "delete", "--endpoint-name", name)
    with pytest.raises(sm.exceptions.ClientError):
        sm.describe_endpoint(EndpointName=name)


def test_async_failure_object_raises_the_service_error(demo, bucket, moto_url, tmp_path):
    failure = '{"error": {"code": "unknown_key", "message": "key is not registered"}}'
    httpx.post(
        f"{moto_url}/moto-api/static/sagemaker/async-endpoint-results",
        json={"results": [{"is_failure": True, "data": failure}]},
    ).raise_for_status()
    client = FHEClient.sagemaker(
        "fhe-async",
        mode="async",
        input_prefix=f"s3://{bucket}/in2",
        models=demo_model_dir(demo, tmp_path),
        cache_dir=tmp_path / "cache",
        progress=False,
    )
    remote = client.model(LOGREG)
    with pytest.raises(FHEServiceError) as err:
        remote.transport.submit(LOGREG, None, remote.encrypt(demo.x_test[:1])).result(
            poll=0.1, progress=False
        )
    assert err.value.code == "unknown_key"


def demo_model_dir(demo, tmp_path: Path) -> Path:
    """The deployed model folders, as the async client reads them (a local copy of model.tar.gz)."""
    from fhe_bento.modelkit.sagemaker_deploy import model_folders_from_store, pack_models

    tarball = pack_models(
        model_folders_from_store([f"{XGB}:latest", f"{LOGREG}:latest"]), tmp_path / "m.tar.gz"
    )
    with tarfile.open(tarball) as tar:
        tar.extractall(tmp_path / "models", filter="data")
    return tmp_path / "models"


def test_a_file_key_store_is_refused_for_more_than_one_instance(demo, bucket):
    sm = boto3.client("sagemaker")
    for extra in (["--instance-count", "2"], ["--min-instances", "1", "--max-instances", "2"]):
        error = cli(*deploy_args("fhe-file", bucket, "--key-store", "file:///var/keys", *extra), ok=False)
        assert "s3:// key store" in error
    with pytest.raises(sm.exceptions.ClientError):  # refused before anything was created
        sm.describe_model(ModelName="fhe-file-model")
    assert "Contents" not in boto3.client("s3").list_objects_v2(Bucket=bucket, Prefix="fhe-file/")


@pytest.mark.parametrize("mode", ["realtime", "async"])
def test_autoscaling_is_registered_and_deleted_with_the_endpoint(mode, demo, bucket):
    from fhe_bento.modelkit.sagemaker_scaling import ScalingConfig

    name = f"fhe-scaled-{mode}"
    low, high = (1, 3) if mode == "realtime" else (0, 2)
    extra = ["--min-instances", str(low), "--max-instances", str(high)]
    if mode == "async":
        extra += ["--async-output", f"s3://{bucket}/out"]
    out = cli(*deploy_args(name, bucket, *extra))
    assert f"endpoint {name} is InService" in out

    aas, cloudwatch = boto3.client("application-autoscaling"), boto3.client("cloudwatch")
    resource = f"endpoint/{name}/variant/AllTraffic"
    (target,) = aas.describe_scalable_targets(ServiceNamespace="sagemaker", ResourceIds=[resource])[
        "ScalableTargets"
    ]
    assert (target["MinCapacity"], target["MaxCapacity"]) == (low, high)
    policies = {
        p["PolicyName"]: p
        for p in aas.describe_scaling_policies(ServiceNamespace="sagemaker", ResourceId=resource)[
            "ScalingPolicies"
        ]
    }
    tracking = policies[f"{name}-target"]["TargetTrackingScalingPolicyConfiguration"]
    expected = ScalingConfig(
        min_instances=low,
        max_instances=high,
        asynchronous=mode == "async",
        row_seconds=imported_spec(XGB).meta.row_seconds,
    ).target()
    assert tracking["TargetValue"] == pytest.approx(expected) and expected > 0
    alarms = {a["AlarmName"]: a for a in cloudwatch.describe_alarms(AlarmNamePrefix=name)["MetricAlarms"]}
    rollback_alarms = {f"{name}-5xx-errors", f"{name}-model-latency"}  # deploy's, for updates
    if mode == "realtime":
        assert (
            tracking["PredefinedMetricSpecification"]["PredefinedMetricType"]
            == "SageMakerVariantInvocationsPerInstance"
        )
        assert set(policies) == {f"{name}-target"} and set(alarms) == rollback_alarms
    else:
        assert tracking["CustomizedMetricSpecification"]["MetricName"] == "ApproximateBacklogSizePerInstance"
        wake = policies[f"{name}-wake-from-zero"]
        assert wake["PolicyType"] == "StepScaling"
        assert set(alarms) == {*rollback_alarms, f"{name}-backlog-without-capacity"}
        alarm = alarms[f"{name}-backlog-without-capacity"]
        assert alarm["MetricName"] == "HasBacklogWithoutCapacity" and alarm["AlarmActions"] == [
            wake["PolicyARN"]
        ]

    cli("sagemaker", "delete", "--endpoint-name", name)
    assert (
        aas.describe_scalable_targets(ServiceNamespace="sagemaker", ResourceIds=[resource])["ScalableTargets"]
        == []
    )
    assert (
        aas.describe_scaling_policies(ServiceNamespace="sagemaker", ResourceId=resource)["ScalingPolicies"]
        == []
    )
    assert cloudwatch.describe_alarms(AlarmNamePrefix=name)["MetricAlarms"] == []
    with pytest.raises(boto3.client("sagemaker").exceptions.ClientError):
        boto3.client("sagemaker").describe_endpoint(EndpointName=name)


def test_batch_command_runs_a_transform_job_and_decrypts_its_answers(demo, bucket, server, tmp_path):
    """moto keeps the job's record but runs nothing: the test plays SageMaker's part, sending the job's
    input to a real server's /invocations, as Batch Transform does, and writing the answer where
    SageMaker writes it."""
    from fhe_bento.protocol import transform

    cli(*deploy_args("fhe-bt", bucket, models=f"{LOGREG}:latest"))
    x = demo.x_test[:3]
    data = tmp_path / "rows.csv"
    data.write_text("\n".join(",".join(repr(float(v)) for v in row) for row in x) + "\n")
    owner = {"FHE_BENTO_CLIENT_CACHE": str(tmp_path / "owner")}
    model = ["--model", LOGREG, "--models", f"s3://{bucket}/fhe-bt/model.tar.gz"]
    cli(
        "sagemaker",
        "batch",
        *model,
        "--sagemaker-model",
        "fhe-bt-model",
        "--job-name",
        "fhe-bt-1",
        "--input-prefix",
        f"s3://{bucket}/in",
        "--output-prefix",
        f"s3://{bucket}/out",
        "--no-wait",
        str(data),
        env=owner,
    )

    sm, s3 = boto3.client("sagemaker"), boto3.client("s3")
    job = sm.describe_transform_job(TransformJobName="fhe-bt-1")
    assert (job["ModelName"], job["BatchStrategy"]) == ("fhe-bt-model", "MultiRecord")
    assert job["TransformInput"] == {
        "DataSource": {
            "S3DataSource": {"S3DataType": "S3Prefix", "S3Uri": f"s3://{bucket}/in/fhe-bt-1/records.jsonl"}
        },
        "ContentType": "application/jsonlines",
        "SplitType": "Line",
    }
    assert job["TransformOutput"]["S3OutputPath"] == f"s3://{bucket}/out/fhe-bt-1"
    records = s3.get_object(Bucket=bucket, Key="in/fhe-bt-1/records.jsonl")["Body"].read()
    assert [transform.decode_record(line).model for line in transform.lines(records)] == [LOGREG] * 3

    answer = httpx.post(
        f"{server.url}/invocations",
        content=records,
        timeout=300,
        headers={"Content-Type": transform.CONTENT_TYPE},
    )
    assert answer.status_code == 200, answer.text
    s3.put_object(Bucket=bucket, Key="out/fhe-bt-1/records.jsonl.out", Body=answer.content)
    out = tmp_path / "predictions.csv"
    cli("sagemaker", "batch-results", *model, "--job-name", "fhe-bt-1", "-o", str(out), env=owner)
    assert [int(line) for line in out.read_text().split()] == list(demo.clear_predict(LOGREG, x))
    cli("sagemaker", "delete", "--endpoint-name", "fhe-bt")
