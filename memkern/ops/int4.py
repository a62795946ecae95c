"""4-bit group-wise weight-only linear layer (W4A16): int4_weight_only_linear, and the
quantisation that produces its weights (quantize_int4, dequantize_int4).

Reads top to bottom: implementations per backend -> op registration (schema, fake,
autograd) -> argument checks -> public functions. The weight format (packing, groups,
asymmetric scale and zero point, and why) is laid out once, in memkern/reference_int4.py.

``y = x @ W.T + bias`` with ``W`` dequantised from its 4-bit codes inside the kernel,
float32 accumulation, y in x's dtype. Backward gives the gradient with respect to ``x``
(and ``bias``) through the dequantised weight, so a frozen 4-bit base model can be
fine-tuned through adapters; the packed weight, scales and zero points get none.
"""

from __future__ import annotations

import operator

import torch

from memkern import _validate, backends, reference_int4
from memkern.ops.linear_checks import FLOAT_DTYPES, as_2d, check_bias, check_x, restore_leading_dims
from memkern.reference_int4 import GROUP_MULTIPLE

# -- implementations ---------------------------------------------------------------------
_int4_table = backends.op_table("int4_weight_only_linear")


@_int4_table.register("torch")
def _int4_torch(x, w_int4, scales, zeros, group_size, bias):
    return reference_int4.int4_weight_only_linear(x, w_int4, scales, zeros, group_size, bias)


@_int4_table.register("cpp", dtypes=FLOAT_DTYPES)
def _int4_cpp(x, w_int4, scales, zeros, group_size, bias):
    # csrc/cpu/int4_linear.cpp: codes dequantised in registers (AVX-512 / AVX2 / scalar).
    return torch.ops.memkern.int4_weight_only_linear_kernel(x, w_int4, scales, zeros, group_size, bias)


@_int4_table.register("triton", dtypes=FLOAT_DTYPES)
def _int4_triton(x, w_int4, scales, zeros, group_size, bias):
    from memkern.kernels.int4 import int4_weight_only_linear as launch

    return launch(x, w_int4, scales, zeros, group_size, bias)


# -- operator ----------------------------------------------------------------------------
@torch.library.custom_op("memkern::int4_weight_only_linear", mutates_args=())
def _int4_op(
    x: torch.Tensor,
    w_int4: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    return _int4_table(x, w_int4, scales, zeros, group_size, bias)


@_int4_op.register_fake
def _int4_fake(x, w_int4, scales, zeros, group_size, bias):
    return x.new_empty((x.shape[0], w_int4.shape[0]))


# -- autograd: d/dx = grad @ W, W dequantised a block of rows at a time --------------------
# Elements of float32 weight dequantised at once in the backward (16 MiB): the backward
# never holds the whole float weight, whatever the layer's size.
_BACKWARD_BLOCK_ELEMENTS = 1 << 22


def _setup(ctx, inputs, output):
    x, w_int4, scales, zeros, group_size, bias = inputs
    ctx.x_dtype, ctx.in_features, ctx.group_size = x.dtype, x.shape[-1], group_size
    ctx.bias_needs_grad = bias is not None and bias.requires_grad
    ctx.bias_dtype = bias.dtype if bias is not None else None
    ctx.save_for_backward(w_int4, scales, zeros)


def _backward(ctx, grad):
    w_int4, scales, zeros = ctx.saved_tensors
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:
        g = grad.float()
        k = ctx.in_features
        grad_x = g.new_zeros((g.shape[0], k))
        rows = max(1, _BACKWARD_BLOCK_ELEMENTS // max(k, 1))
        for n0 in range(0, w_int4.shape[0], rows):
            block = slice(n0, n0 + rows)
            w = reference_int4.dequantize_int4(w_int4[block], scales[block], zeros[block], ctx.group_size, k)
            grad_x.addmm_(g[:, block], w)
        grad_x = grad_x.to(ctx.x_dtype)
    if ctx.bias_needs_grad:
        grad_bias = grad.sum(0, dtype=torch.float32).to(ctx.bias_dtype)
    return grad_x, None, None, None, None, grad_bias


backends.register_autograd(_int4_op, _backward, setup_context=_setup)


# -- argument checks ---------------------------------------------------------------------
def check_group_size(op: str, group_size) -> int:
    """``group_size`` as an int, or a clear error: a positive multiple of 32."""
    try:
        size = operator.index(group_size)
    except TypeError:
        size = None
    if size is None or isinstance(group_size, bool) or size <= 0 or size % GROUP_MULTIPLE:
        raise ValueError(
            f"{op}: group_size must be a positive multiple of {GROUP_MULTIPLE} (32, 64, 128, ...), got {group_size!r}"
        )
    return size


def _groups(k: int, group_size: int) -> int:
    return -(-k // group_size)


def _check_packed(op: str, w_int4, scales, zeros, k: int, group_size: int, k_source: str) -> int:
    """Check the packed weight, scales and zero points for K inputs; return N."""
    _validate.check_tensor(op, "w_int4", w_int4)
    _validate.check_dim(op, "w_int4", w_int4, 2)
    _validate.check_dtype(op, "w_int4", w_int4, (torch.uint8,))
    n = w_int4.shape[0]
    if w_int4.shape[1] != -(-k // 2):
        raise ValueError(
            f"{op}: w_int4 must have shape (N, ceil(K / 2)) = ({n}, {-(-k // 2)}) for {k_source} "
            f"K = {k} (two 4-bit codes a byte), got {tuple(w_int4.shape)}"
        )
    expected = (n, _groups(k, group_size))
    for name, t in (("scales", scales), ("zeros", zeros)):
        _validate.check_tensor(op, name, t)
        _validate.check_dtype(op, name, t, (torch.float32,))
        if tuple(t.shape) != expected:
            raise ValueError(
                f"{op}: {name} must have shape (N, ceil(K / group_size)) = {expected} for K = {k} and "
                f"group_size = {group_size}, got {tuple(t.shape)}"
            )
    return n


# -- public functions --------------------------------------------------------------------
def int4_weight_only_linear(
    x: torch.Tensor,
    w_int4: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """W4A16 linear layer: ``x @ W.T + bias`` with ``W[n, k] = (q[n, k] - zeros[n, g]) *
    scales[n, g]``, ``g = k // group_size``, dequantised inside the kernel, float32
    accumulation. :func:`quantize_int4` makes the weight arguments from a float weight.

    Args:
        x: ``(..., K)`` float32, float16 or bfloat16 activations, any strides.
        w_int4: ``(N, ceil(K / 2))`` uint8, two 4-bit codes a byte, the even k in the low
            nibble (memkern/reference_int4.py).
        scales: ``(N, ceil(K / group_size))`` float32, one scale per group of inputs.
        zeros: ``(N, ceil(K / group_size))`` float32 zero points, in code units (any real
            value; integer zero points are a special case).
        group_size: inputs per group, a positive multiple of 32 (32, 64, 128, ...); K need
            not be a multiple of it (the last group is shorter).
        bias: optional ``(N,)`` float32, float16 or bfloat16.

    Returns:
        ``(..., N)`` tensor of x's dtype. Differentiable with respect to ``x`` and ``bias``.
    """
    op = "int4_weight_only_linear"
    check_x(op, x)
    group_size = check_group_size(op, group_size)
    k = x.shape[-1]
    n = _check_packed(op, w_int4, scales, zeros, k, group_size, "x's last dimension")
    check_bias(op, bias, n, "w_int4.shape[0]")
    _validate.check_same_device(op, x=x, w_int4=w_int4, scales=scales, zeros=zeros, bias=bias)
    return restore_leading_dims(
        backends.call(_int4_op, _int4_table, as_2d(x), w_int4, scales, zeros, group_size, bias), x
    )


def quantize_int4(weight: torch.Tensor, group_size: int = 128) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantise a float ``(N, K)`` weight to 4 bits per group of ``group_size`` inputs
    along K (asymmetric min/max, float zero point; memkern/reference_int4.py says why).

    Returns ``(w_int4, scales, zeros)``: uint8 ``(N, ceil(K / 2))``, float32 and float32
    ``(N, ceil(K / group_size))``, the arguments of :func:`int4_weight_only_linear`.
    Runs on any device, including meta.
    """
    op = "quantize_int4"
    _validate.check_tensor(op, "weight", weight)
    _validate.check_dim(op, "weight", weight, 2)
    if not weight.dtype.is_floating_point:
        raise TypeError(f"{op}: weight must be floating point, got {str(weight.dtype).removeprefix('torch.')}")
    return reference_int4.quantize_int4(weight, check_group_size(op, group_size))


def dequantize_int4(
    w_int4: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int, in_features: int
) -> torch.Tensor:
    """The float32 ``(N, in_features)`` weight that :func:`int4_weight_only_linear`
    multiplies with."""
    op = "dequantize_int4"
    group_size = check_group_size(op, group_size)
    _check_packed(op, w_int4, scales, zeros, in_features, group_size, "in_features")
    _validate.check_same_device(op, w_int4=w_int4, scales=scales, zeros=zeros)
    return reference_int4.dequantize_int4(w_int4, scales, zeros, group_size, in_features)


def int4_cpu_kernel_simd() -> str | None:
    """The vector instructions memkern's C++ int4 kernel was built for: ``"avx512"``,
    ``"avx2"`` or ``"scalar"``; None without the compiled extension."""
    if _int4_table.static_reason("cpp", "cpu") is not None:
        return None
    return str(torch.ops.memkern.int4_kernel_simd())
