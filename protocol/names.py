"""Names and sizes both sides of the HTTP and SageMaker APIs agree on."""

from __future__ import annotations

OCTET_STREAM = "application/octet-stream"
KEY_ID_HEADER = "X-FHE-Key-Id"
CLIENT_SHA_HEADER = "X-FHE-Client-SHA256"
# On a 410 version_retired: the version that serves the model's name now.
CURRENT_VERSION_HEADER = "X-FHE-Current-Version"
TRAINING_STEP_HEADER = "X-FHE-Training-Step"  # the step of the weights a training session's route returns
# SageMaker forwards nothing but /invocations: the operation, model and key id travel in this header.
ATTRIBUTES_HEADER = "X-Amzn-SageMaker-Custom-Attributes"
MAX_ATTRIBUTES = 1024  # SageMaker's own cap on that header

MiB = 1024 * 1024
# Key uploads go in parts of this size (SageMaker real time takes 6 MB per request); the server's
# FHE_BENTO_MAX_PART_BYTES defaults to it.
PART_BYTES = 5 * MiB

DEMO_MODELS = ("breast-cancer-xgb:latest", "breast-cancer-logreg:latest", "tiny-gpt2:latest")
