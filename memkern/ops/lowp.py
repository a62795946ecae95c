"""Low-precision linear layers: int8_linear (W8A8 dynamic) and int8_linear_packed (the same
from a packed weight layout), int8_weight_only_linear (W8A16) and fp16_linear
(half-precision weights).

Reads top to bottom: implementations per backend -> op registration (schema, fake,
autograd) -> argument checks -> public functions.

Every op computes ``y = x @ W.T + bias`` for a weight ``W`` of shape ``(N, K)`` stored in
low precision, accumulates in float32 (int32 for the int8 x int8 product) and applies the
per-column scale and the bias in the same pass that stores the output. Backward gives the
gradient with respect to ``x`` (and ``bias``) through the dequantised weight, so a frozen,
converted base model still passes gradients to adapters; the stored weights get none.
"""

from __future__ import annotations


import torch

from memkern import _autocast, _validate, backends, reference
from memkern.ops.int8_packing import check_packed, unpack_int8_weight
from memkern.ops.linear_checks import (
    as_2d,
    check_bias,
    check_linear,
    check_out_dtype,
    check_scale,
    check_x,
    restore_leading_dims,
)

FLOAT_DTYPES = _validate.FLOAT_DTYPES
HALF_DTYPES = (torch.float16, torch.bfloat16)

# -- implementations ---------------------------------------------------------------------
# On CUDA, Triton goes first for W8A8: on sm_90 its int8 tl.dot compiles to Hopper's wgmma
# (the PTX of tests/test_triton_gpu_compile.py's build), while csrc/cuda/int8_gemm.cuh
# issues mma.sync, which on Hopper does not reach the tensor cores' full rate.
# `memkern bench --device cuda` times both ("memkern", "memkern cuda").
_int8_table = backends.op_table("int8_linear", preference=backends.TRITON_FIRST)
_w8a16_table = backends.op_table("int8_weight_only_linear")
_fp16_table = backends.op_table("fp16_linear")


@_int8_table.register("torch")
def _int8_linear_torch(x, w_q, w_scale, bias, out_dtype):
    return reference.int8_linear(x, w_q, w_scale, bias, out_dtype)


@_int8_table.register("cpp", dtypes=FLOAT_DTYPES)
@_int8_table.register("cuda", dtypes=FLOAT_DTYPES)
def _int8_linear_compiled(x, w_q, w_scale, bias, out_dtype):
    # CPU: csrc/cpu/int8_linear.cpp (one AVX512-VNNI kernel: quantise, int8 GEMM, epilogue;
    # without VNNI: quantize_rowwise, torch._int_mm, a fused epilogue).
    # CUDA: csrc/cuda/int8_gemm.cu (quantise, tensor-core mma GEMM with fused epilogue).
    return torch.ops.memkern.int8_linear_kernel(x, w_q, w_scale, bias, out_dtype or x.dtype)


@_int8_table.register("triton", dtypes=FLOAT_DTYPES)
def _int8_linear_triton(x, w_q, w_scale, bias, out_dtype):
    from memkern.kernels.int8 import int8_linear as launch

    return launch(x, w_q, w_scale, bias, out_dtype or x.dtype)


# int8_linear_packed: the C++ kernel reads the packed layout; every other backend runs the
# same backend of int8_linear on the weight unpacked (the layout is a CPU kernel's; memkern's
# modules keep it only where int8_packed_kernel_native() says the kernel reads it), in
# int8_linear's order.
_int8_packed_table = backends.op_table("int8_linear_packed", preference=backends.TRITON_FIRST)


@_int8_packed_table.register("cpp", dtypes=FLOAT_DTYPES)
def _int8_linear_packed_cpp(x, w_packed, w_scale, bias, out_dtype):
    # csrc/cpu/int8_linear.cpp: the packed VNNI kernel; without VNNI, unpacks and runs the
    # (N, K) path.
    return torch.ops.memkern.int8_linear_packed_kernel(x, w_packed, w_scale, bias, out_dtype or x.dtype)


def _on_unpacked(backend: str):
    plain = _int8_table.impls[backend]

    def run(x, w_packed, w_scale, bias, out_dtype):
        w_q = unpack_int8_weight(w_packed, w_scale.shape[0], x.shape[-1])
        return plain.fn(x, w_q, w_scale, bias, out_dtype)

    return run


for _backend in ("torch", "cuda", "triton"):
    _int8_packed_table.register(_backend, dtypes=_int8_table.impls[_backend].dtypes)(_on_unpacked(_backend))


@_w8a16_table.register("torch")
def _w8a16_torch(x, w_q, w_scale, bias):
    return reference.int8_weight_only_linear(x, w_q, w_scale, bias)


@_w8a16_table.register("cpp", dtypes=FLOAT_DTYPES)
def _w8a16_cpp(x, w_q, w_scale, bias):
    return torch.ops.memkern.int8_weight_only_linear_kernel(x, w_q, w_scale, bias)


@_w8a16_table.register("triton", dtypes=FLOAT_DTYPES)
def _w8a16_triton(x, w_q, w_scale, bias):
    from memkern.kernels.int8 import scaled_linear as launch

    return launch(x, w_q, w_scale, bias)


@_fp16_table.register("torch")
def _fp16_torch(x, w_half, bias):
    return reference.fp16_linear(x, w_half, bias)


@_fp16_table.register("cpp", dtypes=FLOAT_DTYPES)
def _fp16_cpp(x, w_half, bias):
    return torch.ops.memkern.fp16_linear_kernel(x, w_half, bias)


@_fp16_table.register("triton", dtypes=FLOAT_DTYPES)
def _fp16_triton(x, w_half, bias):
    from memkern.kernels.int8 import scaled_linear as launch

    return launch(x, w_half, None, bias)


# -- operators ---------------------------------------------------------------------------
@torch.library.custom_op("memkern::int8_linear", mutates_args=())
def _int8_linear_op(
    x: torch.Tensor,
    w_q: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype | None,
) -> torch.Tensor:
    return _int8_table(x, w_q, w_scale, bias, out_dtype)


@_int8_linear_op.register_fake
def _int8_linear_fake(x, w_q, w_scale, bias, out_dtype):
    return x.new_empty((x.shape[0], w_q.shape[0]), dtype=out_dtype or x.dtype)


@torch.library.custom_op("memkern::int8_linear_packed", mutates_args=())
def _int8_linear_packed_op(
    x: torch.Tensor,
    w_packed: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype | None,
) -> torch.Tensor:
    return _int8_packed_table(x, w_packed, w_scale, bias, out_dtype)


@_int8_linear_packed_op.register_fake
def _int8_linear_packed_fake(x, w_packed, w_scale, bias, out_dtype):
    return x.new_empty((x.shape[0], w_scale.shape[0]), dtype=out_dtype or x.dtype)


@torch.library.custom_op("memkern::int8_weight_only_linear", mutates_args=())
def _w8a16_op(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return _w8a16_table(x, w_q, w_scale, bias)


@_w8a16_op.register_fake
def _w8a16_fake(x, w_q, w_scale, bias):
    return x.new_empty((x.shape[0], w_q.shape[0]))


@torch.library.custom_op("memkern::fp16_linear", mutates_args=())
def _fp16_op(x: torch.Tensor, w_half: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return _fp16_table(x, w_half, bias)


@_fp16_op.register_fake
def _fp16_fake(x, w_half, bias):
    return x.new_empty((x.shape[0], w_half.shape[0]))


# -- autograd: d/dx through the dequantised weight, computed by the ops themselves ---------
def _bias_grad(ctx, grad: torch.Tensor):
    if not ctx.bias_needs_grad:
        return None
    return grad.sum(0, dtype=torch.float32).to(ctx.bias_dtype)


def _setup_common(ctx, x, bias):
    ctx.x_dtype = x.dtype
    ctx.bias_needs_grad = bias is not None and bias.requires_grad
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _setup_scaled(ctx, inputs, output):
    x, w_q, w_scale, bias = inputs[:4]
    _setup_common(ctx, x, bias)
    ctx.save_for_backward(w_q, w_scale)


def _grad_through_int8(ctx, grad, w_q, w_scale):
    # dx = grad @ (w_scale[:, None] * w_q) = (grad * w_scale) @ w_q: the weight-only op on
    # the transposed int8 weight with unit scales, so no float copy of the weight is made.
    grad_x = None
    if ctx.needs_input_grad[0]:
        g = grad.float() * w_scale
        ones = torch.ones(w_q.shape[1], dtype=torch.float32, device=w_q.device)
        grad_x = _w8a16_op(g, w_q.t(), ones, None).to(ctx.x_dtype)
    return grad_x, None, None, _bias_grad(ctx, grad)


def _scaled_backward(ctx, grad):
    w_q, w_scale = ctx.saved_tensors
    return _grad_through_int8(ctx, grad, w_q, w_scale)


def _int8_backward(ctx, grad):
    return (*_scaled_backward(ctx, grad), None)


def _setup_packed(ctx, inputs, output):
    _setup_scaled(ctx, inputs, output)
    ctx.in_features = inputs[0].shape[-1]


def _int8_packed_backward(ctx, grad):
    w_packed, w_scale = ctx.saved_tensors
    w_q = unpack_int8_weight(w_packed, w_scale.shape[0], ctx.in_features)
    return (*_grad_through_int8(ctx, grad, w_q, w_scale), None)


backends.register_autograd(_int8_linear_op, _int8_backward, setup_context=_setup_scaled)
backends.register_autograd(_int8_linear_packed_op, _int8_packed_backward, setup_context=_setup_packed)
backends.register_autograd(_w8a16_op, _scaled_backward, setup_context=_setup_scaled)


def _setup_fp16(ctx, inputs, output):
    x, w_half, bias = inputs
    _setup_common(ctx, x, bias)
    ctx.save_for_backward(w_half)


def _fp16_backward(ctx, grad):
    (w_half,) = ctx.saved_tensors
    grad_x = None
    if ctx.needs_input_grad[0]:
        grad_x = _fp16_op(grad, w_half.t(), None).to(ctx.x_dtype)
    return grad_x, None, _bias_grad(ctx, grad)


backends.register_autograd(_fp16_op, _fp16_backward, setup_context=_setup_fp16)
# Autocast: x and bias in the autocast dtype, as for torch.nn.functional.linear (so the
# output is in it too); the stored weights and scales are never cast.
for _name in ("int8_linear", "int8_linear_packed", "int8_weight_only_linear", "fp16_linear"):
    _autocast.register(_name, cast=("x", "bias"))


# -- public functions --------------------------------------------------------------------
def int8_linear(
    x: torch.Tensor,
    w_q: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """W8A8 dynamic linear layer: ``x @ (w_q * w_scale[:, None]).T + bias``.

    Each row (token) of ``x`` is quantised to int8 with a symmetric absmax scale exactly as
    :func:`memkern.ops.quantize_rowwise` does; the int8 x int8 product is exact for any K
    (int32 sums over 2^17 inputs, added in int64) and the epilogue ``acc * x_scale[row] *
    w_scale[col] + bias[col]`` runs in float32 before the store.

    Args:
        x: ``(..., K)`` float32, float16 or bfloat16 activations, any strides.
        w_q: ``(N, K)`` int8 weight, one row per output channel (values in [-127, 127] as
            :func:`quantize_rowwise` produces them; -128 also works).
        w_scale: ``(N,)`` float32 per-output-channel weight scales.
        bias: optional ``(N,)`` float32, float16 or bfloat16.
        out_dtype: output dtype, float32, float16 or bfloat16; default x's dtype.

    Returns:
        ``(..., N)`` tensor of ``out_dtype``. A row of x holding NaN or +-inf gives a row
        of NaN (its activation scale is NaN; see quantize_rowwise).

    Differentiable with respect to ``x`` (straight through the activation quantisation,
    through the dequantised weight) and ``bias``.
    """
    op = "int8_linear"
    x2 = check_linear(op, x, w_q, "w_q", (torch.int8,), bias)
    check_scale(op, w_scale, w_q)
    check_out_dtype(op, out_dtype)
    _validate.check_same_device(op, x=x, w_q=w_q, w_scale=w_scale, bias=bias)
    return restore_leading_dims(backends.call(_int8_linear_op, _int8_table, x2, w_q, w_scale, bias, out_dtype), x)


def int8_linear_packed(
    x: torch.Tensor,
    w_packed: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """:func:`int8_linear` from a weight packed by :func:`pack_int8_weight`: the same result,
    bit for bit, and on a CPU with AVX512-VNNI a faster kernel (bench/NOTES.md).

    Args:
        x: ``(..., K)`` float32, float16 or bfloat16 activations, any strides.
        w_packed: ``pack_int8_weight(w_q)`` of an ``(N, K)`` int8 weight.
        w_scale: ``(N,)`` float32 per-output-channel weight scales; N is read from it.
        bias, out_dtype: as :func:`int8_linear`.

    The packed shape fixes N and K only up to its blocks (16 and 4): a weight packed for
    K = 8 also accepts x with K = 7 and then reads its last column against x's zero
    padding. Pass the weight packed for x's K and w_scale's N.
    """
    op = "int8_linear_packed"
    check_x(op, x)
    _validate.check_tensor(op, "w_scale", w_scale)
    _validate.check_dtype(op, "w_scale", w_scale, (torch.float32,))
    _validate.check_dim(op, "w_scale", w_scale, 1)
    n, k = w_scale.shape[0], x.shape[-1]
    check_packed(op, w_packed, n, k)
    check_bias(op, bias, n, "w_scale.shape[0]")
    check_out_dtype(op, out_dtype)
    _validate.check_same_device(op, x=x, w_packed=w_packed, w_scale=w_scale, bias=bias)
    return restore_leading_dims(
        backends.call(_int8_linear_packed_op, _int8_packed_table, as_2d(x), w_packed, w_scale, bias, out_dtype), x
    )


def int8_weight_only_linear(
    x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """W8A16 linear layer: ``x @ (w_q * w_scale[:, None]).T + bias``, int8 weights
    dequantised inside the kernel, float32 accumulation.

    Args:
        x: ``(..., K)`` float32, float16 or bfloat16 activations, any strides.
        w_q: ``(N, K)`` int8 weight, any strides.
        w_scale: ``(N,)`` float32 per-output-channel weight scales.
        bias: optional ``(N,)`` float32, float16 or bfloat16.

    Returns:
        ``(..., N)`` tensor of x's dtype. Differentiable with respect to ``x`` and ``bias``.

    The scale multiplies the float32 sum of ``x * w_q``, so sums of up to ``|x| * 127 * K``
    must fit float32 (3.4e38): bfloat16 activations within ~1e33 of its maximum overflow.
    """
    op = "int8_weight_only_linear"
    x2 = check_linear(op, x, w_q, "w_q", (torch.int8,), bias)
    check_scale(op, w_scale, w_q)
    _validate.check_same_device(op, x=x, w_q=w_q, w_scale=w_scale, bias=bias)
    return restore_leading_dims(backends.call(_w8a16_op, _w8a16_table, x2, w_q, w_scale, bias), x)


def fp16_linear(x: torch.Tensor, w_half: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Linear layer with half-precision weights: ``x @ w_half.T + bias``, float32
    accumulation. On the CPU the weight is widened to float32 in registers as it is read
    (up to 128 rows of x; above, a block of weight rows at a time for the float32 GEMM), so
    no float32 copy of the whole weight is ever made.

    Args:
        x: ``(..., K)`` float32, float16 or bfloat16 activations, any strides.
        w_half: ``(N, K)`` float16 or bfloat16 weight, any strides.
        bias: optional ``(N,)`` float32, float16 or bfloat16.

    Returns:
        ``(..., N)`` tensor of x's dtype. Differentiable with respect to ``x`` and ``bias``.
    """
    op = "fp16_linear"
    x2 = check_linear(op, x, w_half, "w_half", HALF_DTYPES, bias)
    _validate.check_same_device(op, x=x, w_half=w_half, bias=bias)
    return restore_leading_dims(backends.call(_fp16_op, _fp16_table, x2, w_half, bias), x)
