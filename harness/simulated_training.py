"""concrete-ml's own training step, simulated in process (`fhe="simulate"`) over the client's schedule
(`client/training.py`): the reference for what a schedule of served steps learns. Not a bit-exact oracle
of served steps: concrete-ml compiles training circuits with a 1 % error probability per table lookup
(`SGDClassifier.training_p_error`), so FHE and its simulation agree in distribution, not bit for bit."""

from __future__ import annotations

from typing import Any

import numpy as np

from fhe_bento.client.training import Schedule


def simulated_weights(
    estimator: Any, x: np.ndarray, y: np.ndarray, schedule: Schedule, weights: np.ndarray, bias: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The dequantized (weights, bias) after `schedule.steps` simulated steps of `estimator`'s training
    circuit over the batches of `schedule`."""
    module = estimator.training_quantized_module
    _, _, q_weights, q_bias = module.quantize_input(None, None, weights, bias)
    for step in range(schedule.steps):
        rows = schedule.rows(step)
        batch_x = x[rows].reshape(1, schedule.batch_size, -1)
        batch_y = y[rows].reshape(1, schedule.batch_size, 1).astype(np.float64)
        q_x, q_y, _, _ = module.quantize_input(batch_x, batch_y, None, None)
        q_weights, q_bias = module.quantized_forward(q_x, q_y, q_weights, q_bias, fhe="simulate")
    out_weights, out_bias = module.dequantize_output(q_weights, q_bias)
    return np.asarray(out_weights), np.asarray(out_bias)
