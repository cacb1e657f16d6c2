"""Long fuzz campaign: many random conv networks (tests/fuzz/netgen.py) through every exact pass chain on both
frontends, checked by the property of tests/fuzz/props.py (same outputs within tolerance, or refused with a
reason; no crash; the input untouched).

    nice -n 10 .venv/bin/python scripts/fuzz_campaign.py --count 5000 --out scripts/results/fuzz_campaign.json
    .venv/bin/python scripts/fuzz_campaign.py --start 1234 --count 1 -v     # replay one network (seed 1234)

Network i is `draw_net(RandomDraw(start + i))`: a failure's seed is its reproduction. Writes a JSON summary (every 100
networks, and at the end; SIGTERM / Ctrl-C stop it cleanly): per chain the networks checked, rewrites, refusals
(most common reasons), whole-call refusals, worst error, failures.
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import sys
import time
import traceback
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from fuzz.netgen import RandomDraw, draw_net  # noqa: E402
from fuzz.props import FX_CHAINS, ONNX_CHAINS, check_fx, check_onnx  # noqa: E402


def _reason_key(reason: str) -> str:
    """A refusal reason without the names and numbers that differ between networks."""
    return re.sub(r"'[^']*'|\[[^\]]*\]|\([^)]*\)|[\w.]*\d[\w.]*", "_", reason)[:140]


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _check_network(seed: int, args: argparse.Namespace, checks: list, stats: dict) -> None:
    from tqdm import tqdm

    net = draw_net(RandomDraw(seed), max_ops=args.max_ops)
    if args.verbose:
        print(net)
    for fe, name, chain, check in checks:
        s = stats[f"{fe}:{name}"]
        try:
            outcome = check(net, chain)
        except Exception as e:  # a property violation or a crash: the finding this campaign looks for
            text = f"{type(e).__name__}: {e}"
            s["networks"] += 1
            s["failures"].append({"seed": seed, "error": text[:2000], "network": str(net)})
            if args.verbose:
                traceback.print_exc()
            else:
                tqdm.write(f"FAIL seed {seed} {fe}:{name}: {text.splitlines()[0][:200]}")
            continue
        s["networks"] += 1
        s["rewritten"].update(outcome.rewritten)
        s["skipped"].update(outcome.skipped)
        s["refused"].update(_reason_key(r) for r in outcome.refused)
        s["reasons"].update(_reason_key(r) for r in outcome.reasons)
        s["refolded"] += outcome.refolded
        s["widened"] += outcome.widened
        if outcome.widened:
            s["widened_seeds"].append(seed)
        s["max_error"] = max(s["max_error"], outcome.error)


def _write(args: argparse.Namespace, stats: dict, done: int, elapsed: float) -> None:
    args.out.parent.mkdir(parents=True, exist_ok=True)
    summary = {"start": args.start, "networks": done, "max_ops": args.max_ops, "seconds": round(elapsed, 1),
               "chains": {k: {**s, "rewritten": dict(s["rewritten"]), "skipped": dict(s["skipped"]),
                              "refused": dict(s["refused"].most_common(10)),
                              "reasons": dict(s["reasons"].most_common(15))} for k, s in stats.items()}}
    args.out.write_text(json.dumps(summary, indent=2))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=1000, help="number of networks")
    ap.add_argument("--start", type=int, default=0, help="seed of the first network")
    ap.add_argument("--max-ops", type=int, default=8, help="ops per network at most")
    ap.add_argument("--out", type=Path, help="JSON summary to write")
    ap.add_argument("-v", "--verbose", action="store_true", help="print each network and each failure in full")
    args = ap.parse_args(argv)

    import torch
    from tqdm import tqdm

    torch.set_num_threads(1)
    checks = [("fx", name, chain, check_fx) for name, chain in FX_CHAINS.items()] + \
             [("onnx", name, chain, check_onnx) for name, chain in ONNX_CHAINS.items()]
    stats = {f"{fe}:{name}": {"networks": 0, "rewritten": Counter(), "skipped": Counter(), "refused": Counter(),
                              "reasons": Counter(), "refolded": 0, "widened": 0, "widened_seeds": [], "max_error": 0.0,
                              "failures": []}
             for fe, name, _, _ in checks}
    start, done = time.perf_counter(), 0
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        for seed in tqdm(range(args.start, args.start + args.count), desc="networks", unit="net",
                         disable=args.verbose):
            _check_network(seed, args, checks, stats)
            done += 1
            if args.out and done % 100 == 0:
                _write(args, stats, done, time.perf_counter() - start)
    except KeyboardInterrupt:
        print(f"stopped after {done} networks")
    elapsed = time.perf_counter() - start
    for key, s in stats.items():
        fails = len(s["failures"])
        print(f"{key:<42} networks {s['networks']:>6}  rewritten {dict(s['rewritten'])}  skipped {dict(s['skipped'])}"
              f"  refused {sum(s['refused'].values())}  refolded {s['refolded']}  widened {s['widened']}"
              f"  max error {s['max_error']:.2g}  failures {fails}")
    total = sum(len(s["failures"]) for s in stats.values())
    print(f"{done} networks x {len(checks)} chains in {elapsed:.0f} s: {total} failures")
    if args.out:
        _write(args, stats, done, elapsed)
    return 1 if total else 0


if __name__ == "__main__":
    raise SystemExit(main())
