"""`make gpu-check`: everything lkfx promises on an NVIDIA GPU, checked in one command of at most 8 minutes.

    python3 scripts/gpu_check.py [--out DIR] [--wheels DIR] [--budget SECONDS] [--dry-run]

Made for a GPU machine whose Python already has torch, triton, onnx, onnxruntime, torchvision, matplotlib and
pytest, and that cannot download anything. In order:

1. Refuse at once (exit 2, one line) where torch sees no CUDA GPU, or torch is missing.
2. Install what is missing from the wheels folder (default ``.whl``, filled here by ``make gpu-wheels``; pure-Python
   packages such as onnx-graphsurgeon) into a temporary folder put on ``PYTHONPATH``, and lkfx itself
   (``pip install --no-deps --no-build-isolation -e .``, so that ``torch.compile(backend="lkfx")`` finds its entry
   point). ``--dry-run`` prints these commands and runs nothing else (works without a GPU).
3. ``pytest -m cuda tests/cuda``: the Triton kernels against float64 / cuDNN in fp32 / fp16 / bf16, FFTConv2d on
   cuFFT, ``backend="lkfx"`` eval, fp16 autocast and training against eager.
4. ``benchmarks/dwconv_gpu.py --quick`` and ``benchmarks/compile.py --device cuda --quick``.
5. A summary: PASS / FAIL per test file and per benchmark goal, written to ``DIR/summary.json``.

Every result lands flat in ``--out`` (default ``$OUT``, else ``gpu-check/``): gpu_check.log (every step's output),
junit.xml, dwconv_gpu.json, dwconv_gpu.png, compile.json, summary.json. Each step gets a share of ``--budget``
(default 470 s) and is stopped when it runs out (reported as FAIL: timed out). Exit 0 when every check passed,
1 when one failed, 2 on bad usage or no GPU.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# import name -> pip name, for what the CUDA tests and the two benchmarks import beyond torch and triton
NEEDED = {"numpy": "numpy", "tqdm": "tqdm", "networkx": "networkx", "onnx": "onnx",
          "onnx_graphsurgeon": "onnx-graphsurgeon", "torchvision": "torchvision", "matplotlib": "matplotlib",
          "pytest": "pytest", "triton": "triton"}
# seconds each step may take at most, as shares of the budget (the install takes what it takes, at most 60 s)
SHARES = {"pytest": 0.45, "dwconv_gpu": 0.25, "compile": 0.30}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "gpu-check"),
                    help="folder for every result (default: $OUT, else gpu-check/)")
    ap.add_argument("--wheels", type=Path, default=ROOT / ".whl", help="folder of wheels to install from (.whl)")
    ap.add_argument("--budget", type=float, default=470.0, help="seconds for the whole check (default 470)")
    ap.add_argument("--dry-run", action="store_true", help="print the install commands and stop")
    args = ap.parse_args(argv)
    if args.budget < 60:
        ap.error(f"--budget {args.budget:g} is too short: the check needs at least 60 seconds")
    return args


def missing_modules() -> list[str]:
    return [name for name in NEEDED if importlib.util.find_spec(name) is None]


def install_commands(missing: list[str], wheels: Path, site: Path) -> tuple[list[list[str]], list[str]]:
    """(pip commands, problems): one pip install of the missing packages' wheels into `site`, one of lkfx."""
    files, problems = [], []
    for name in missing:
        stem = NEEDED[name].replace("-", "_")
        found = sorted(wheels.glob(f"{stem}-*.whl")) if wheels.is_dir() else []
        if found:
            files.append(str(found[-1]))
        else:
            problems.append(f"{NEEDED[name]} is not installed and no wheel of it is in {wheels} "
                            f"(run `make gpu-wheels` where pip can download, and carry {wheels.name})")
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-cache-dir"]
    commands = [[*pip, "--target", str(site), *files]] if files else []
    commands.append([*pip, "--no-build-isolation", "-e", str(ROOT)])
    return commands, problems


class Log:
    """Every step's output, appended to one file, and the time left."""

    def __init__(self, path: Path, budget: float):
        self.path, self.deadline = path, time.monotonic() + budget
        path.write_text("")

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def run(self, title: str, cmd: list[str], limit: float, env: dict) -> tuple[int | None, str]:
        """(exit status or None when stopped at `limit` seconds, the output)."""
        limit = max(1.0, min(limit, self.left()))
        print(f"-- {title} (at most {limit:.0f} s)", flush=True)
        start = time.monotonic()
        try:
            done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=limit)
            rc, text = done.returncode, done.stdout + done.stderr
        except subprocess.TimeoutExpired as stopped:
            rc = None
            text = "".join(b.decode(errors="replace") if isinstance(b, bytes) else (b or "")
                           for b in (stopped.stdout, stopped.stderr)) + f"\n[stopped after {limit:.0f} s]\n"
        with self.path.open("a") as f:
            f.write(f"\n===== {title} ({time.monotonic() - start:.1f} s, exit {rc}) =====\n$ {' '.join(cmd)}\n{text}")
        return rc, text


def pytest_results(junit: Path) -> list[tuple[str, bool, str]]:
    """(test file, passed, detail) per file of the JUnit report."""
    if not junit.exists():
        return []
    files: dict[str, list[int]] = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        name = case.get("classname", "?").rsplit(".", 1)[-1]
        counts = files.setdefault(name, [0, 0, 0])
        if case.find("failure") is not None or case.find("error") is not None:
            counts[1] += 1
        elif case.find("skipped") is not None:
            counts[2] += 1
        else:
            counts[0] += 1
    return [(f"tests/cuda/{name}.py", failed == 0 and passed > 0,
             f"{passed} passed, {failed} failed, {skipped} skipped")
            for name, (passed, failed, skipped) in sorted(files.items())]


def benchmark_goals(path: Path) -> list[tuple[str, bool]]:
    """The goals a benchmark's JSON records: {goal: met} or [{"goal": ..., "passed": ...}]."""
    if not path.exists():
        return []
    goals = json.loads(path.read_text()).get("goals", [])
    if isinstance(goals, dict):
        return [(str(g), bool(ok)) for g, ok in goals.items()]
    return [(str(g.get("goal")), bool(g.get("passed"))) for g in goals]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    site = Path(tempfile.gettempdir()) / "lkfx-gpu-site"
    commands, problems = install_commands(missing_modules(), args.wheels, site)
    if args.dry_run:
        for cmd in commands:
            print("would run:", " ".join(cmd))
        for problem in problems:
            print("missing:", problem)
        return 0
    if importlib.util.find_spec("torch") is None:
        print(f"gpu-check: no PyTorch in {sys.executable}; run it with the Python that has torch with CUDA",
              file=sys.stderr)
        return 2
    import torch

    if not torch.cuda.is_available():
        print(f"gpu-check: no CUDA GPU here (torch {torch.__version__}: torch.cuda.is_available() is False); "
              "run it on a machine with an NVIDIA GPU", file=sys.stderr)
        return 2

    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    log = Log(out / "gpu_check.log", args.budget)
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join(
        p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p))
    device = torch.cuda.get_device_name(0)
    print(f"gpu-check on {device}, torch {torch.__version__}, python {sys.version.split()[0]}; results in {out}")
    checks: list[tuple[str, bool, str]] = [(f"install: {p}", False, "") for p in problems]
    for cmd in commands:
        rc, text = log.run("install", cmd, 60, env)
        checks.append((f"install {cmd[-1]}", rc == 0, text.strip().splitlines()[-1] if rc else ""))

    budget = log.left()
    junit = out / "junit.xml"
    rc, _ = log.run("pytest -m cuda", [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-rfE", "-p",
                                       "no:cacheprovider", f"--junitxml={junit}", "tests/cuda"],
                    SHARES["pytest"] * budget, env)
    files = pytest_results(junit)
    checks += files if rc is not None else [*files, ("CUDA tests", False, "timed out")]
    if rc not in (0, None) and not files:
        checks.append(("CUDA tests", False, f"pytest exited {rc} (see gpu_check.log)"))

    benches = {"dwconv_gpu": [sys.executable, "benchmarks/dwconv_gpu.py", "--quick", "--out", str(out)],
               "compile": [sys.executable, "benchmarks/compile.py", "--device", "cuda", "--quick", "--out",
                           str(out / "compile.json")]}
    for i, (name, cmd) in enumerate(benches.items()):
        share = SHARES[name] / sum(list(SHARES.values())[1 + i:])
        rc, _ = log.run(name, cmd, share * log.left(), env)
        goals = benchmark_goals(out / f"{name}.json")
        checks += [(f"{name}: {goal}", ok, "") for goal, ok in goals]
        if rc != 0 or not goals:
            checks.append((f"{name} ran", False, "timed out" if rc is None else f"exit {rc} (see gpu_check.log)"))

    summary = {"device": device, "torch": torch.__version__, "seconds": round(args.budget - log.left(), 1),
               "checks": [{"check": c, "passed": ok, "detail": d} for c, ok, d in checks]}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"\ngpu-check summary ({device}, {summary['seconds']:.0f} s):")
    for check, ok, detail in checks:
        print(f"{'PASS' if ok else 'FAIL'}: {check}{f' ({detail})' if detail else ''}")
    return 0 if checks and all(ok for _, ok, _ in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
