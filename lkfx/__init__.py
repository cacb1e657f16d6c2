"""lkfx: compiler passes for convolutional networks, on torch.fx and ONNX.

    import lkfx
    model = lkfx.transform(model, ["fold_bn"])                     # nn.Module -> GraphModule
    proto = lkfx.transform("model.onnx", ["fold_bn"], check=True)  # ONNX -> onnx.ModelProto

Importing lkfx imports neither torch, onnx, onnxruntime, triton nor tensorrt; each is loaded when a pass needs it.
"""

from typing import Any

from lkfx.api import transform
from lkfx.errors import CheckError, LkfxError, PassError
from lkfx.passes import Pass, PassContext, list_passes, register_pass
from lkfx.report import PassReport, Report


def calibrate(model: Any, data: Any, *, method: str | None = None, num_batches: int = 0, **options: Any) -> Any:
    """Set the activation ranges of a fake-quant torch model (pass fake_quant) from calibration batches, in
    place; see `lkfx.quant.calibrate.calibrate`."""
    from lkfx.quant.calibrate import calibrate as run

    return run(model, data, method=method, num_batches=num_batches, **options)


def set_temperature(model: Any, tau: float) -> int:
    """Set the attention temperature of every KernelWarehouse conv in `model` (pass kernel_warehouse)."""
    from lkfx.modules.kernel_warehouse import set_temperature as set_tau

    return set_tau(model, tau)


__version__ = "0.1.0"
__all__ = [
    "CheckError",
    "LkfxError",
    "Pass",
    "PassContext",
    "PassError",
    "PassReport",
    "Report",
    "calibrate",
    "list_passes",
    "register_pass",
    "set_temperature",
    "transform",
]
