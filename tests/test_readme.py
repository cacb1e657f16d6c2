"""Every ```python block of the README runs (in a folder that holds a small `model.onnx`)."""

import re
from pathlib import Path

import onnx
import pytest
from onnx_models import conv_bn_chain

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_python_blocks():
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block_runs(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    onnx.save(conv_bn_chain(), "model.onnx")
    exec(compile(BLOCKS[index], f"README.md block {index}", "exec"), {})
