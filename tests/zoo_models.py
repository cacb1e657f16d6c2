"""The model subsets the conformance suites use, taken from `lkfx.zoo` (which builds them: random weights, random
BatchNorm statistics, eval mode, nothing downloaded).

Import as ``from zoo_models import ...``: pytest puts tests/ on sys.path, where tests/conftest.py lives.
"""

from __future__ import annotations

from lkfx.zoo import MODELS, ZooModel, build, example_input, export_onnx, get, randomize_batchnorm

__all__ = ["FOLD_BN", "REPARAM", "UNTRACEABLE", "ZooModel", "build", "example_input", "export_onnx",
           "randomize_batchnorm"]

# fold_bn conformance: its independent classifier runs on these (the full zoo runs them all: python -m lkfx.zoo)
FOLD_BN: tuple[ZooModel, ...] = tuple(get(i) for i in (
    "tv-resnet18", "tv-mobilenet_v2", "tv-mobilenet_v3_small", "tv-efficientnet_b0", "tv-regnet_x_400mf",
    "tv-densenet121", "tv-shufflenet_v2_x0_5", "tv-mnasnet0_5", "timm-convnext_atto", "timm-repvgg_a0",
    "timm-mobileone_s0", "timm-ghostnet_100", "timm-resnet18d", "timm-resnet26t", "timm-efficientnet_b0",
    "timm-regnetx_002", "timm-fastvit_t8",
))
# Real models torch.fx cannot trace whole (data-dependent control flow in some blocks): transform() must fall
# back to rewriting their traceable submodules.
UNTRACEABLE: tuple[ZooModel, ...] = tuple(m for m in MODELS if not m.traceable)
# timm's reparameterisable models: merge_reparam must reach timm's own deploy form.
REPARAM: tuple[ZooModel, ...] = tuple(get(i) for i in (
    "timm-repvgg_a0", "timm-mobileone_s0", "timm-fastvit_t8", "timm-repvit_m1"))
