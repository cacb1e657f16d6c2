"""`lkfx` command line: a thin wrapper over `lkfx.transform` for ONNX files.

    lkfx optimize IN.onnx -o OUT.onnx -p fold_bn [-p NAME:key=value,...] [--check] [--report r.json]
    lkfx passes [--json]
    lkfx inspect IN.onnx [-p NAME ...]

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
from pathlib import Path
from typing import Any

from lkfx.errors import CheckError, LkfxError, PassError


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
    p = _Parser(prog="lkfx", description="Rewrite ONNX convolutional networks with lkfx passes.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    o = sub.add_parser("optimize", help="apply passes to an ONNX file and write the result")
    o.add_argument("input", help="input .onnx file (never modified)")
    o.add_argument("-o", "--output", required=True, help="output .onnx file (written atomically)")
    o.add_argument("-p", "--pass", dest="passes", action="append", required=True, metavar="NAME[:key=value,...]",
                   help="a pass to run, repeatable, in order (see 'lkfx passes')")
    o.add_argument("--check", action="store_true", help="compare outputs in onnxruntime; on mismatch write nothing")
    o.add_argument("--report", metavar="FILE.json", help="write what each pass did as JSON")
    o.add_argument("--calib-data", metavar="PATH",
                   help="calibration inputs (.npz or folder of .npy) for passes that need them")
    o.add_argument("-q", "--quiet", action="store_true", help="do not print the summary table")
    ls = sub.add_parser("passes", help="list passes and their options")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    i = sub.add_parser("inspect", help="show what each pass would rewrite, without writing anything")
    i.add_argument("input")
    i.add_argument("-p", "--pass", dest="passes", action="append", metavar="NAME[:key=value,...]",
                   help="passes to try (default: every pass with an ONNX frontend)")
    return p


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
    passes = [parse_pass(s) for s in args.passes]
    from lkfx.passes import resolve_passes

    pass_objs = resolve_passes(passes)
    if args.calib_data is not None and not any(p.uses_calib_data for p in pass_objs):
        raise LkfxError("--calib-data was given but none of the selected passes uses calibration data")
    for path, what in ((dst, "output"), (args.report and Path(args.report), "report")):
        if path:
            _check_writable(path, what)
    out, report = lkfx.transform(src, pass_objs, check=args.check, return_report=True, calib_data=args.calib_data)
    report_tmp = None
    if args.report:  # written beside its destination first, renamed once the model is saved: both or neither
        data = report.to_dict() | {"input": str(src), "output": str(dst)}
        report_tmp = _write_temp(Path(args.report), json.dumps(data, indent=2))
    try:
        gonnx.save_atomic(out, dst)
    except BaseException:
        if report_tmp:
            report_tmp.unlink(missing_ok=True)
        raise
    if report_tmp:
        os.replace(report_tmp, args.report)
    if not args.quiet:
        print(report)
        print(f"wrote {dst} ({src.stat().st_size:,} -> {dst.stat().st_size:,} bytes)")
    return 0


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


def _write_temp(path: Path, text: str) -> Path:
    """`text` in a new hidden temporary file beside `path`."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.resolve().parent)
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
    for spec in names:
        _, report = lkfx.transform(args.input, [spec], return_report=True)
        print(report)
        print()
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
        return {"optimize": _optimize, "passes": _passes, "inspect": _inspect}[args.command](args)
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
