import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("LKFX_CACHE_DIR", str(ROOT / ".pytest_cache" / "lkfx"))


@pytest.fixture
def python() -> str:
    return sys.executable

if os.environ.get("PYTEST_XDIST_WORKER"):
    # one xdist worker per core: torch's own thread pool would oversubscribe the CI machine's 2 cores
    import torch

    torch.set_num_threads(1)
