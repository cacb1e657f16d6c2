"""`export_onnx`: a fake-quant torch model as an ONNX QDQ model that onnxruntime and TensorRT run in int8.

``torch.onnx.export`` (dynamo) turns each fake-quant op into QuantizeLinear -> DequantizeLinear. What is computed
from constants — per-channel weight scales (``max|w| / 127``), weights with a QAT BatchNorm folded in — must
become constants too, or backends see a float weight computed at run time and keep that conv in float. The
exporter's optimizer folds only tensors up to 8192 elements; this runs it without that limit, so every weight
reaches the backend as ``QuantizeLinear(constant W) -> DequantizeLinear -> Conv``.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn as nn


def export_onnx(model: nn.Module, example_inputs: Any, path: str | os.PathLike | None = None, *,
                dynamic_batch: bool = True, opset: int = 18) -> Any:
    """Export `model` (in eval mode) to ONNX with QDQ nodes and constant-folded weights; returns the
    ``onnx.ModelProto`` and writes it to `path` when given. `dynamic_batch` leaves dimension 0 of every input free."""
    import onnxscript.optimizer

    args = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    dynamic = tuple({0: torch.export.Dim("batch")} for _ in args) if dynamic_batch else None
    was_training = model.training
    model.eval()
    try:
        program = torch.onnx.export(model, args, dynamo=True, opset_version=opset, optimize=False,
                                    dynamic_shapes=dynamic, verbose=False)
    finally:
        model.train(was_training)
    onnxscript.optimizer.optimize(program.model, input_size_limit=2**62, output_size_limit=2**62)
    proto = program.model_proto
    if path is not None:
        from lkfx.graph.onnx import save_atomic

        save_atomic(proto, path)
    return proto
