"""Every ```python block of README.md and docs/*.md runs (in a folder that holds a small `model.onnx`).

A block that cannot run here (it needs a GPU, or files the reader has) is written as ```py instead: shown the same,
not run.
"""

import re
from pathlib import Path

import onnx
import pytest
from onnx_models import conv_bn_chain

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCKS = [(page.relative_to(ROOT).as_posix(), i, code)
          for page in PAGES
          for i, code in enumerate(re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S))]


def test_readme_has_python_blocks():
    assert sum(name == "README.md" for name, _, _ in BLOCKS) >= 2


@pytest.mark.parametrize("name, index, code", BLOCKS, ids=[f"{name}-{i}" for name, i, _ in BLOCKS])
def test_readme_block_runs(name, index, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    onnx.save(conv_bn_chain(), "model.onnx")
    exec(compile(code, f"{name} block {index}", "exec"), {})
