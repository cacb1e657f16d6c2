"""End to end: a ConvNeXt becomes a RepLKNet-style large-kernel network, then is deployed as plain convs.

    python examples/convnext_to_replk.py [--model convnext_tiny] [--size 224] [--kernel 31] [--out DIR]

1. builds timm's ConvNeXt (random weights stand in for pretrained ones; the layer scales, which timm initialises
   to 1e-6, are set to 1 so that every block matters to the check);
2. `reparam_large_kernel` swaps every 7x7 depthwise conv for a 31x31 depthwise conv + BN in parallel with a 5x5
   one, `preserve` init: the swapped model, in eval mode, equals the original (this is where fine-tuning starts);
3. `merge_reparam` folds each block into one 31x31 depthwise conv with bias: the deploy form equals the train form;
4. exports the deploy form to ONNX and runs it in onnxruntime against PyTorch.
"""

from __future__ import annotations

import argparse
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import timm
import torch

import lkfx
from lkfx.compare import max_rel_error


def params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="convnext_tiny")
    ap.add_argument("--size", type=int, default=224, help="input height and width")
    ap.add_argument("--kernel", type=int, default=31, help="large kernel size")
    ap.add_argument("--out", type=Path, help="folder for the ONNX file (default: a temporary one)")
    args = ap.parse_args()

    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.fill_(1.0)
    x = torch.randn(1, 3, args.size, args.size)
    with torch.no_grad():
        ref = model(x)

    train_form, report = lkfx.transform(model, [("reparam_large_kernel", {"kernel_size": args.kernel})],
                                        example_inputs=(x,), check=True, return_report=True)
    swap = report["reparam_large_kernel"]
    print(f"reparam_large_kernel: {swap.rewritten} of {swap.matched} depthwise convs swapped, e.g. {swap.notes[0]}")
    print(f"  swapped model vs original (eval): max relative error {report.check['max_rel_error']:.2e}")

    deploy, report = lkfx.transform(train_form, ["merge_reparam"], example_inputs=(x,), check=True,
                                    return_report=True)
    print(f"merge_reparam: {report['merge_reparam'].rewritten} blocks merged into single "
          f"{args.kernel}x{args.kernel} depthwise convs")
    print(f"  deploy form vs train form: max relative error {report.check['max_rel_error']:.2e}")
    print(f"  parameters: original {params(model):,}, train form {params(train_form):,}, deploy {params(deploy):,}")

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.out or Path(tmp)
        path = folder / f"{args.model}_replk{args.kernel}.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(deploy, (x,), str(path), dynamo=False, input_names=["image"], output_names=["logits"])
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        (out,) = sess.run(None, {"image": x.numpy()})
        err = max_rel_error([ref.numpy()], [np.asarray(out)])
        print(f"onnxruntime ({path.name}, {path.stat().st_size / 2**20:.1f} MiB) vs the original PyTorch model: "
              f"max relative error {err:.2e}")
    if err > 1e-5:
        raise SystemExit(f"onnxruntime output differs: {err:.3g}")


if __name__ == "__main__":
    main()
