"""Quantization: integer grids and scales (`qparams`), range estimators (`observers`), calibration (`calibrate`),
QDQ export (`export`). The fake-quant modules live in `lkfx.modules.fake_quant`; the pass is `fake_quant`."""

from typing import Any


def freeze_bn(model: Any) -> int:
    """Freeze the BatchNorm statistics of every QAT conv + BN in `model` (see `lkfx.modules.fake_quant`)."""
    from lkfx.modules.fake_quant import freeze_bn as freeze

    return freeze(model)


def export_onnx(model: Any, example_inputs: Any, path: Any = None, **kwargs: Any) -> Any:
    """A fake-quant torch model as ONNX QDQ (see `lkfx.quant.export.export_onnx`)."""
    from lkfx.quant.export import export_onnx as export

    return export(model, example_inputs, path, **kwargs)
