"""Backends: what lkfx's rewrites run on (cost models, kernels, runtime glue). Modules here import their heavy
dependencies (torch, triton, tensorrt, onnxruntime) lazily."""
