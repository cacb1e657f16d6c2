"""Tests that need an NVIDIA GPU: every test in this folder is marked ``cuda`` and skipped without one.

``make gpu-check`` runs them (``pytest -m cuda``) on a GPU machine; on a CPU-only machine (CI) they are collected
and skipped, so the suite stays green and says why."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

HERE = Path(__file__).parent


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run `make gpu-check` on a GPU machine)")
    for item in items:
        if HERE in Path(item.fspath).parents:
            item.add_marker(pytest.mark.cuda)
            if not torch.cuda.is_available():
                item.add_marker(skip)

