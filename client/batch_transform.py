"""SageMaker Batch Transform for a data owner: rows encrypted into JSON Lines in S3, one transform job on a
deployed SageMaker Model, and its output read back from S3 and decrypted, row for row.

Records carry only a key id (`protocol/transform.py`): a model that needs an evaluation key must have it
in the fleet's shared key store first, so `ArtifactsTransport` registers it through a real-time endpoint
on that store (`keys`). Model facts come from the deployed artifacts, as for async endpoints. The job is the
sagemaker SDK's `TransformJob` resource (create, get, wait); `session` is a boto3 session (default: boto3's
usual chain, which honours `AWS_ENDPOINT_URL`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import PurePosixPath
from typing import TYPE_CHECKING

import numpy as np
from tqdm.auto import tqdm

from fhe_bento.client.answers import FHEServiceError
from fhe_bento.client.api import RemoteModel, Transport
from fhe_bento.client.sagemaker_transport import FromArtifacts, ModelFolders, split_s3
from fhe_bento.protocol import transform

if TYPE_CHECKING:
    import boto3
    from sagemaker.core.resources import TransformJob

JOB_SECONDS = 3600  # a request of a transform job may take SageMaker's longest invocation timeout
INPUT_NAME = "records.jsonl"


class ArtifactsTransport(FromArtifacts):
    """Model facts from the deployed artifacts; key checks and uploads through `keys` (a transport to a
    real-time endpoint on the same key store), for models that need a key."""

    def __init__(self, models: ModelFolders, keys: Transport | None = None) -> None:
        self.models = models
        self.keys = keys

    def _keys(self) -> Transport:
        if self.keys is None:
            raise FHEServiceError(
                0,
                "key_endpoint_required",
                "this model needs an evaluation key: register it "
                "through a real-time endpoint on the same key store (--key-endpoint)",
            )
        return self.keys

    def has_key(self, name: str, key_id: str) -> bool:
        return self._keys().has_key(name, key_id)

    def put_key(self, name: str, key: bytes, on_progress: Callable[[int], None]) -> dict:
        return self._keys().put_key(name, key, on_progress)

    def predict_batch(self, name: str, key_id: str | None, rows: list[bytes]) -> list[bytes]:
        raise FHEServiceError(0, "not_supported", "a batch transform answers through S3: use run_transform")


def input_url(job: TransformJob) -> str:
    return job.transform_input.data_source.s3_data_source.s3_uri


def output_url(job: TransformJob) -> str:
    """Where SageMaker writes the answers to an input object: `<output path>/<input name>.out`."""
    return f"{job.transform_output.s3_output_path.rstrip('/')}/{PurePosixPath(input_url(job)).name}.out"


def start_transform(
    model: RemoteModel,
    x: np.ndarray,
    *,
    job_name: str,
    model_name: str,
    input_prefix: str,
    output_prefix: str,
    instance_type: str,
    instance_count: int,
    s3,
    session: boto3.Session | None = None,
    progress: bool = True,
) -> TransformJob:
    """Encrypt the rows into JSON Lines at `input_prefix`, then create the transform job on the SageMaker
    Model `model_name` (`SplitType=Line`, `BatchStrategy=MultiRecord`)."""
    from sagemaker.core import shapes
    from sagemaker.core.resources import TransformJob

    key_id = model.ensure_key()
    lines = []
    for row in tqdm(x, desc=f"encrypt {model.name}", unit="row", disable=not progress):
        lines.append(
            transform.encode_record(model.encrypt(row.reshape(1, -1))[0], key_id, model.name) + b"\n"
        )
    records_url = f"{input_prefix.rstrip('/')}/{job_name}/{INPUT_NAME}"
    bucket, key = split_s3(records_url)
    s3.put_object(Bucket=bucket, Key=key, Body=b"".join(lines))
    return TransformJob.create(
        transform_job_name=job_name,
        model_name=model_name,
        batch_strategy="MultiRecord",
        max_payload_in_mb=transform.MAX_PAYLOAD_MB,
        model_client_config=shapes.ModelClientConfig(
            invocations_timeout_in_seconds=JOB_SECONDS, invocations_max_retries=1
        ),
        environment={"FHE_BENTO_REQUEST_TIMEOUT": str(JOB_SECONDS - 60)},
        transform_input=shapes.TransformInput(
            data_source=shapes.TransformDataSource(
                s3_data_source=shapes.TransformS3DataSource(s3_data_type="S3Prefix", s3_uri=records_url)
            ),
            content_type=transform.CONTENT_TYPE,
            split_type="Line",
        ),
        transform_output=shapes.TransformOutput(
            s3_output_path=f"{output_prefix.rstrip('/')}/{job_name}",
            accept=transform.CONTENT_TYPE,
            assemble_with="Line",
        ),
        transform_resources=shapes.TransformResources(
            instance_type=instance_type, instance_count=instance_count
        ),
        session=session,
    )


def transform_results(
    model: RemoteModel,
    job_name: str,
    *,
    s3,
    session: boto3.Session | None = None,
    wait: bool = True,
    progress: bool = True,
) -> list[np.ndarray | FHEServiceError]:
    """Each row's decrypted scores, or the error of its record, in the order of the rows."""
    from sagemaker.core.resources import TransformJob
    from sagemaker.core.utils.exceptions import FailedStatusError

    job = TransformJob.get(job_name, session=session)
    if wait:
        with contextlib.suppress(FailedStatusError):  # reported below, with the job's status
            job.wait(poll=30, timeout=2 * JOB_SECONDS)
    if job.transform_job_status != "Completed":
        raise FHEServiceError(
            0, "transform_failed", f"transform job {job_name} is {job.transform_job_status}"
        )
    bucket, key = split_s3(output_url(job))
    answers = transform.lines(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
    results: list[np.ndarray | FHEServiceError] = []
    for line in tqdm(answers, desc=f"decrypt {model.name}", unit="row", disable=not progress):
        answer = transform.decode_answer(line)
        if isinstance(answer, dict):
            results.append(FHEServiceError(0, answer["code"], answer["message"]))
        else:
            results.append(model.decrypt(answer))
    return results
