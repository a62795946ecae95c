"""`memkern info | bench | demo` (also `python -m memkern ...`)."""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile


def _cannot_write(path: str, kind: str) -> str | None:
    """Why nothing can be written at ``path``, or None: a ``"file"`` to append to (its
    folder must exist) or a ``"folder"`` to write into (made, with its parents, if
    missing). Checked before any work starts; nothing is left behind."""
    path = os.path.abspath(path)
    if os.path.isdir(path):
        if kind == "file":
            return "it is a folder"
        folder = path
    elif os.path.exists(path):
        if kind == "folder":
            return "it exists and is not a folder"
        try:
            with open(path, "a"):  # appending nothing changes nothing
                return None
        except OSError as exc:
            return exc.strerror
    else:
        # A new file goes into its folder as it is; a new folder is made inside the
        # nearest folder that exists.
        folder = os.path.dirname(path)
        while kind == "folder" and not os.path.exists(folder):
            folder = os.path.dirname(folder)
        if not os.path.isdir(folder):
            return f"{folder!r} is not a folder" if os.path.exists(folder) else f"folder {folder!r} does not exist"
    try:
        with tempfile.TemporaryFile(dir=folder):
            return None
    except OSError as exc:
        return f"cannot create files in {folder!r}: {exc.strerror}"


def _info(_: argparse.Namespace) -> int:
    import torch

    import memkern
    from memkern import _library, backends

    cuda_ok = torch.cuda.is_available()  # asked here, never at import
    print(f"memkern   {memkern.__version__}")
    print(f"python    {platform.python_version()}")
    print(f"torch     {torch.__version__} (CUDA build: {torch.version.cuda or 'no'})")
    print(f"triton    {_library.triton_version() or 'not available: ' + str(_library.triton_error())}")
    print(
        f"cpu       {platform.machine()}, {torch.get_num_threads()} threads, "
        f"vector unit {torch.backends.cpu.get_cpu_capability()}"
    )
    if cuda_ok:
        name = torch.cuda.get_device_name()
        cap = torch.cuda.get_device_capability()
        print(f"cuda      {name} (sm_{cap[0]}{cap[1]}), runtime {torch.version.cuda}")
    else:
        print("cuda      no CUDA device")
    cpp = "built" if _library.has_cpp() else f"not built ({_library.cpp_error()})"
    print(f"C++ ext   {cpp}")
    print(f"CUDA ext  {'built' if _library.has_cuda_ext() else 'not built'}")
    print(f"triton on CPU tensors (TRITON_INTERPRET=1): {'yes' if _library.triton_interpret() else 'no'}")
    forced = backends.forced_backend()
    if forced:
        print(f"forced backend: {forced} (MEMKERN_BACKEND)")
    print()
    width = max(len(name) for name in backends.OPS) + 2
    print(f"{'op':<{width}}{'on cpu':<10}{'on cuda':<10}not used, and why")
    for name, table in sorted(backends.OPS.items()):
        cpu, cuda = table.default_backend("cpu"), table.default_backend("cuda")
        why = []
        for b in backends.BACKENDS:
            if b in (cpu, cuda):
                continue
            reasons = {table.static_reason(b, d) for d in ("cpu", "cuda")} - {None}
            why.append(f"{b}: {'; '.join(sorted(reasons)) or 'lower preference'}")
        print(f"{name:<{width}}{cpu:<10}{cuda:<10}{' | '.join(why)}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    import torch

    import memkern
    from memkern.benchmarks import harness, registry, report

    if args.device == "cuda" and not torch.cuda.is_available():
        print("memkern bench: --device cuda asked for, but no CUDA device is available", file=sys.stderr)
        return 2
    reason = _cannot_write(args.csv, "file") if args.csv else None
    if reason:
        print(f"memkern bench: --csv {args.csv!r} cannot be written: {reason}", file=sys.stderr)
        return 2
    ops = [o for part in args.ops for o in part.split(",") if o] if args.ops else None
    try:
        cases = registry.all_cases(quick=args.quick, ops=ops, device=args.device)
    except ValueError as exc:
        print(f"memkern bench: {exc}", file=sys.stderr)
        return 2
    if args.match:
        cases = [c for c in cases if any(m in c.id for m in args.match)]
        if not cases:
            print(f"memkern bench: no case id contains {' or '.join(map(repr, args.match))}", file=sys.stderr)
            return 2

    def write_rows(m: harness.Measurement) -> None:  # as measured, so a run cut short keeps its rows
        report.append_csv(args.csv, report.rows([m], memkern.__version__))

    torch.manual_seed(0)
    try:
        results = harness.run(
            cases,
            args.device,
            quick=args.quick,
            memory=not args.no_memory,
            progress=sys.stderr.isatty(),
            on_result=write_rows if args.csv else None,
        )
    except OSError as exc:
        print(f"memkern bench: writing --csv {args.csv!r} failed: {exc}", file=sys.stderr)
        return 2
    report.print_table(results, args.device)
    if args.csv:
        print(f"appended results to {args.csv}")
    failed = [m for m in results if m.error]
    for m in failed:
        print(f"failed: {m.case.id} [{m.provider}]: {m.error}", file=sys.stderr)
    return 1 if failed else 0


def _demo(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from memkern.demo import DemoConfig, DemoError, missing_requirements, run_demo
    from memkern.demo.report import print_table, write_all

    missing = missing_requirements()
    if missing:
        print(f"memkern demo: error: needs {', '.join(missing)}: pip install 'memkern[demo]'", file=sys.stderr)
        return 2
    reason = _cannot_write(args.out, "folder")
    if reason:
        print(f"memkern demo: error: --out {args.out!r} cannot be written: {reason}", file=sys.stderr)
        return 2
    overrides = {
        k: getattr(args, k)
        for k in (
            "corpus",
            "teacher_steps",
            "student_steps",
            "finetune_steps",
            "share_layers",
            "prune_pattern",
            "sparsity",
            "device",
            "seed",
        )
        if getattr(args, k) is not None
    }
    overrides["progress"] = sys.stderr.isatty()
    cfg = DemoConfig.quick(**overrides) if args.quick else replace(DemoConfig(), **overrides)
    try:
        result = run_demo(cfg)
    except DemoError as exc:
        print(f"memkern demo: error: {exc}", file=sys.stderr)
        return 2
    print_table(result)
    try:
        csv_path, png_path = write_all(result, args.out)
    except OSError as exc:
        print(f"memkern demo: error: writing to --out {args.out!r} failed: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {csv_path} and {png_path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="memkern", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, builds, and the backend each op uses").set_defaults(func=_info)
    bench = sub.add_parser("bench", help="memkern ops against dense baselines: time and peak memory")
    bench.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    bench.add_argument("--quick", action="store_true", help="small shapes, short runs")
    bench.add_argument("--ops", action="append", help="only these ops (comma separated, repeatable)")
    bench.add_argument(
        "--match", action="append", help="only cases whose id (op/mode/shape/dtype) contains this text (repeatable)"
    )
    bench.add_argument("--csv", help="append tidy result rows to this CSV file, each as it is measured")
    bench.add_argument("--no-memory", action="store_true", help="skip peak-memory measurement")
    bench.set_defaults(func=_bench)
    demo = sub.add_parser("demo", help="distil, share, prune and quantise a small language model end to end")
    demo.add_argument("--quick", action="store_true", help="a sub-minute smoke run")
    demo.add_argument("--corpus", help="a text file or folder (default: the Python standard library's sources)")
    demo.add_argument("--teacher-steps", type=int)
    demo.add_argument("--student-steps", type=int)
    demo.add_argument("--finetune-steps", type=int)
    demo.add_argument(
        "--share-layers",
        nargs="?",
        const="pairs",
        metavar="GROUPS",
        help="tie the student's blocks: 'pairs' (the default) or block indices like '0,1;2,3'",
    )
    demo.add_argument("--prune-pattern", choices=("2:4", "block"))
    demo.add_argument("--sparsity", type=float)
    demo.add_argument("--device", choices=("cpu", "cuda"))
    demo.add_argument("--seed", type=int)
    demo.add_argument("--out", default="demo-output", help="folder for demo.csv and demo.png")
    demo.set_defaults(func=_demo)
    args = parser.parse_args(argv)
    from memkern import backends

    try:  # a bad MEMKERN_BACKEND would otherwise fail in the middle of the command
        backends.forced_backend()
    except ValueError as exc:
        print(f"memkern {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
