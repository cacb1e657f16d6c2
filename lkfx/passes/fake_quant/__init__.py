"""fake_quant: simulate int8 inference with quantize -> dequantize (QDQ) nodes, for post-training calibration
and quantization-aware training.

Weights: symmetric per output channel (``weight_bits``; ``per_channel=False``: one scale per tensor). Activations:
per tensor, asymmetric unless ``act_symmetric`` (``act_bits``), at the points ``placement`` names (``tensorrt``:
inputs of conv / linear / matmul and the skip input of residual adds, by one rule for both frontends,
`lkfx.quant.placement`; ``ort``: layer and add inputs and outputs; the report says what each means for the
runtime). Ranges come from calibration batches with ``method`` (`lkfx.quant.observers`: minmax (alias max), ema,
percentile, kl (alias entropy), symmetric_kl, js, mse; histogram searches set by ``bins``, ``search_start_scale``,
``search_end_scale``, ``search_step`` and guarded against ranges that clip a share of the data; ``num_batches`` = 0
uses all; ``batch_size`` > 0 re-cuts all samples into batches of that size). ``exclude``: node names and op types
(a list or a ';'-separated string) left float. ``fallback="auto"``: after calibration, the layers that hurt the
output most are kept in float until ``||y_int8 - y|| / ||y||`` over the calibration batches is at most
``fallback_bound``, and listed in the report. The math of quantization and of the QAT BatchNorm fold is in
`lkfx.modules.fake_quant`.

torch.fx (`fx.py`): fake-quant modules in the graph; ``qat=True`` fuses conv + BN for training (torch only; refused
on ONNX).
The model exports with ``torch.onnx.export`` to QuantizeLinear / DequantizeLinear pairs.
ONNX (`onnx.py`): QDQ nodes inserted into the float model, calibrated with onnxruntime on ``--calib-data``.
Where the frontends still differ: ONNX quantizes only Conv / Gemm / MatMul with a constant weight (not
ConvTranspose, nor a MatMul of two activations, whose inputs torch.fx quantizes); ``ort`` on ONNX also quantizes
Mul, Concat and the pools (MaxPool and reshapes keep their input's grid) and stores biases as int32 (torch.fx keeps
them float), but leaves graph outputs float (torch.fx quantizes a last layer's output too).

Error bound for ``check=True`` / ``--check``: max |int8 - float| / max |float| over the outputs <= 0.25 (0.5 when
a bit width is below 8), with the first calibration batch as the ONNX check's input (random inputs fall outside
the calibrated ranges and mean nothing). A sanity bound that catches a broken quantization (a wrong scale or
zero point gives ~1), not an accuracy figure: on the digits CNN, 8-bit methods reach 0.01-0.14; 4-bit weights
0.27-0.40. Measure accuracy on your own data (or bound the error with ``fallback="auto"``).
"""

from __future__ import annotations

from typing import Any

from lkfx.passes import Pass, PassContext, register_pass


@register_pass
class FakeQuant(Pass):
    name = "fake_quant"
    summary = ("Insert fake-quant (QDQ) for int8: per-channel weights, calibrated activations; QAT on torch. "
               "Methods: minmax (alias max), ema, percentile, kl (alias entropy), symmetric_kl, js, mse.")
    options = {
        "method": "percentile",
        "percentile": 99.99,
        "bins": 2048,
        "search_start_scale": 0.0625,
        "search_end_scale": 1.0,
        "search_step": 0.005,
        "weight_bits": 8,
        "act_bits": 8,
        "act_symmetric": False,
        "placement": "tensorrt",
        "num_batches": 0,
        "batch_size": 0,
        "per_channel": True,
        "exclude": "",
        "fallback": "none",
        "fallback_bound": 0.05,
        "qat": False,
    }
    exact = False
    uses_calib_data = True
    module_fallback = False  # calibration needs the whole model

    @property
    def tolerance(self) -> float:  # type: ignore[override]
        return 0.25 if min(self.config["weight_bits"], self.config["act_bits"]) >= 8 else 0.5

    def fx_leaf_modules(self, model: Any) -> tuple[type, ...]:
        from lkfx.modules.fake_quant import ConvBnFakeQuant, FakeQuant, WeightFakeQuant

        return (FakeQuant, WeightFakeQuant, ConvBnFakeQuant)

    def run_fx(self, gm: Any, ctx: PassContext) -> Any:
        from lkfx.passes.fake_quant.fx import run_fx

        return run_fx(gm, ctx, self._config())

    def run_onnx(self, graph: Any, ctx: PassContext) -> None:
        from lkfx.passes.fake_quant.onnx import run_onnx

        run_onnx(graph, ctx, self._config())

    def _config(self) -> dict[str, Any]:
        """The options, `exclude` as a list (given as a list or a ';'-separated string)."""
        value = self.config["exclude"]
        items = value.split(";") if isinstance(value, str) else list(value)
        return {**self.config, "exclude": [str(i).strip() for i in items if str(i).strip()]}
