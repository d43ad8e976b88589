"""SageMaker Batch Transform for a data owner: rows encrypted into JSON Lines in S3, one transform job on a
deployed SageMaker Model, and its output read back from S3 and decrypted, row for row.

Records carry only a key id (`protocol/transform.py`): a model that needs an evaluation key must have it
in the fleet's shared key store first, so `ArtifactsTransport` registers it through a real-time endpoint
on that store (`keys`). Model facts come from the deployed artifacts, as for async endpoints.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import PurePosixPath

import numpy as np
from tqdm.auto import tqdm

from fhe_bento.client.api import RemoteModel, Transport
from fhe_bento.client.http_transport import FHEServiceError
from fhe_bento.client.sagemaker_transport import ModelFolders, split_s3
from fhe_bento.protocol import transform

JOB_SECONDS = 3600  # a request of a transform job may take SageMaker's longest invocation timeout
INPUT_NAME = "records.jsonl"


class ArtifactsTransport:
    """Model facts from the deployed artifacts; key checks and uploads through `keys` (a transport to a
    real-time endpoint on the same key store), for models that need a key."""

    def __init__(self, models: ModelFolders, keys: Transport | None = None) -> None:
        self.models = models
        self.keys = keys

    def get_model(self, name: str) -> dict:
        return self.models.info(name)

    def get_client_zip(self, name: str) -> tuple[bytes, str]:
        return self.models.files[name]["client.zip"], ""

    def _keys(self) -> Transport:
        if self.keys is None:
            raise FHEServiceError(0, "key_endpoint_required", "this model needs an evaluation key: register it "
                                  "through a real-time endpoint on the same key store (--key-endpoint)")
        return self.keys

    def has_key(self, name: str, key_id: str) -> bool:
        return self._keys().has_key(name, key_id)

    def put_key(self, name: str, key: bytes, on_progress: Callable[[int], None]) -> dict:
        return self._keys().put_key(name, key, on_progress)

    def predict_batch(self, name: str, key_id: str | None, rows: list[bytes]) -> list[bytes]:
        raise FHEServiceError(0, "not_supported", "a batch transform answers through S3: use run_transform")


@dataclass(frozen=True)
class TransformJob:
    name: str
    input_url: str  # s3://.../records.jsonl
    output_url: str  # where SageMaker writes its answers: <output prefix>/records.jsonl.out

    @classmethod
    def describe(cls, sm, name: str) -> "TransformJob":
        job = sm.describe_transform_job(TransformJobName=name)
        input_url = job["TransformInput"]["DataSource"]["S3DataSource"]["S3Uri"]
        output = job["TransformOutput"]["S3OutputPath"].rstrip("/")
        return cls(name, input_url, f"{output}/{PurePosixPath(input_url).name}.out")


def start_transform(model: RemoteModel, x: np.ndarray, *, job_name: str, model_name: str, input_prefix: str,
                    output_prefix: str, instance_type: str, instance_count: int, s3, sm,
                    progress: bool = True) -> TransformJob:
    """Encrypt the rows into JSON Lines at `input_prefix`, then create the transform job on the SageMaker
    Model `model_name` (`SplitType=Line`, `BatchStrategy=MultiRecord`)."""
    key_id = model.ensure_key()
    lines = []
    for row in tqdm(x, desc=f"encrypt {model.name}", unit="row", disable=not progress):
        lines.append(transform.encode_record(model.encrypt(row.reshape(1, -1))[0], key_id, model.name) + b"\n")
    input_url = f"{input_prefix.rstrip('/')}/{job_name}/{INPUT_NAME}"
    bucket, key = split_s3(input_url)
    s3.put_object(Bucket=bucket, Key=key, Body=b"".join(lines))
    output_url = f"{output_prefix.rstrip('/')}/{job_name}"
    sm.create_transform_job(
        TransformJobName=job_name, ModelName=model_name, BatchStrategy="MultiRecord", MaxPayloadInMB=1,
        ModelClientConfig={"InvocationsTimeoutInSeconds": JOB_SECONDS, "InvocationsMaxRetries": 1},
        Environment={"FHE_BENTO_REQUEST_TIMEOUT": str(JOB_SECONDS - 60)},
        TransformInput={"DataSource": {"S3DataSource": {"S3DataType": "S3Prefix", "S3Uri": input_url}},
                        "ContentType": transform.CONTENT_TYPE, "SplitType": "Line"},
        TransformOutput={"S3OutputPath": output_url, "Accept": transform.CONTENT_TYPE, "AssembleWith": "Line"},
        TransformResources={"InstanceType": instance_type, "InstanceCount": instance_count})
    return TransformJob(job_name, input_url, f"{output_url}/{INPUT_NAME}.out")


def transform_results(model: RemoteModel, job: TransformJob, *, s3, sm, wait: bool = True,
                      progress: bool = True) -> list[np.ndarray | FHEServiceError]:
    """Each row's decrypted scores, or the error of its record, in the order of the rows."""
    if wait:
        sm.get_waiter("transform_job_completed_or_stopped").wait(
            TransformJobName=job.name, WaiterConfig={"Delay": 30, "MaxAttempts": 2 * JOB_SECONDS // 30})
    status = sm.describe_transform_job(TransformJobName=job.name)["TransformJobStatus"]
    if status != "Completed":
        raise FHEServiceError(0, "transform_failed", f"transform job {job.name} is {status}")
    bucket, key = split_s3(job.output_url)
    answers = transform.lines(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
    results: list[np.ndarray | FHEServiceError] = []
    for line in tqdm(answers, desc=f"decrypt {model.name}", unit="row", disable=not progress):
        answer = transform.decode_answer(line)
        if isinstance(answer, dict):
            results.append(FHEServiceError(0, answer["code"], answer["message"]))
        else:
            results.append(model.decrypt(answer))
    return results
