"""Real model definitions (torchvision, timm) with random weights, for conformance suites over many models.

`ZOO` lists what to build; `build(spec)` returns the model in eval mode with random, non-trivial BatchNorm
statistics and affine parameters (so a fold is never the identity), `example_input()` a small batch.
Nothing is downloaded: every model is created with ``weights=None`` / ``pretrained=False``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

INPUT_SHAPE = (2, 3, 64, 64)


@dataclass(frozen=True)
class ZooModel:
    library: str  # "torchvision" | "timm"
    name: str
    has_batchnorm: bool = True
    note: str = ""

    @property
    def id(self) -> str:
        return f"{'tv' if self.library == 'torchvision' else 'timm'}-{self.name}"


ZOO: tuple[ZooModel, ...] = (
    ZooModel("torchvision", "resnet18"),
    ZooModel("torchvision", "mobilenet_v2"),
    ZooModel("torchvision", "mobilenet_v3_small"),
    ZooModel("torchvision", "efficientnet_b0"),
    ZooModel("torchvision", "regnet_x_400mf"),
    ZooModel("torchvision", "densenet121", note="BN -> ReLU -> conv: pre-activation BNs cannot fold"),
    ZooModel("torchvision", "shufflenet_v2_x0_5"),
    ZooModel("torchvision", "mnasnet0_5"),
    ZooModel("timm", "convnext_atto", has_batchnorm=False, note="LayerNorm only: zero folds, still exact"),
    ZooModel("timm", "repvgg_a0", note="BatchNormAct2d; identity-branch BNs have no conv next to them"),
    ZooModel("timm", "mobileone_s0", note="BatchNormAct2d; identity-branch BNs"),
    ZooModel("timm", "ghostnet_100", note="plain BatchNorm2d plus one BatchNormAct2d"),
    ZooModel("timm", "resnet18d", note="deep stem, avg-pool downsample"),
    ZooModel("timm", "resnet26t", note="tiered deep stem"),
    ZooModel("timm", "efficientnet_b0", note="BatchNormAct2d, traced into F.batch_norm"),
    ZooModel("timm", "regnetx_002", note="BatchNormAct2d"),
    ZooModel("timm", "fastvit_t8", note="MobileOne-style reparam blocks, RepMixer BNs"),
)

# Real models torch.fx cannot trace whole (data-dependent control flow in some blocks): transform() must fall
# back to rewriting their traceable submodules.
UNTRACEABLE: tuple[ZooModel, ...] = (
    ZooModel("timm", "mobilevitv2_050", note="MobileVitV2Block branches on the feature-map size"),
    ZooModel("timm", "efficientvit_m0", note="window attention branches on H == W == window; parent reads "
                                           "self.attn.resolution"),
)


def randomize_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm random running statistics and affine parameters (in place)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if not isinstance(m, nn.modules.batchnorm._BatchNorm):
                continue
            n = m.num_features
            if m.running_mean is not None:
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            if m.affine:
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.5)
    return model


def build(spec: ZooModel, seed: int = 0) -> nn.Module:
    """The model with random weights and random BN statistics, in eval mode."""
    torch.manual_seed(seed)
    if spec.library == "torchvision":
        import torchvision.models as tvm

        model = tvm.get_model(spec.name, weights=None)
    else:
        import timm

        model = timm.create_model(spec.name, pretrained=False)
    return randomize_batchnorm(model, seed).eval()


def example_input(seed: int = 1) -> torch.Tensor:
    return torch.randn(*INPUT_SHAPE, generator=torch.Generator().manual_seed(seed))
