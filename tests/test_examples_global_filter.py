"""examples/global_filter.py runs end to end as a user would run it; so does the fft_conv benchmark's quick mode."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_global_filter_example():
    res = subprocess.run([sys.executable, str(ROOT / "examples" / "global_filter.py"), "--depth", "2"],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "wrong at every pixel" in res.stdout and "inside it" in res.stdout
    assert "2 global filters computed by FFT" in res.stdout
    assert "OK: the padded FFT equals direct conv" in res.stdout


def test_fft_conv_benchmark_quick(tmp_path):
    bench = ROOT / "benchmarks" / "fft_conv.py"
    res = subprocess.run([sys.executable, str(bench), "--quick", "--repeats", "1", "--threads", "1", "--out",
                          str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "lkfx <= 1.05x the fastest anchor on every row" in res.stdout and "at K=51" in res.stdout
    assert (tmp_path / "fft_conv.json").exists()
