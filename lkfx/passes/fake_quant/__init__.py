"""fake_quant: simulate int8 inference with quantize -> dequantize nodes (QAT and post-training calibration).

Work in progress: the FX frontend lives in `fx.py`, the ONNX frontend in `onnx.py`.
"""

from __future__ import annotations

from typing import Any

from lkfx.passes import Pass, PassContext, register_pass


@register_pass
class FakeQuant(Pass):
    name = "fake_quant"
    summary = "Insert fake-quant (QDQ) for int8: per-channel weights, calibrated activations; QAT on torch."
    options = {
        "method": "percentile",
        "percentile": 99.99,
        "bins": 2048,
        "search_start_scale": 0.0625,
        "search_end_scale": 1.0,
        "search_step": 0.001,
        "weight_bits": 8,
        "act_bits": 8,
        "act_symmetric": False,
        "placement": "tensorrt",
        "num_batches": 0,
        "qat": False,
    }
    exact = False
    uses_calib_data = True

    def run_fx(self, gm: Any, ctx: PassContext) -> Any:
        from lkfx.passes.fake_quant.fx import run_fx

        return run_fx(gm, ctx, self.config)

    def run_onnx(self, graph: Any, ctx: PassContext) -> None:
        from lkfx.passes.fake_quant.onnx import run_onnx

        run_onnx(graph, ctx, self.config)
