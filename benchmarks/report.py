"""One benchmark report: run every benchmark in benchmarks/, then write BENCHMARKS.md from their results JSON.

    python benchmarks/report.py [--quick] [--no-run] [--out BENCHMARKS.md]     (make bench [QUICK=1])

Every ``benchmarks/*.py`` but this file is a benchmark writing ``benchmarks/results/<name>.json`` on its full
run. Full mode runs each in turn (a benchmark this machine cannot run, e.g. dwconv_gpu.py without CUDA, is listed
as skipped with the reason); ``--quick`` runs each with ``--quick`` as a smoke test, which writes no results, so
the tables then come from the last full runs; ``--no-run`` only writes the report. BENCHMARKS.md gets the machine,
the date, what ran, and for each benchmark its table and a figure drawn here from its JSON: the measurements
on the left and, on the right, lkfx's ratio against its anchor from the same run. A JSON this file has no
renderer for yet is shown as a table of its ``rows``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
HERE = ROOT / "benchmarks"
RESULTS = HERE / "results"
# Benchmarks other issues are adding: listed as skipped until their script exists.
EXPECTED = ("compile", "dwconv_gpu", "quant")


def _no_cuda() -> str | None:
    import torch

    return None if torch.cuda.is_available() else "needs a CUDA GPU (torch.cuda.is_available() is False here)"


# name -> a check returning why this machine cannot run the benchmark, or None
REQUIRES: dict[str, Callable[[], str | None]] = {"dwconv_gpu": _no_cuda}


@dataclass
class Section:
    """What one benchmark contributes: its table (Markdown lines) and a figure drawn from the same JSON."""

    title: str
    anchor: str
    lines: list[str]
    draw: Callable[[Any, Any], None] | None = None  # draw(left_axes, right_axes)
    notes: list[str] = field(default_factory=list)


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    align = ["---" if i == 0 else "---:" for i in range(len(header))]
    return [f"| {' | '.join(header)} |", f"| {' | '.join(align)} |", *[f"| {' | '.join(r)} |" for r in rows]]


def _ms(seconds: float | None) -> str:
    """A time given in seconds, written in milliseconds ("" when absent)."""
    if seconds is None:
        return ""
    ms = seconds * 1e3
    return f"{ms:.0f} ms" if ms >= 100 else f"{ms:.3g} ms"


# --- one renderer per benchmark ----------------------------------------------------------------------------
def fold_bn_onnx(data: dict) -> Section:
    sec, tools = data["seconds"], list(data["seconds"])
    sizes = [str(n) for n in data["sizes"]]
    anchor = "onnxscript rewriter"
    rows = [[n, *(f"{sec[t][n]:.3f} s" if n in sec[t] else "-" for t in tools),
             f"{sec['lkfx'][n] / sec[anchor][n]:.2f}x"] for n in sizes]
    lines = _md_table(["N", *tools, f"lkfx / {anchor}"], rows)
    lines += ["", "Goals: " + "; ".join(f"{k} = {v:.2f}" for k, v in data.get("goals", {}).items())]

    def draw(left, right) -> None:
        for t in tools:
            ns = [int(n) for n in sizes if n in sec[t]]
            left.plot(ns, [sec[t][str(n)] for n in ns], marker="o", label=t)
            if t != "lkfx":
                right.plot(ns, [sec["lkfx"][str(n)] / sec[t][str(n)] for n in ns], marker="o", label=f"vs {t}")
        left.set(xscale="log", yscale="log", xlabel="blocks N", ylabel="seconds, load to save")
        right.axhline(0.6, color="red", ls=":", lw=1, label="goal vs onnxscript (0.6)")
        right.set(xscale="log", yscale="log", xlabel="blocks N", ylabel="lkfx time / anchor time (< 1: lkfx faster)")

    return Section("fold_bn on ONNX (`benchmarks/fold_bn_onnx.py`)", anchor, lines, draw,
                   [f"Chain of N x (Conv 3x3 -> BatchNormalization -> Relu); load, fold, save in one process; median "
                    f"of {data['repeats']}."])


FFT_COLUMNS = ("NCHW", "channels-last", "channels-last + conversion", "onnxruntime", "inductor", "bare FFT",
               "FFT (lkfx's)", "lkfx", "lkfx channels-last")


def fft_conv(data: dict) -> Section:
    rows = data["rows"]
    table = []
    for r in rows:
        s = r["seconds"]
        choice = r["decision"].split(" -> ")[1].split(":")[0]
        table.append([str(r["batch"]), str(r["channels"]), f"{r['map']}x{r['map']}", str(r["kernel"]),
                      *(_ms(s.get(c)) for c in FFT_COLUMNS), choice, r["anchor"], f"{r['ratio']:.2f}x"])
    lines = _md_table(["batch", "C", "map", "K", *FFT_COLUMNS, "lkfx's choice (NCHW in)", "fastest anchor",
                       "lkfx / anchor"], table)
    lines += ["", *[f"- {'met' if g['met'] else 'NOT met'}: {text} ({g['value']})"
                    for text, g in data.get("goals", {}).items()]]
    series = sorted({(r["batch"], r["channels"], r["map"]) for r in rows}, key=lambda s: (s[0], -s[2], s[1]))

    def draw(left, right) -> None:
        for i, (b, c, h) in enumerate(series):
            pts = sorted((r for r in rows if (r["batch"], r["channels"], r["map"]) == (b, c, h)),
                         key=lambda r: r["kernel"])
            ks, color, label = [r["kernel"] for r in pts], f"C{i % 10}", f"b{b} C={c}, {h}x{h}"
            left.plot(ks, [r["seconds"][r["anchor"]] * 1e3 for r in pts], "x--", color=color, alpha=0.6)
            left.plot(ks, [min(r["seconds"]["lkfx"], r["seconds"]["lkfx channels-last"]) * 1e3 for r in pts],
                      "o-", color=color, label=label)
            right.plot(ks, [r["ratio"] for r in pts], "o", color=color, label=label)
        left.set(yscale="log", xlabel="kernel K", ylabel="ms (o- lkfx, x-- fastest anchor)")
        right.axhline(1.05, color="red", ls=":", lw=1, label="goal: <= 1.05")
        right.set(yscale="log", xlabel="kernel K", ylabel="lkfx time / fastest anchor time")

    return Section("Large depthwise convs on CPU (`benchmarks/fft_conv.py`)",
                   "the fastest of NCHW, channels-last (with and without conversion), onnxruntime, inductor",
                   lines, draw,
                   [f"Depthwise 'same' convs, one thread, {data['statistic']} of {data['repeats']} interleaved "
                    "rounds; lkfx: the faster of its NCHW-in and channels-last-in columns; inductor on the RepLKNet "
                    "and K=51 rows only."])


def reparam(data: dict) -> Section:
    batches = list(data["torch_ms"])
    onnx = data["onnx"]
    forms = [("train form", "train", "train form"), ("deploy form", "deploy", "fold_bn + merge_reparam")]
    rows = []
    for label, key, onnx_key in forms:
        rows.append([label, f"{data['parameters'][key]:,}", *(f"{data['torch_ms'][b][key]:.0f} ms" for b in batches),
                     f"{onnx[onnx_key]['bytes'] / 2**20:.1f} MiB",
                     *(f"{onnx[onnx_key]['ort_ms'][b]:.0f} ms" for b in batches)])
    header = ["", "parameters", *(f"PyTorch batch {b}" for b in batches), "ONNX file",
              *(f"onnxruntime batch {b}" for b in batches)]
    lines = _md_table(header, rows)
    lines += ["", f"{data['merged_blocks']} blocks merged, {data['folded_bn']} BNs folded; deploy vs train max "
              f"relative error {data['deploy_vs_train_max_rel_error']:.1e} (PyTorch), "
              f"{data['onnx_deploy_vs_train_max_rel_error']:.1e} (onnxruntime)."]
    labels = [*(f"torch b{b}" for b in batches), *(f"ort b{b}" for b in batches)]
    train = [*(data["torch_ms"][b]["train"] for b in batches), *(onnx["train form"]["ort_ms"][b] for b in batches)]
    deploy = [*(data["torch_ms"][b]["deploy"] for b in batches),
              *(onnx["fold_bn + merge_reparam"]["ort_ms"][b] for b in batches)]

    def draw(left, right) -> None:
        xs = range(len(labels))
        left.bar([x - 0.2 for x in xs], train, 0.4, label="train form (anchor)")
        left.bar([x + 0.2 for x in xs], deploy, 0.4, label="deploy form (lkfx)")
        left.set(xticks=list(xs), xticklabels=labels, yscale="log", ylabel="ms")
        right.bar(list(xs), [d / t for d, t in zip(deploy, train, strict=True)], 0.5, label="deploy / train")
        right.set(xticks=list(xs), xticklabels=labels, ylabel="deploy time / train time (< 1: faster)")

    net = data["network"]
    note = (f"RepLKNet-shaped network, channels {net['channels']}, blocks {net['blocks']}, kernels {net['kernels']}, "
            f"{net['size']}x{net['size']}; median of {data['repeats']}.")
    return Section("Large-kernel reparameterisation (`benchmarks/reparam.py`)", "the train form (all branches)",
                   lines, draw, [note])


KW_COLUMNS = ("static", "static channels-last", "static + fold_bn", "static + fold_bn channels-last", "grouped",
              "grouped channels-last", "lkfx convs", "lkfx convs channels-last", "lkfx", "lkfx channels-last")


def kernel_warehouse(data: dict) -> Section:
    meta, counts, latency = data["meta"], data["params"], data["latency"]
    lines = _md_table(["model", "form", "parameters", "paper", "vs paper", "static"],
                      [[c["model"], f"KW({c['budget']:g}x)", f"{c['params'] / 1e6:.2f} M", f"{c['paper_m']:.2f} M",
                        f"{c['vs_paper']:+.2%}", f"{c['static_params'] / 1e6:.2f} M"] for c in counts])
    def row(r: dict) -> list[str]:
        s = r["seconds"]
        return [r["model"], str(r["batch"]), *(_ms(s[k]) for k in KW_COLUMNS),
                f"{r['lkfx_vs_grouped']:.2f}x ({r['lkfx']} / {r['anchor']})", f"{r['convs_vs_grouped']:.2f}x",
                _ms(s["assembly"]),
                f"{r['bound_vs_grouped']:.2f}x", f"{r['max_rel_error_vs_grouped']:.1e}",
                f"{r['fold_bn_rel_error_vs_grouped']:.1e}"]

    lines += ["", *_md_table(["model (KW 1x)", "batch", *KW_COLUMNS, "lkfx / anchor (faster layouts)",
                              "lkfx convs / anchor", "kernel assembly",
                              "bound: (assembly + static + fold_bn) / anchor", "max rel. error (convs)",
                              "(with fold_bn)"],
                             [row(r) for r in latency]), ""]
    lines += [f"- {'met' if met else 'NOT met'}: {text}" for text, met in data["goals"].items()]
    models = list(dict.fromkeys(c["model"] for c in counts))

    def draw(left, right) -> None:
        for i, m in enumerate(models):
            pts = [c for c in counts if c["model"] == m]
            left.plot([c["budget"] for c in pts], [c["params"] / 1e6 for c in pts], "o-", color=f"C{i}", label=m)
            left.plot([c["budget"] for c in pts], [c["paper_m"] for c in pts], "x", color=f"C{i}")
        left.set(xscale="log", yscale="log", xlabel="budget b", ylabel="parameters, M (x: paper)")
        names = list(dict.fromkeys(r["model"] for r in latency))
        for j, batch in enumerate((1, 8)):
            rs = [next(r for r in latency if r["model"] == n and r["batch"] == batch) for n in names]
            right.bar([k + 0.4 * j for k in range(len(names))], [r["lkfx_vs_grouped"] for r in rs], 0.4,
                      label=f"batch {batch}")
        right.axhline(1, color="gray", lw=1)
        right.set(xticks=[k + 0.2 for k in range(len(names))], ylabel="lkfx / grouped-conv latency (faster layouts)")
        right.set_xticklabels(names)

    return Section("KernelWarehouse (`benchmarks/kernel_warehouse.py`)", "the official code's grouped conv", lines,
                   draw, [f"{meta['size']}x{meta['size']}, {meta['threads']} thread, flush-denormal, fastest of at "
                          f"least {meta['repeats']} rounds ({meta.get('budget_s', 0):g} s a row), {meta['machine']}; "
                          f"{meta['note']}."])


def quant(data: dict) -> Section:
    anchor = "quantize_static MinMax"
    lines = []
    tables = [("digits CNN", data["digits"]), ("MobileNetV1-like, ReLU6, 32x32", data.get("mobilenet_relu6")),
              ("31x31 large-kernel net, 32x32", data.get("large_kernel_31x31")),
              (f"ResNet-18, {data['resnet_size']}px", data["resnet18"])]
    for model, entries in [(m, e) for m, e in tables if e]:
        acc = "accuracy" in entries["fp32"]
        rows = [[name, *([f"{e['accuracy']:.2f} %"] if acc else []), f"{e['latency_ms']:.2f} ms",
                 f"{e['size_bytes'] / 1024:.0f} KiB", f"{e['quantize_seconds']:.2f} s",
                 f"{e['latency_ms'] / entries[anchor]['latency_ms']:.2f}x"] for name, e in entries.items()]
        lines += [f"**{model}**", "", *_md_table(["model", *(["accuracy"] if acc else []), "latency", "size",
                                                  "quantize time", f"latency / {anchor}"], rows), ""]
    lines += [f"- {'met' if g['met'] else 'NOT met'}: {text} ({_cell(g['value'])})"
              for text, g in data["goals"].items()]
    digits = data["digits"]

    def draw(left, right) -> None:
        names = list(digits)
        left.bar(range(len(names)), [digits[n]["accuracy"] for n in names],
                 color=["C0" if n.startswith("lkfx") else "C1" if n.startswith("quantize") else "gray" for n in names])
        left.set(xticks=range(len(names)), ylabel="digits test accuracy, %",
                 ylim=(min(digits[n]["accuracy"] for n in names) - 2, 100))
        left.set_xticklabels(names, rotation=60, ha="right", fontsize=7)
        lk = [n for n in names if n.startswith("lkfx")]
        for offset, (model, entries) in zip((-0.2, 0.2), (("digits", digits), ("resnet18", data["resnet18"])),
                                            strict=True):
            pts = [i for i, n in enumerate(lk) if n in entries]
            right.bar([i + offset for i in pts], [entries[lk[i]]["latency_ms"] / entries[anchor]["latency_ms"]
                                                  for i in pts], 0.4, label=model)
        right.set(xticks=range(len(lk)), ylabel=f"latency / {anchor} latency")
        right.set_xticklabels(lk, rotation=60, ha="right", fontsize=7)

    quick = " This is a `--quick` run." if data.get("quick") else ""
    return Section("Post-training int8 on ONNX (`benchmarks/quant.py`)", f"onnxruntime {anchor}", lines, draw,
                   [f"Calibration: {data['calibration']}; {data['threads']} thread(s), {data['runs']} rounds.{quick}"])


COMPILE_COLUMNS = ("eager", "eager channels-last", "eager lkfx.transform", "inductor", "inductor + freezing", "lkfx",
                   "onnxruntime", "inductor + freezing, large convs removed")


SPEEDUPS = ("lkfx / inductor + freezing speedup", "eager lkfx / eager channels-last speedup",
            "bound: inductor + freezing / large convs removed")


def compile_(data: dict) -> Section:
    """torch.compile backends and eager layouts per network and batch, lkfx against the fastest anchor."""
    rows = [[r["network"], str(r["batch"]), *(_ms(_seconds(r.get(f"{t} ms"))) for t in COMPILE_COLUMNS),
             r.get("anchor", ""), *(f"{r[k]:.2f}x" if k in r else "" for k in SPEEDUPS)] for r in data["rows"]]
    lines = _md_table(["network", "batch", *COMPILE_COLUMNS, "fastest anchor", "lkfx speed-up over inductor + freezing",
                       "eager lkfx speed-up over eager channels-last",
                       "bound: the most any large-conv lowering can gain over inductor + freezing"], rows)
    goals = [f"- goal {'met' if g['met'] else 'NOT met'}: {goal} ({g['value']})"
             for goal, g in data.get("goals", {}).items() if isinstance(g, dict)]
    return Section("torch.compile backend and eager layouts (`benchmarks/compile.py`)",
                   "inductor + freezing; eager channels-last", lines, None,
                   [f"{data['size']}x{data['size']} inputs, fastest of {data['repeats']} interleaved rounds, device "
                    f"{data['device']}.", "", *goals])


def _seconds(ms: float | None) -> float | None:
    """compile.json stores milliseconds (keys ending in " ms")."""
    return None if ms is None else ms / 1e3


def generic(name: str, data: dict) -> Section:
    """A benchmark this file has no renderer for: its ``rows`` (flat dicts) as a table, no figure."""
    rows = data.get("rows") if isinstance(data, dict) else None
    if not (isinstance(rows, list) and rows and all(isinstance(r, dict) for r in rows)):
        return Section(f"`benchmarks/{name}.py`", "?", [f"(results/{name}.json has no `rows` list to show)"])
    keys = list(dict.fromkeys(k for r in rows for k, v in r.items() if not isinstance(v, (dict, list))))
    lines = _md_table(keys, [[_cell(r.get(k)) for k in keys] for r in rows])
    return Section(f"`benchmarks/{name}.py`", "?", lines, None,
                   ["benchmarks/report.py has no renderer for this JSON yet: raw rows, no figure."])


def _cell(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else "" if value is None else str(value)


RENDERERS: dict[str, Callable[[dict], Section]] = {
    "fold_bn_onnx": fold_bn_onnx, "fft_conv": fft_conv, "reparam": reparam, "kernel_warehouse": kernel_warehouse,
    "quant": quant, "compile": compile_}


# --- running -----------------------------------------------------------------------------------------------
@dataclass
class Run:
    name: str
    status: str  # "ran" | "skipped" | "failed" | "not run"
    detail: str = ""
    seconds: float = 0.0


def benchmarks() -> list[str]:
    found = {p.stem for p in HERE.glob("*.py") if p.name != "report.py"}
    return sorted(found | set(EXPECTED))


def run_one(name: str, quick: bool) -> Run:
    script = HERE / f"{name}.py"
    if not script.exists():
        return Run(name, "skipped", f"benchmarks/{name}.py does not exist yet")
    why = REQUIRES[name]() if name in REQUIRES else None
    if why:
        return Run(name, "skipped", why)
    start = time.perf_counter()
    cmd = [sys.executable, str(script), *(["--quick"] if quick else [])]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    tail: list[str] = []
    for line in proc.stdout:
        tqdm.write(f"  [{name}] {line.rstrip()}")
        tail = [*tail[-4:], line.rstrip()]
    code = proc.wait()
    seconds = time.perf_counter() - start
    if code:
        return Run(name, "failed", f"exit {code}: {' / '.join(t for t in tail if t)[-300:]}", seconds)
    return Run(name, "ran", "--quick" if quick else "full", seconds)


# --- the report --------------------------------------------------------------------------------------------
def machine() -> str:
    cpu = platform.processor() or platform.machine()
    mem = ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
        kb = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                  if line.startswith("MemTotal"))
        mem = f", {kb / 2**20:.0f} GiB RAM"
    except (OSError, StopIteration):
        pass
    versions = []
    for module in ("torch", "onnxruntime", "onnx"):
        try:
            versions.append(f"{module} {__import__(module).__version__}")
        except ImportError:
            versions.append(f"no {module}")
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{cpu}, {os.cpu_count()} cores{mem}, {gpu}; {platform.system()} {platform.release()}, python "
            f"{platform.python_version()}, {', '.join(versions)}")


def measured_on(path: Path) -> str:
    """The commit date of a results file that is committed as it is, else its modification time."""
    rel = os.path.relpath(path, ROOT)
    dirty = subprocess.run(["git", "status", "--porcelain", "--", rel], cwd=ROOT, capture_output=True, text=True)
    if dirty.returncode == 0 and not dirty.stdout.strip():
        log = subprocess.run(["git", "log", "-1", "--format=%cI", "--", rel], cwd=ROOT, capture_output=True,
                             text=True)
        if log.returncode == 0 and log.stdout.strip():
            return log.stdout.strip()[:16].replace("T", " ") + " (commit date)"
    stamp = datetime.datetime.fromtimestamp(path.stat().st_mtime, datetime.timezone.utc)
    return stamp.strftime("%Y-%m-%d %H:%M UTC") + " (file time)"


def figure(name: str, section: Section, folder: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2))
    section.draw(left, right)
    left.set_title("measured")
    right.set_title(f"lkfx vs anchor: {section.anchor}")
    right.axhline(1, color="gray", lw=0.8)
    for ax in (left, right):
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle(section.title.split(" (")[0])
    fig.tight_layout()
    path = folder / f"report_{name}.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def render(names: list[str], runs: dict[str, Run], quick: bool, out: Path, results: Path) -> str:
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = ["# Benchmarks", "", f"Generated by `benchmarks/report.py` (`make bench`) on {now}.", "",
             f"This machine: {machine()}.", "",
             "Each benchmark measures lkfx and its anchor in the same run, on the machine named in its section "
             "(which may be another run than this report's: see the date). Each figure: measurements on the left, "
             "lkfx's ratio against the anchor on the right.", "", "## Runs", ""]
    if runs:
        mode = "`--quick` smoke runs (they write no results: the tables below are from the results JSON as the " \
               "last runs that wrote them left it)" \
            if quick else "full runs"
        lines += [f"This command: {mode}.", ""]
    else:
        lines += ["This command ran no benchmark (`--no-run`): the tables below are from the results JSON as the last "
                  "runs that wrote them left it.", ""]
    rows = []
    for name in names:
        run = runs.get(name, Run(name, "not run"))
        result = results / f"{name}.json"
        measured = measured_on(result) if result.exists() else "no results JSON"
        rows.append([f"`{name}.py`", run.status, run.detail, f"{run.seconds:.0f} s" if run.seconds else "",
                     measured])
    lines += _md_table(["benchmark", "this command", "detail", "time", "results measured"], rows)
    for name in names:
        result = results / f"{name}.json"
        if not result.exists():
            continue
        data = json.loads(result.read_text())
        try:
            section = RENDERERS[name](data) if name in RENDERERS else generic(name, data)
        except (KeyError, TypeError, ValueError) as e:  # the benchmark's JSON changed shape
            section = generic(name, data)
            section.notes.append(f"Its renderer in benchmarks/report.py failed ({type(e).__name__}: {e}): update it.")
        machine_of_run = data.get("machine") or data.get("meta", {}).get("machine", "not recorded")
        lines += ["", f"## {section.title}", "", f"Anchor: {section.anchor}. Measured {measured_on(result)} on: "
                  f"{machine_of_run}.", *section.notes, "", *section.lines]
        if section.draw is not None:
            path = figure(name, section, results)
            lines += ["", f"![{name}]({os.path.relpath(path, out.parent)})"]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="run each benchmark with --quick (smoke test)")
    parser.add_argument("--no-run", action="store_true", help="only write the report from the results JSON")
    parser.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder of the results JSON (and figures)")
    args = parser.parse_args()
    names = benchmarks()
    runs = {} if args.no_run else {name: run_one(name, args.quick) for name in tqdm(names, unit="benchmark")}
    for run in runs.values():
        print(f"{run.name:<20} {run.status:<8} {run.seconds:8.1f} s  {run.detail}")
    out = args.out.resolve()
    out.write_text(render(names, runs, args.quick, out, args.results.resolve()))
    print(f"wrote {out}")
    if any(r.status == "failed" for r in runs.values()):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
