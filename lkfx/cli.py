"""`lkfx` command line: a thin wrapper over `lkfx.transform` for ONNX files.

    lkfx optimize IN.onnx -o OUT.onnx [-p NAME[:key=value,...] ...] [--check] [--report r.json] [-v | -q]
    lkfx passes [--json]
    lkfx inspect IN.onnx [-p NAME ...] [-v | -q]
    lkfx --version

Without -p, `optimize` runs the exact deploy pipeline: merge_reparam (parallel branches into one conv), then
fold_bn (the BatchNorms left). Skipped matches are grouped by reason (-v lists each one).

Exit codes: 0 written; 1 --check found a mismatch (nothing written); 2 bad input or usage (one line on
stderr, input untouched, no output file); 3 an internal error in a pass (a bug: please report it).
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

from lkfx.errors import CheckError, LkfxError, PassError
from lkfx.report import Report

DEPLOY = ["merge_reparam", "fold_bn"]  # optimize without -p: branches merged first, each BN then folded once


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2
        raise LkfxError(f"{message} (see '{self.prog} --help')")


def _value(text: str) -> Any:
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_pass(spec: str) -> Any:
    """'name' or 'name:key=value,key=value' -> name or (name, {options})."""
    name, _, rest = spec.partition(":")
    if not rest:
        return name
    options = {}
    for item in rest.split(","):
        key, eq, val = item.partition("=")
        if not eq or not key:
            raise LkfxError(f"cannot read option '{item}' in '-p {spec}'; write -p NAME:key=value,key=value")
        options[key.strip()] = _value(val.strip())
    return (name, options)


def _parser() -> argparse.ArgumentParser:
    from lkfx import __version__

    p = _Parser(prog="lkfx", description="Rewrite ONNX convolutional networks with lkfx passes.")
    p.add_argument("--version", action="version", version=f"lkfx {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    o = sub.add_parser("optimize", help="apply passes to an ONNX file and write the result")
    o.add_argument("input", help="input .onnx file (never modified)")
    o.add_argument("-o", "--output", required=True, help="output .onnx file (written atomically)")
    o.add_argument("-p", "--pass", dest="passes", action="append", metavar="NAME[:key=value,...]",
                   help="a pass to run, repeatable, in order (see 'lkfx passes'); default: the deploy pipeline "
                        f"{' then '.join(DEPLOY)}")
    o.add_argument("--check", action="store_true", help="compare outputs in onnxruntime; on mismatch write nothing")
    o.add_argument("--report", metavar="FILE.json", help="write what each pass did as JSON")
    o.add_argument("--calib-data", metavar="PATH",
                   help="calibration inputs (.npz or folder of .npy) for passes that need them")
    o.add_argument("--calib-batch-size", metavar="N", type=int, default=0,
                   help="cut all calibration samples into batches of N, whatever the arrays are named "
                        "(default: each array as given; sets fake_quant's batch_size)")
    _verbosity(o)
    ls = sub.add_parser("passes", help="list passes and their options")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    i = sub.add_parser("inspect", help="show what each pass would rewrite, without writing anything")
    i.add_argument("input")
    i.add_argument("-p", "--pass", dest="passes", action="append", metavar="NAME[:key=value,...]",
                   help="passes to try (default: every pass with an ONNX frontend)")
    _verbosity(i)
    return p


def _verbosity(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("-v", "--verbose", action="store_true", help="list every skipped match and note")
    group.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors (inspect: the table)")


def _optimize(args: argparse.Namespace) -> int:
    import lkfx
    from lkfx.graph import onnx as gonnx

    src, dst = Path(args.input), Path(args.output)
    inputs = gonnx.input_files(src)
    for path, what in ((dst, "output"), (dst.with_name(f"{dst.name}.data"), "output's data file"),
                       (args.report and Path(args.report), "--report")):
        same = path and path.exists() and any(i.exists() and os.path.samefile(path, i) for i in inputs)
        if path and (path.resolve() in inputs or same):
            raise LkfxError(f"{what} '{path}' is the input file or one of its data files; choose another path so the "
                            "input is kept")
    if args.calib_data is not None and not Path(args.calib_data).exists():
        raise LkfxError(f"calibration data '{args.calib_data}' does not exist")
    passes = [parse_pass(s) for s in args.passes] if args.passes else DEPLOY
    from lkfx.passes import resolve_passes

    pass_objs = resolve_passes(passes)
    if args.calib_data is not None and not any(p.uses_calib_data for p in pass_objs):
        raise LkfxError("--calib-data was given but none of the selected passes uses calibration data")
    if args.calib_batch_size:
        if args.calib_batch_size < 0 or args.calib_data is None:
            raise LkfxError("--calib-batch-size needs a positive N and --calib-data")
        for p in pass_objs:
            if "batch_size" in p.options and p.uses_calib_data:
                p.config["batch_size"] = args.calib_batch_size
    for path, what in ((dst, "output"), (args.report and Path(args.report), "report")):
        if path:
            _check_writable(path, what)
    out, report = lkfx.transform(src, pass_objs, check=args.check, return_report=True, calib_data=args.calib_data)
    report_tmp = None
    mode = src.stat().st_mode & 0o777  # outputs get the input's permission bits
    if args.report:  # written beside its destination first, renamed once the model is saved: both or neither
        data = report.to_dict() | {"input": str(src), "output": str(dst)}
        report_tmp = _write_temp(Path(args.report), json.dumps(data, indent=2), mode)
    try:
        gonnx.save_atomic(out, dst, mode)
    except BaseException:
        if report_tmp:
            report_tmp.unlink(missing_ok=True)
        raise
    if report_tmp:
        os.replace(report_tmp, args.report)
    if not args.quiet:
        _print_report(report, args.verbose)
        for line in _nothing_rewritten(report, out):
            print(line)
        outputs = [p for p in (dst, dst.with_name(f"{dst.name}.data")) if p.exists()]
        size_in, size_out = (sum(p.stat().st_size for p in files) for files in (inputs, outputs))
        data = ", model + external data" if len(inputs) > 1 or len(outputs) > 1 else ""
        print(f"wrote {dst} ({size_in:,} -> {size_out:,} bytes{data})")
    return 0


def _print_report(report: Report, verbose: bool, table_only: bool = False) -> None:
    """The report's table, then its skips and notes: each line with -v, else one line per pass and reason."""
    if verbose or table_only:
        print(report if verbose else report.summary())
        return
    print(report.summary())
    grouped = False
    for p in report.passes:
        where = {}
        for s in p.skipped:
            where.setdefault(s.reason, []).append(s.where)
        for reason, places in where.items():
            grouped |= len(places) > 1
            print(f"  [{p.name}] {len(places)} skipped: {reason}" if len(places) > 1 else
                  f"  [{p.name}] skipped {places[0]}: {reason}")
        for note, n in Counter(p.notes).items():
            grouped |= n > 1
            print(f"  [{p.name}] {note}" + (f" ({n} times)" if n > 1 else ""))
    for note in report.notes:
        print(f"  note: {note}")
    if grouped:
        print("  (-v lists each one)")


def _nothing_rewritten(report: Report, model: Any) -> list[str]:
    """Why nothing changed, when nothing did: which pass found nothing and which refused what it found."""
    if report.modified:
        return []
    found = [f"{p.name} refused all {p.matched} (reasons above)" for p in report.passes if p.matched]
    empty = [p.name for p in report.passes if not p.matched]
    lines = ["nothing to rewrite: " + "; ".join(found + ([f"{', '.join(empty)} found no match"] if empty else []))]
    if not any(n.op_type == "BatchNormalization" for n in model.graph.node):
        lines.append("the model has no BatchNormalization node: already folded by the exporter? torch.onnx.export "
                     "folds Conv + BN by default; dynamo=False, do_constant_folding=False keeps them")
    return lines


def _check_writable(path: Path, what: str) -> None:
    """Before any work: `path` is not a directory and a file can be created beside it (os.access says yes to root
    on read-only file systems such as /proc, so this tries)."""
    if path.is_dir():
        example = path / ("out.onnx" if what == "output" else "report.json")
        raise LkfxError(f"{what} path '{path}' is a directory; give a file name such as '{example}'")
    folder = path.resolve().parent
    if not folder.is_dir():
        raise LkfxError(f"{what} folder '{folder}' does not exist")
    _write_temp(path, "").unlink()


def _write_temp(path: Path, text: str, mode: int = 0o600) -> Path:
    """`text` in a new hidden temporary file beside `path`, with permission bits `mode`."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.resolve().parent)
        os.fchmod(fd, mode)
        with os.fdopen(fd, "w") as f:
            f.write(text)
    except OSError as e:
        raise LkfxError(f"cannot write '{path}': {e.strerror or e}") from e
    return Path(tmp)


def _passes(args: argparse.Namespace) -> int:
    import lkfx

    infos = lkfx.list_passes()
    if args.json:
        print(json.dumps(infos, indent=2))
        return 0
    for info in infos:
        opts = ", ".join(f"{k}={v!r}" for k, v in info["options"].items()) or "-"
        print(f"{info['name']:<22} [{'/'.join(info['frontends'])}] {info['summary']}\n{'':<22} options: {opts}")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    import lkfx
    from lkfx.passes import get_pass

    names = [parse_pass(s) for s in args.passes] if args.passes else \
        [i["name"] for i in lkfx.list_passes() if "onnx" in i["frontends"] and not get_pass(i["name"]).uses_calib_data]
    reports = [lkfx.transform(args.input, [spec], return_report=True)[1] for spec in names]
    _print_report(Report("onnx", [r.passes[0] for r in reports]), args.verbose, table_only=args.quiet)
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
        code = {"optimize": _optimize, "passes": _passes, "inspect": _inspect}[args.command](args)
        sys.stdout.flush()  # a closed stdout shows here, not at exit
        return code
    except BrokenPipeError:  # stdout closed by the reader (`lkfx passes | head`): stop quietly, as `cat` does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except LkfxError as e:
        print(f"lkfx: error: {e}", file=sys.stderr)
        return 2
    except CheckError as e:
        print(f"lkfx: check failed, nothing written: {e}", file=sys.stderr)
        return 1
    except PassError as e:
        print(f"lkfx: internal error: {e} (please report this with the model)", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("lkfx: interrupted, nothing written", file=sys.stderr)
        return 130
    except Exception as e:  # never a traceback: one line, as for a failing pass
        text = " ".join(str(e).split())[:300]
        print(f"lkfx: internal error: {type(e).__name__}: {text} (please report this with the model)", file=sys.stderr)
        return 3


if __name__ == "__main__":
    raise SystemExit(main())
