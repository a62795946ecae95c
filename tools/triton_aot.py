"""Ahead-of-time compilation of memkern's Triton kernels for NVIDIA GPUs, on a machine
without one: does every kernel compile for sm_80 / sm_90 at the configuration its launcher
uses on a GPU, does its shared memory fit, and how many registers does it take?

Two steps, so that the launchers themselves say what a GPU would compile (nothing here
repeats their argument lists):

* :func:`capture` calls every public launcher of memkern.kernels (the cases below) on
  fake CUDA tensors (``FakeTensorMode``: shapes, strides and dtypes, no data and no
  device), with ``_library.triton_interpret`` reporting False and each ``@triton.jit``
  kernel replaced by a recorder. The launchers therefore take their GPU branches (tile
  sizes, ``num_warps``, the bf16 ``tl.dot`` path) and hand the recorder exactly the
  arguments of a GPU launch. Each recorded call then goes through Triton's own launch-time
  binder, which specialises it as a launch would: integers equal to 1 become constants,
  integers and pointers divisible by 16 get a divisibility hint (every tensor is taken as
  16-byte aligned, as fresh CUDA allocations are; ``triton.runtime.jit.MockTensor``). The
  specialisation matters: the int8 GEMM (128 x 128 x 128 tiles, 8 warps) with its unit
  strides as constants takes 121 registers, 96 KiB of shared memory and no spill on
  sm_90; compiled with every integer a plain i32 and no hints, its loads are not
  vectorised, it takes 64 KiB, 255 registers and spills 932 bytes.
* :func:`compile_variant` compiles one captured variant for a target with Triton's NVIDIA
  backend, then runs the ptxas that Triton runs for that target on the PTX, with Triton's
  flags plus ``-v``, and reads registers and spill bytes from its report; shared memory is
  Triton's own figure (``metadata.shared``).

Kernels compile only where Triton does not interpret them: ``TRITON_INTERPRET`` is read
when a kernel module is first imported. :func:`compile_isolated` therefore compiles in a
fresh Python process (``python -m tools.triton_aot`` from the repository root) with the interpreter off, which
also keeps the interpreter's patches of ``triton.language`` out of the compiler. Capturing
needs no compiler and works in either mode.

Shapes are chosen so that every shape-dependent choice takes its large-problem value (a
1024-wide vocabulary tile, 64-row blocks) and are multiples of 16, as LLM shapes are.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile
from typing import Any
from collections.abc import Callable, Iterator

import torch

# Shared memory one block may use (bytes; the opt-in maximum): A100 163 KiB, H100 227 KiB.
ROOT = str(pathlib.Path(__file__).resolve().parents[1])
SHARED_LIMIT = {80: 166912, 90: 232448}
# The Triton releases this tool was checked with: it drives Triton's launch binder, fake
# tensors and NVIDIA backend directly, whose internals change between releases.
SUPPORTED_TRITON = ((3, 6), (3, 9))
CAPABILITIES = (80, 90)
KERNEL_MODULES = (
    "memkern.kernels.kd",
    "memkern.kernels.kd_linear",
    "memkern.kernels.kd_linear_stats",
    "memkern.kernels.int8",
    "memkern.kernels.int4",
    "memkern.kernels.quantize",
    "memkern.kernels.sparse",
    "memkern.kernels.sparse_bitmask",
)


def unavailable() -> str | None:
    """Why kernels cannot be compiled for NVIDIA targets here, or None."""
    from memkern import _library

    if not _library.has_triton():
        return _library.triton_error()
    version = tuple(int(p) for p in _library.triton_version().split(".")[:2])
    low, high = SUPPORTED_TRITON
    if not low <= version <= high:
        return (
            f"Triton {_library.triton_version()} is outside the releases this compiler drives "
            f"({low[0]}.{low[1]} to {high[0]}.{high[1]}); it uses Triton internals that change between releases"
        )
    try:
        from triton.backends.nvidia.compiler import get_ptxas
    except Exception as exc:  # no NVIDIA backend in this Triton build
        return f"Triton has no NVIDIA backend ({type(exc).__name__}: {exc})"
    for capability in CAPABILITIES:
        try:
            path = get_ptxas(capability).path
        except Exception as exc:
            return f"Triton finds no ptxas for sm_{capability} ({type(exc).__name__}: {exc})"
        if not (path and os.access(path, os.X_OK)):
            return f"Triton's ptxas for sm_{capability} is missing or not executable: {path}"
    return None


# -- capture -------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Variant:
    """One distinct compilation of one kernel, as a GPU launch would specialise it."""

    module: str  # e.g. "memkern.kernels.kd"
    kernel: str  # the @triton.jit function's name in that module
    case: str  # the first launcher call that launched it
    signature: dict[str, str]  # parameter -> Triton type, or "constexpr"
    constexprs: dict[str, Any]  # constexpr parameter -> value
    attrs: dict[str, list]  # parameter -> Triton attributes (divisibility hints)
    options: dict[str, Any]  # the launch options the launcher passed (num_warps, ...)

    @property
    def id(self) -> str:
        return f"{self.kernel}({self.case})"

    def key(self) -> str:
        return json.dumps(
            [self.module, self.kernel, self.signature, self.constexprs, self.attrs, self.options], sort_keys=True
        )

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


class _Recorder:
    """Stands in for a @triton.jit kernel: ``kernel[grid](*args, **kwargs)`` is recorded."""

    def __init__(self, module: str, name: str, calls: list):
        self.module, self.name, self.calls = module, name, calls

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append((self.module, self.name, args, kwargs))

        return launch


def kernel_names(module) -> list[str]:
    """The @triton.jit functions of a kernel module that are launched, not the device
    functions they call: the ones named ``*_kernel``."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    return sorted(
        n
        for n, v in vars(module).items()
        if n.endswith("_kernel") and isinstance(v, (JITFunction, InterpretedFunction))
    )


def _jit_function(obj):
    """A JITFunction for binding arguments; under TRITON_INTERPRET=1 the module holds an
    InterpretedFunction, whose Python function is wrapped (it is never compiled here)."""
    from triton.runtime.jit import JITFunction

    return obj if isinstance(obj, JITFunction) else JITFunction(obj.fn)


def _mock(arg):
    """Tensors become Triton's MockTensor: their dtype at a 16-byte aligned address."""
    from triton.runtime.jit import MockTensor

    return MockTensor(arg.dtype) if isinstance(arg, torch.Tensor) else arg


def _bind(jit_fn, backend, args: tuple, kwargs: dict) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) of a launch, by name, from Triton's own launch binder
    (the code path of JITFunction.run)."""
    from triton.runtime.jit import create_function_from_signature

    binder = create_function_from_signature(jit_fn.signature, jit_fn.params, backend)
    bound, specialization, options = binder(*map(_mock, args), **{k: _mock(v) for k, v in kwargs.items()})
    _, signature, constexprs, attrs = jit_fn._pack_args(backend, kwargs, bound, specialization, options)
    names = jit_fn.arg_names
    return (
        signature,
        {names[path[0]]: value for path, value in constexprs.items()},
        {names[path[0]]: value for path, value in attrs.items()},
    )


@contextlib.contextmanager
def _recording(calls: list) -> Iterator[dict]:
    """Every kernel of KERNEL_MODULES replaced by a recorder, and the launchers told that
    Triton does not interpret (so they choose GPU tiles and no interpreter workarounds).
    Yields the replaced kernels by (module, name)."""
    from memkern import _library

    saved = [(_library, "triton_interpret", _library.triton_interpret)]
    kernels = {}
    try:
        _library.triton_interpret = lambda: False
        for module_name in KERNEL_MODULES:
            module = importlib.import_module(module_name)
            for name in kernel_names(module):
                kernels[module_name, name] = getattr(module, name)
                saved.append((module, name, kernels[module_name, name]))
                setattr(module, name, _Recorder(module_name, name, calls))
        yield kernels
    finally:
        for obj, name, value in reversed(saved):
            setattr(obj, name, value)


class _Fake:
    """``fake(shape, dtype)`` or ``fake(tensor)``: a fake CUDA tensor (no data) with that
    shape and dtype, or with the tensor's shape, strides and dtype."""

    def __init__(self, mode):
        self.mode = mode

    def __call__(self, shape_or_tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        with self.mode:
            if isinstance(shape_or_tensor, torch.Tensor):
                t = shape_or_tensor
                return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="cuda")
            return torch.empty(shape_or_tensor, dtype=dtype, device="cuda")


# The launcher calls. A case builds its inputs as fake CUDA tensors (sparse weights first on
# the CPU with memkern's own constructors, for their layout and index dtypes) and returns
# the launcher call, which capture() runs under the fake mode.
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_CASES: list[tuple[str, Callable]] = []


def _case(name: str):
    def register(fn):
        _CASES.append((name, fn))
        return fn

    return register


_DIVERGENCES = {"fkl": "forward_kl", "rkl": "reverse_kl", "jsd": "jsd"}


def _kd_options(divergence: str, labels: bool):
    from memkern.ops import kd as kd_ops

    return kd_ops.check_options(
        "aot",
        has_labels=labels,
        alpha=0.5 if labels else 0.0,
        temperature=2.0,
        divergence=_DIVERGENCES[divergence],
        beta=0.5,
        ignore_index=-100,
        reduction="mean",
        soft_loss_scale="t2",
    )


def _kd_cases():
    from memkern.kernels import kd, kd_linear, kd_linear_stats

    # every divergence once and every dtype once, with labels (the cross entropy) and gradients
    rows, vocab = 8, 32000  # vocab > 1024: the launcher's widest tile, as for a real vocabulary
    for name, div in (("fp32", "fkl"), ("fp16", "rkl"), ("bf16", "jsd")):

        @_case(f"kd_loss_rows-{name}-{div}-grad")
        def _(fake, dtype=DTYPES[name], div=div):
            s, t, grad = (fake((rows, vocab), dtype) for _ in range(3))
            labels = fake((rows,), torch.int64)
            return lambda: kd.kd_loss_rows(s, t, labels, None, grad, _kd_options(div, True), 1.0 / rows)

    @_case("kd_loss_rows-bf16-fkl-forward-row_scale")
    def _(fake):
        s, t = (fake((rows, vocab), torch.bfloat16) for _ in range(2))
        row_scale, no_grad = fake((rows,)), fake((0,), torch.bfloat16)
        return lambda: kd.kd_loss_rows(s, t, None, row_scale, no_grad, _kd_options("fkl", False), 1.0)

    n, h_s, h_t, vocab = 256, 512, 768, 4096
    for name, div, bias, scaled in (
        ("fp32", "fkl", False, False),
        ("fp16", "rkl", True, False),
        ("bf16", "jsd", False, True),
    ):

        @_case(f"linear_kd_grad-{name}-{div}{'-bias' if bias else ''}{'-row_scale' if scaled else ''}")
        def _(fake, dtype=DTYPES[name], div=div, bias=bias, scaled=scaled):
            hs, ht = fake((n, h_s), dtype), fake((n, h_t), dtype)
            ws, wt = fake((vocab, h_s), dtype), fake((vocab, h_t), dtype)
            bs, bt = (fake((vocab,), dtype) if bias else None for _ in range(2))
            labels, row_scale = fake((n,), torch.int64), fake((n,)) if scaled else None
            return lambda: kd_linear.linear_kd_grad(
                hs, ws, bs, ht, wt, bt, labels, _kd_options(div, True), row_scale, 1.0 / n
            )

    @_case("linear_kd_stats-bf16-fkl-forward")
    def _(fake):
        hs, ht = fake((n, h_s), torch.bfloat16), fake((n, h_t), torch.bfloat16)
        ws, wt = fake((vocab, h_s), torch.bfloat16), fake((vocab, h_t), torch.bfloat16)
        labels = fake((n,), torch.int64)
        return lambda: kd_linear_stats.linear_kd_stats(hs, ws, None, ht, wt, None, labels, _kd_options("fkl", True))


def _lowp_cases():
    from memkern.kernels import int8, quantize

    n, k = 4096, 4096
    for name in DTYPES:

        @_case(f"quantize_rowwise-{name}")
        def _(fake, dtype=DTYPES[name]):
            x = fake((64, k), dtype)
            return lambda: quantize.quantize_rowwise(x)

    # int8_linear always runs the GEMM; M = 1 makes M the constant 1
    for name, m, bias in (("fp32", 64, False), ("fp16", 1, False), ("bf16", 64, True)):

        @_case(f"int8_linear-{name}-M{m}{'-bias' if bias else ''}")
        def _(fake, dtype=DTYPES[name], m=m, bias=bias):
            x, w_q, w_scale = fake((m, k), dtype), fake((n, k), torch.int8), fake((n,))
            b = fake((n,), dtype) if bias else None
            return lambda: int8.int8_linear(x, w_q, w_scale, b, dtype)

    # scaled_linear: int8 weights with a scale (int8_weight_only_linear) and half weights of
    # the same or the other type (fp16_linear). M <= GEMV_MAX_ROWS runs the GEMV kernel; the
    # GEMM widens to fp32 products (DOT_FP32) for fp32 x or a weight of the other type.
    for x_name, w_name, m, bias in (
        ("fp32", "int8", 1, False),
        ("fp16", "int8", 1, True),
        ("bf16", "bf16", 1, False),
        ("fp32", "int8", 64, False),
        ("fp16", "int8", 64, True),
        ("bf16", "int8", 64, False),
        ("bf16", "bf16", 64, False),
        ("bf16", "fp16", 64, False),
        ("fp32", "bf16", 64, False),
    ):
        w_dtype = DTYPES.get(w_name, torch.int8)

        @_case(f"scaled_linear-x{x_name}-w{w_name}-M{m}{'-bias' if bias else ''}")
        def _(fake, x_dtype=DTYPES[x_name], w_dtype=w_dtype, m=m, bias=bias):
            x, w = fake((m, k), x_dtype), fake((n, k), w_dtype)
            scale = fake((n,)) if w_dtype == torch.int8 else None
            b = fake((n,), x_dtype) if bias else None
            return lambda: int8.scaled_linear(x, w, scale, b)

    # K past int8.EXACT_CHUNK_K: int32 sums per chunk of K, added in int64
    @_case("int8_linear-fp16-M64-longK")
    def _(fake, long_k=int8.EXACT_CHUNK_K + 4096):
        x, w_q, w_scale = fake((64, long_k), torch.float16), fake((n, long_k), torch.int8), fake((n,))
        return lambda: int8.int8_linear(x, w_q, w_scale, None, torch.float16)

    for m in (1, 64):
        # the gradient of the int8 ops: a float32 gradient times the transposed int8 weight
        # with unit scales (memkern.ops.lowp._scaled_backward)
        @_case(f"scaled_linear-backward-M{m}")
        def _(fake, m=m):
            g, w_q, ones = fake((m, n)), fake((n, k), torch.int8), fake((k,))
            return lambda: int8.scaled_linear(g, w_q.t(), ones, None)


def _int4_cases():
    from memkern.kernels import int4

    n, k = 4096, 4096
    # M = 1 (decode: the row kernel), M = 64 (the GEMM: fp32 on the FMA units, halves on
    # tensor cores); groups of 128 (the layer's default) and 32 (the smallest BLOCK_K).
    for name, m, group, bias in (
        ("fp32", 1, 128, False),
        ("bf16", 1, 32, True),
        ("fp32", 64, 128, True),
        ("fp16", 64, 128, False),
        ("bf16", 64, 32, False),
    ):

        @_case(f"int4_linear-{name}-M{m}-g{group}{'-bias' if bias else ''}")
        def _(fake, dtype=DTYPES[name], m=m, group=group, bias=bias):
            x, w_int4 = fake((m, k), dtype), fake((n, k // 2), torch.uint8)
            scales, zeros = fake((n, k // group)), fake((n, k // group))
            b = fake((n,), dtype) if bias else None
            return lambda: int4.int4_weight_only_linear(x, w_int4, scales, zeros, group, b)


def _sparse_cases():
    from memkern import prune
    from memkern.kernels import sparse
    from memkern.ops import BlockSparseWeight, Sparse24Weight

    m, n, k = 128, 512, 512  # m >= 64: the launchers' largest row block
    # the default 64 x 64 block in fp32 and fp16, the largest block (128 x 128) in bf16
    for name, block, bias in (("fp32", 64, False), ("fp16", 64, True), ("bf16", 128, False)):

        @_case(f"block_sparse-{name}-{block}x{block}{'-bias' if bias else ''}")
        def _(fake, dtype=DTYPES[name], block=(block, block), bias=bias):
            w = torch.randn(n, k)
            weight = BlockSparseWeight.from_dense(w.to(dtype), prune.masks(w, 0.5, "block", block=block), block)
            values, crow, col, ccol, csc_row, csc_block = (
                fake(getattr(weight, f)) for f in ("values", "crow", "col", "ccol", "csc_row", "csc_block")
            )
            x, grad = fake((m, k), dtype), fake((m, n), dtype)
            b = fake((n,), dtype) if bias else None

            def launch():
                sparse.block_sparse_matmul(x, values, crow, col, n, b)
                sparse.block_sparse_matmul_backward(grad, x, values, crow, col, ccol, csc_row, csc_block)

            return launch

    for name, bias, decompress in (("fp32", False, True), ("fp16", False, False), ("bf16", True, True)):

        @_case(f"sparse24-{name}{'-bias' if bias else ''}")
        def _(fake, dtype=DTYPES[name], bias=bias, decompress=decompress):
            w = torch.randn(n, k)
            weight = Sparse24Weight.from_dense(w.to(dtype), prune.masks(w, 0.5, "n:m"))
            values, meta, x = fake(weight.values), fake(weight.meta), fake((m, k), dtype)
            b = fake((n,), dtype) if bias else None

            def launch():
                sparse.sparse24_matmul(x, values, meta, b)
                if decompress:
                    sparse.sparse24_decompress(values, meta, k)

            return launch


def _bitmask_cases():
    from memkern.kernels import sparse_bitmask
    from memkern.ops.sparse_bitmask import BitmaskWeight

    m, n, k = 128, 512, 512  # m >= 64: the launcher's largest row block
    for name, bias in (("fp32", False), ("fp16", True), ("bf16", False)):

        @_case(f"bitmask-{name}{'-bias' if bias else ''}")
        def _(fake, dtype=DTYPES[name], bias=bias):
            weight = BitmaskWeight.from_dense(torch.randn(n, k).to(dtype), torch.rand(n, k) < 0.5)
            values, bits, x = fake(weight.values), fake(weight.bits), fake((m, k), dtype)
            # The prefix counts read the bits' values, so they are computed here on the CPU
            # (the launchers' checked entry points do the same) and passed on as fakes.
            product_starts, _ = sparse_bitmask.block_starts(weight.bits, sparse_bitmask.MATMUL_BLOCK_K)
            expand_starts, _ = sparse_bitmask.block_starts(weight.bits, sparse_bitmask.BLOCK_K)
            product_starts, expand_starts = fake(product_starts), fake(expand_starts)
            b = fake((n,), dtype) if bias else None

            def launch():
                sparse_bitmask.matmul_from_starts(x, values, bits, product_starts, b)
                sparse_bitmask.decompress_from_starts(values, bits, expand_starts, k)

            return launch


def cases() -> list[tuple[str, Callable]]:
    """(name, case) of every launcher call :func:`capture` makes."""
    if not _CASES:
        _kd_cases()
        _lowp_cases()
        _int4_cases()
        _sparse_cases()
        _bitmask_cases()
    return list(_CASES)


def capture(names: list[str] | None = None) -> list[Variant]:
    """Every distinct kernel compilation that the launcher calls (all cases, or those
    named) make on a GPU, in order of first launch."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend

    # Launch-time specialisation does not depend on the target.
    backend = CUDABackend(GPUTarget("cuda", 90, 32))
    # The shape environment lets a data-dependent size (the block-sparse backward's
    # repeat_interleave) stay symbolic; it only sizes a tensor the kernel reads.
    mode = FakeTensorMode(shape_env=ShapeEnv())
    fake = _Fake(mode)
    variants: dict[str, Variant] = {}
    for case, build in cases():
        if names is not None and case not in names:
            continue
        calls: list = []
        launch = build(fake)
        with _recording(calls) as kernels, mode:
            launch()
        if not calls:
            raise RuntimeError(f"the launcher call {case} launched no kernel")
        for module_name, name, args, kwargs in calls:
            jit_fn = _jit_function(kernels[module_name, name])
            options = {k: v for k, v in kwargs.items() if k not in jit_fn.arg_names}
            signature, constexprs, attrs = _bind(jit_fn, backend, args, kwargs)
            variant = Variant(module_name, name, case, signature, constexprs, attrs, options)
            variants.setdefault(variant.key(), variant)
    return list(variants.values())


# -- compile -------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Resources:
    """What one compiled variant takes on its target."""

    capability: int
    num_warps: int
    num_stages: int
    shared: int  # bytes of shared memory per block (Triton's metadata.shared)
    registers: int  # per thread (ptxas)
    spill_stores: int  # bytes (ptxas)
    spill_loads: int
    stack: int  # bytes of stack frame (ptxas)
    matrix_instruction: str  # "wgmma" (Hopper's), "mma.sync", or "" (no tensor-core product)

    @property
    def shared_limit(self) -> int:
        return SHARED_LIMIT[self.capability]


_PTXAS_REGISTERS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILLS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def ptxas_report(ptx: str, capability: int) -> tuple[int, int, int, int, str]:
    """(registers, spill store bytes, spill load bytes, stack frame bytes, ptxas's report)
    of ``ptx``, assembled by the ptxas Triton uses for ``capability`` (ptxas-blackwell from
    sm_90 on) with the flags Triton passes it (make_cubin in triton/backends/nvidia)."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        src = pathlib.Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        cmd = [
            get_ptxas(capability).path,
            "-lineinfo",
            "-v",
            "--regAllocOptLevel=2",
            f"--gpu-name={sm_arch_from_capability(capability)}",
            str(src),
            "-o",
            str(src.with_suffix(".cubin")),
        ]
        result = subprocess.run(cmd, capture_output=True, text=True)
    report = result.stderr + result.stdout
    if result.returncode != 0:
        raise RuntimeError(f"ptxas failed ({result.returncode}):\n{report}")
    registers = _PTXAS_REGISTERS.findall(report)
    spills = _PTXAS_SPILLS.findall(report)
    if len(registers) != 1 or len(spills) != 1:
        raise RuntimeError(f"cannot read one kernel's registers and spills from ptxas's report:\n{report}")
    stack, stores, loads = map(int, spills[0])
    return int(registers[0]), stores, loads, stack, report


def compile_variant(variant: Variant | dict, capability: int):
    """Compile one variant for sm_<capability>; returns (Resources, the CompiledKernel).
    The kernel module must have been imported with Triton's interpreter off."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    v = variant.to_json() if isinstance(variant, Variant) else variant
    fn = getattr(importlib.import_module(v["module"]), v["kernel"])
    if not isinstance(fn, JITFunction):
        raise RuntimeError(
            f"{v['module']}.{v['kernel']} is a {type(fn).__name__}, not a JITFunction: the module was "
            "imported with TRITON_INTERPRET=1 (compile_isolated compiles in a fresh process)"
        )
    names = fn.arg_names
    src = ASTSource(
        fn,
        v["signature"],
        {(names.index(k),): c for k, c in v["constexprs"].items()},
        {(names.index(k),): a for k, a in v["attrs"].items()},
    )
    kernel = triton.compile(src, target=GPUTarget("cuda", capability, 32), options=dict(v["options"]))
    ptx = kernel.asm["ptx"]
    registers, stores, loads, stack, _ = ptxas_report(ptx, capability)
    meta = kernel.metadata
    matrix = next((op for op in ("wgmma", "mma.sync") if op in ptx), "")
    return Resources(
        capability, meta.num_warps, meta.num_stages, meta.shared, registers, stores, loads, stack, matrix
    ), kernel


def compile_isolated(variants: list[Variant], capabilities=CAPABILITIES, timeout: float = 900.0) -> list[dict]:
    """Compile every variant for every capability in a fresh Python process with Triton's
    interpreter off. One dict per (variant, capability), in that order: ``id``,
    ``capability`` and either the Resources fields or ``error`` (why it did not compile)."""
    env = dict(os.environ, TRITON_INTERPRET="0")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
    request = json.dumps({"capabilities": list(capabilities), "variants": [v.to_json() for v in variants]})
    with tempfile.TemporaryDirectory() as tmp:
        # results go to a file: Triton prints the PTX to stdout when ptxas fails
        out = pathlib.Path(tmp) / "results.json"
        result = subprocess.run(
            [sys.executable, "-m", "tools.triton_aot", str(out)],
            input=request,
            cwd=ROOT,
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout,
        )
        if result.returncode != 0 or not out.exists():
            raise RuntimeError(f"the compiling process failed ({result.returncode}):\n{result.stderr[-8000:]}")
        return json.loads(out.read_text())


def _worker(out: str) -> None:
    """``python -m memkern.kernels._aot OUT``: compile the variants of the JSON request on
    stdin (see compile_isolated) and write the results to the file OUT as JSON."""
    import warnings

    warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")
    request = json.load(sys.stdin)
    results = []
    for v in request["variants"]:
        for capability in request["capabilities"]:
            row = {"id": Variant(**v).id, "capability": capability}
            try:
                resources, _ = compile_variant(v, capability)
                row.update(dataclasses.asdict(resources))
            except Exception as exc:  # reported per variant: one failure must not hide the others
                row["error"] = f"{type(exc).__name__}: {exc}"
            results.append(row)
    pathlib.Path(out).write_text(json.dumps(results))


if __name__ == "__main__":
    _worker(sys.argv[1])
