"""What a first-time user of the `lkfx` command meets: the default pipeline (no -p), --version, permission bits
of what it writes, a closed stdout, byte counts with external data, inspect's grouping, 'nothing to rewrite'."""

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx_models import conv_bn_chain, count

from lkfx.cli import DEPLOY, main
from lkfx.compare import max_rel_error
from lkfx.graph.onnx import run, save_atomic

TRAIN = Path(__file__).resolve().parent.parent / "examples" / "data" / "repvgg_digits_train.onnx"
DIGITS = TRAIN.parent / "digits.npz"


def lkfx(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lkfx", *args], capture_output=True, text=True, **kw)


def test_optimize_without_passes_gives_the_exact_deploy_form(tmp_path, capsys):
    """A train-form RepVGG / RepLKNet export (every branch with its BN) -> one conv per block, no BN, same outputs."""
    out, rep = tmp_path / "deploy.onnx", tmp_path / "r.json"
    assert main(["optimize", str(TRAIN), "-o", str(out), "--check", "--report", str(rep)]) == 0
    assert [p["name"] for p in json.loads(rep.read_text())["passes"]] == DEPLOY == ["merge_reparam", "fold_bn"]
    train, deploy = onnx.load(str(TRAIN)), onnx.load(str(out))
    assert count(train, "BatchNormalization") == 16 and count(train, "Conv") == 14
    # 6 blocks of parallel branches -> 6 convs, + the 2 pointwise convs whose BNs were folded; 2 residual adds left
    assert count(deploy, "BatchNormalization") == 0 and count(deploy, "Conv") == 8 and count(deploy, "Add") == 2
    x = (np.load(DIGITS)["x_test"][:64, None] / np.float32(16)).astype(np.float32)
    assert max_rel_error(run(train, {"x": x}), run(deploy, {"x": x})) <= 1e-5
    assert "merged" in capsys.readouterr().out


def test_version():
    from lkfx import __version__

    res = lkfx("--version")
    assert res.returncode == 0 and res.stdout.strip() == f"lkfx {__version__}"


def test_outputs_keep_the_input_permission_bits(tmp_path):
    src = tmp_path / "in.onnx"
    onnx.save(conv_bn_chain(), str(src))
    for mode in (0o640, 0o604):
        os.chmod(src, mode)
        out, rep = tmp_path / f"out{mode:o}.onnx", tmp_path / f"r{mode:o}.json"
        assert main(["optimize", str(src), "-o", str(out), "--report", str(rep), "-q"]) == 0
        assert stat.S_IMODE(out.stat().st_mode) == mode and stat.S_IMODE(rep.stat().st_mode) == mode


def test_save_atomic_gives_the_umask_default(tmp_path):
    old = os.umask(0o027)
    try:
        save_atomic(conv_bn_chain(), tmp_path / "m.onnx")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "m.onnx").stat().st_mode) == 0o640  # what open() gives, not a temp file's 0600


def test_closed_stdout_ends_quietly():
    """`lkfx passes --json | head -c 100`: the reader goes away before lkfx writes."""
    proc = subprocess.Popen([sys.executable, "-m", "lkfx", "passes", "--json"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait() in (0, 141) and err == ""
    res = subprocess.run(f"'{sys.executable}' -m lkfx passes --json | head -c 100", shell=True, capture_output=True,
                         text=True)
    assert len(res.stdout) == 100 and res.stderr == ""


def test_byte_counts_include_external_data_on_both_sides(tmp_path):
    src = tmp_path / "in.onnx"
    onnx.save(conv_bn_chain(c=16), str(src), save_as_external_data=True, location="in.onnx.data", size_threshold=0)
    size_in = src.stat().st_size + (tmp_path / "in.onnx.data").stat().st_size
    res = lkfx("optimize", str(src), "-o", str(tmp_path / "out.onnx"))
    assert res.returncode == 0, res.stderr
    size_out = (tmp_path / "out.onnx").stat().st_size
    assert f"({size_in:,} -> {size_out:,} bytes, model + external data)" in res.stdout


def test_inspect_groups_identical_reasons(tmp_path):
    src = tmp_path / "in.onnx"
    onnx.save(conv_bn_chain(n=5), str(src))
    grouped = lkfx("inspect", str(src), "-p", "lower_dwconv").stdout
    lines = [line for line in grouped.splitlines() if line.startswith("  [lower_dwconv]")]
    assert len(lines) == 1 and "5 skipped: not depthwise" in lines[0], grouped
    verbose = lkfx("inspect", str(src), "-p", "lower_dwconv", "-v").stdout
    assert sum(line.startswith("  [lower_dwconv] skipped conv") for line in verbose.splitlines()) == 5, verbose
    quiet = lkfx("inspect", str(src), "-p", "lower_dwconv", "-q").stdout
    assert "lower_dwconv" in quiet and "[lower_dwconv]" not in quiet and "skipped:" not in quiet


def test_nothing_to_rewrite_says_why(tmp_path):
    deployed = tmp_path / "deploy.onnx"
    assert main(["optimize", str(TRAIN), "-o", str(deployed), "-q"]) == 0
    res = lkfx("optimize", str(deployed), "-o", str(tmp_path / "again.onnx"))
    assert res.returncode == 0
    assert "nothing to rewrite: merge_reparam, fold_bn found no match" in res.stdout
    assert "no BatchNormalization node: already folded by the exporter?" in res.stdout


def test_a_missing_optional_package_is_a_usage_error(tmp_path):
    """With the [onnx] extra only, a pass that needs torch says which install gives it (exit 2, not a bug report)."""
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.zeros((4, 1, 8, 8), np.float32))
    code = ("import sys; sys.modules['torch'] = None; from lkfx.cli import main; "
            f"sys.exit(main(['optimize', {str(TRAIN)!r}, '-o', {str(tmp_path / 'q.onnx')!r}, '-p', 'fake_quant', "
            f"'--calib-data', {str(calib)!r}]))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 2 and not (tmp_path / "q.onnx").exists()
    assert res.stderr.strip() == ("lkfx: error: pass 'fake_quant' needs the Python package 'torch', which is not "
                                  "installed: pip install 'lkfx[torch]'")
