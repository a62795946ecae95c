"""Resources of memkern's Triton kernels compiled for sm_80 and sm_90, with no GPU.

    python -m tools.triton_resources [--target 80 --target 90]     (from the repository root)

Every distinct launch of every launcher, captured and compiled as
tests/test_triton_gpu_compile.py does (tools/triton_aot.py), as one markdown table per
target: launch options, shared memory per block, registers per thread and spill bytes per
thread from ptxas, and the matrix instruction its products compiled to (wgmma, Hopper's
own, or mma.sync). This says whether a kernel compiles and fits, its register pressure and
which tensor-core path it takes; it says nothing about speed.
"""

from __future__ import annotations

import argparse

from tools import triton_aot as _aot


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--target",
        type=int,
        action="append",
        choices=_aot.CAPABILITIES,
        help="compute capability (repeatable; default: all of %(choices)s)",
    )
    args = parser.parse_args()
    reason = _aot.unavailable()
    if reason is not None:
        raise SystemExit(f"cannot compile for NVIDIA targets here: {reason}")
    capabilities = tuple(args.target or _aot.CAPABILITIES)
    variants = _aot.capture()
    by_key = {(r["capability"], r["id"]): r for r in _aot.compile_isolated(variants, capabilities)}
    import triton

    print(f"Triton {triton.__version__}: {len(variants)} distinct kernel launches\n")
    for capability in capabilities:
        limit = _aot.SHARED_LIMIT[capability]
        print(f"sm_{capability} (shared memory limit {limit} bytes per block)\n")
        print("| kernel | launch | warps | stages | shared (B) | registers | spill stores / loads (B) | matrix |")
        print("|---|---|---:|---:|---:|---:|---:|---|")
        for v in variants:
            r = by_key[capability, v.id]
            if "error" in r:
                print(f"| `{v.kernel}` | `{v.case}` | | | | | compile error: {r['error'].splitlines()[0]} | |")
                continue
            spill = f"{r['spill_stores']} / {r['spill_loads']}"
            print(
                f"| `{v.kernel}` | `{v.case}` | {r['num_warps']} | {r['num_stages']} | {r['shared']} "
                f"| {r['registers']} | {spill if r['spill_stores'] or r['spill_loads'] else '0'} "
                f"| {r['matrix_instruction'] or '-'} |"
            )
        print()


if __name__ == "__main__":
    main()
