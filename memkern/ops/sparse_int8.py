"""Sparse int8 linear layers: a pruned weight whose kept values are stored in int8.

Both pruned formats of :mod:`memkern.ops.sparse` carry int8 kept values and one float32
scale per output channel (symmetric absmax over the row's kept values, the arithmetic of
:func:`memkern.ops.quantize_rowwise`, so a layer keeping every weight holds the bytes of
:class:`memkern.nn.Int8Linear`):

* block-sparse: ``values`` ``(nnzb, BN, BK)`` int8 kept blocks, indexed by ``crow``/``col``;
  :func:`block_sparse_int8_linear` visits the kept blocks only.
* 2:4: ``values`` ``(N, K/2)`` int8 kept values and the 2-bit positions ``meta``;
  :func:`sparse24_int8_linear` expands the int8 weight (N x K bytes, transient) and runs
  the dense int8 kernels of :mod:`memkern.ops.lowp`; on CUDA, W8A8 runs on PyTorch's
  semi-structured int8 kernels where :func:`semi_structured_int8_reason` allows it.

Each product is W8A8 (activations quantised per token, int8 x int8 summed exactly in
int32/int64, ``acc * x_scale * w_scale + bias`` in float32) or, with ``weight_only``, W8A16
(the int8 weight widened inside the product, float32 accumulation, ``acc * w_scale +
bias``). Output in x's dtype. Differentiable with respect to x (straight through the
activation quantisation, through the dequantised weight) and bias.

Reads top to bottom: quantisation of a pruned weight -> references -> implementations per
backend -> operators (schema, fake, autograd) -> argument checks -> public functions.
"""

from __future__ import annotations

import torch

from memkern import _autocast, _validate, backends, reference
from memkern.ops import semi_structured
from memkern.ops.linear_checks import as_2d, check_bias, check_x, restore_leading_dims
from memkern.ops.quantize import quantize_rowwise
from memkern.ops.semi_structured import semi_structured_int8_reason  # noqa: F401 - the layers' reason, here too
from memkern.ops.sparse_format import BLOCK_SIZES
from memkern.ops.sparse_weights import BlockSparseWeight, Sparse24Weight

FLOAT_DTYPES = _validate.FLOAT_DTYPES


# -- quantisation of a pruned weight ----------------------------------------------------------
def _kernel_dtype(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype in FLOAT_DTYPES else t.float()


def quantize_block_sparse(weight: BlockSparseWeight) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values_int8, scales)`` of a block-sparse weight: the kept blocks quantised with one
    scale per output row over the row's kept values (pruned elements inside kept blocks
    count as zero, and stay exactly zero). ``values_int8`` has ``weight.values``' shape."""
    values = weight.effective_values().detach()
    n_out = weight.shape[0]
    nnzb, bn, bk = values.shape
    q = torch.zeros(values.shape, dtype=torch.int8, device=values.device)
    scales = torch.ones(-(-n_out // bn) * bn, dtype=torch.float32, device=values.device)
    if values.is_meta:  # no values to quantise: the layout alone, to load a state into
        return q, scales[:n_out]
    crow = weight.crow.tolist()
    for r in range(len(crow) - 1):
        start, end = crow[r], crow[r + 1]
        if start == end:
            continue  # an empty block row: its outputs are the bias; scale 1 as for a zero row
        # The block row's kept values as (BN, kept * BK) rows: one output channel a row.
        rows = _kernel_dtype(values[start:end]).permute(1, 0, 2).reshape(bn, (end - start) * bk)
        q_rows, scales[r * bn : (r + 1) * bn] = quantize_rowwise(rows)
        q[start:end] = q_rows.reshape(bn, end - start, bk).permute(1, 0, 2)
    return q, scales[:n_out]


def quantize_sparse24(weight: Sparse24Weight) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values_int8, scales)`` of a 2:4 weight: ``values`` ``(N, K/2)`` quantised per row
    (free slots hold zero and stay zero)."""
    values = _kernel_dtype(weight.effective_values().detach())
    if values.is_meta:
        return torch.zeros(values.shape, dtype=torch.int8, device="meta"), torch.ones(
            values.shape[0], dtype=torch.float32, device="meta"
        )
    return quantize_rowwise(values)


# -- references ---------------------------------------------------------------------------------
def _dense_int8_linear(x, w_q, scales, bias, weight_only):
    if weight_only:
        return reference.int8_weight_only_linear(x, w_q, scales, bias)
    return reference.int8_linear(x, w_q, scales, bias)


def block_sparse_int8_reference(x, values, scales, crow, col, bias, weight_only):
    """The block-sparse product on the dense int8 weight (pruned blocks are int8 zeros)."""
    w_q = reference.block_sparse_to_dense(values, crow, col, scales.shape[0], x.shape[1])
    return _dense_int8_linear(x, w_q, scales, bias, weight_only)


def sparse24_int8_reference(x, values, meta, scales, bias, weight_only):
    w_q = reference.sparse24_decompress(values, meta, x.shape[1])
    return _dense_int8_linear(x, w_q, scales, bias, weight_only)


# -- implementations ----------------------------------------------------------------------------
_block_table = backends.op_table("block_sparse_int8_linear")
_s24_table = backends.op_table("sparse24_int8_linear")

_block_table.register("torch")(block_sparse_int8_reference)


@_block_table.register("cpp", dtypes=FLOAT_DTYPES)
def _block_cpp(x, values, scales, crow, col, bias, weight_only):
    # csrc/cpu/sparse_int8_linear.cpp: quantise x per row, int8 products over the kept
    # blocks only (AVX512-VNNI where the CPU has it, a portable loop elsewhere), epilogue.
    return torch.ops.memkern.block_sparse_int8_linear_kernel(x, values, scales, crow, col, bias, weight_only)


@_block_table.register("triton", dtypes=FLOAT_DTYPES)
def _block_triton(x, values, scales, crow, col, bias, weight_only):
    from memkern.kernels.sparse_int8 import block_sparse_int8_linear as launch

    return launch(x, values, scales, crow, col, bias, weight_only)


_s24_table.register("torch")(sparse24_int8_reference)


def _s24_on_dense(dense_table: str, weight_only_table: str, backend: str):
    # 2:4 int8 expands the weight to (N, K) int8 (its bytes, transient) and runs the dense
    # int8 op's implementation of the same backend: memkern has no int8 2:4 kernel of its own.
    def run(x, values, meta, scales, bias, weight_only):
        w_q = reference.sparse24_decompress(values, meta, x.shape[1])
        if weight_only:
            return backends.OPS[weight_only_table].impls[backend].fn(x, w_q, scales, bias)
        return backends.OPS[dense_table].impls[backend].fn(x, w_q, scales, bias, None)

    return run


for _backend in ("cpp", "triton"):
    _s24_table.register(_backend, dtypes=FLOAT_DTYPES)(
        _s24_on_dense("int8_linear", "int8_weight_only_linear", _backend)
    )


# -- operators ----------------------------------------------------------------------------------
@torch.library.custom_op("memkern::block_sparse_int8_linear", mutates_args=())
def block_sparse_int8_linear_op(
    x: torch.Tensor,
    values: torch.Tensor,
    scales: torch.Tensor,
    crow: torch.Tensor,
    col: torch.Tensor,
    bias: torch.Tensor | None,
    weight_only: bool,
) -> torch.Tensor:
    return _block_table(x, values, scales, crow, col, bias, weight_only)


@block_sparse_int8_linear_op.register_fake
def _block_fake(x, values, scales, crow, col, bias, weight_only):
    return x.new_empty((x.shape[0], scales.shape[0]))


@torch.library.custom_op("memkern::sparse24_int8_linear", mutates_args=())
def sparse24_int8_linear_op(
    x: torch.Tensor,
    values: torch.Tensor,
    meta: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
    weight_only: bool,
) -> torch.Tensor:
    return _s24_table(x, values, meta, scales, bias, weight_only)


@sparse24_int8_linear_op.register_fake
def _s24_fake(x, values, meta, scales, bias, weight_only):
    return x.new_empty((x.shape[0], scales.shape[0]))


# -- autograd: d/dx through the dequantised weight (the stored int8 values get none) -----------
def _setup(ctx, inputs, output, weight_tensors):
    x, bias = inputs[0], inputs[-2]
    ctx.x_dtype, ctx.in_features = x.dtype, x.shape[1]
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.save_for_backward(*weight_tensors)


def _grads(ctx, grad, w_q, scales):
    # A dense float32 copy of the weight for the backward only: inference is what these
    # layers are for, and this keeps adapters trainable on top of them.
    grad_x = None
    if ctx.needs_input_grad[0]:
        grad_x = ((grad.float() * scales) @ w_q.float()).to(ctx.x_dtype)
    grad_bias = None if ctx.bias_dtype is None else grad.sum(0, dtype=torch.float32).to(ctx.bias_dtype)
    return grad_x, grad_bias


def _block_backward(ctx, grad):
    values, scales, crow, col = ctx.saved_tensors
    w_q = reference.block_sparse_to_dense(values, crow, col, scales.shape[0], ctx.in_features)
    grad_x, grad_bias = _grads(ctx, grad, w_q, scales)
    return grad_x, None, None, None, None, grad_bias, None


def _s24_backward(ctx, grad):
    values, meta, scales = ctx.saved_tensors
    grad_x, grad_bias = _grads(ctx, grad, reference.sparse24_decompress(values, meta, ctx.in_features), scales)
    return grad_x, None, None, None, grad_bias, None


backends.register_autograd(
    block_sparse_int8_linear_op,
    _block_backward,
    setup_context=lambda ctx, inputs, output: _setup(ctx, inputs, output, inputs[1:5]),
)
backends.register_autograd(
    sparse24_int8_linear_op,
    _s24_backward,
    setup_context=lambda ctx, inputs, output: _setup(ctx, inputs, output, inputs[1:4]),
)
# Autocast: x and bias in the autocast dtype, as for torch.nn.functional.linear; the int8
# values and float32 scales are never cast.
for _name in ("block_sparse_int8_linear", "sparse24_int8_linear"):
    _autocast.register(_name, cast=("x", "bias"))


# -- 2:4 W8A8 on PyTorch's semi-structured int8 kernels (CUDA; semi_structured_int8_reason) ---
class _SemiStructuredInt8Product(torch.autograd.Function):
    """The op's W8A8 arithmetic with the int32 sums from the semi-structured copy; the
    arguments in the op's order (the copy, boxed so autograd ignores it, last), so its
    setup and backward serve unchanged."""

    @staticmethod
    def forward(ctx, x, values, meta, scales, bias, boxed_w_semi):
        _setup(ctx, (x, values, meta, scales, bias, boxed_w_semi), None, (values, meta, scales))
        x_q, x_scale = quantize_rowwise(x)
        acc = semi_structured.semi_structured_int8_mm(x_q, boxed_w_semi[0])
        # The epilogue of every int8 kernel: scales multiplied first (reference.int8_linear).
        # acc is a transposed view: widened into a row-major tensor, so y is contiguous too.
        out = acc.to(torch.float32, memory_format=torch.contiguous_format)
        out = out * (x_scale[:, None] * scales[None, :])
        if bias is not None:
            out = out + bias.float()
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        return _s24_backward(ctx, grad)


def _sparse24_semi_structured(x, values, meta, scales, bias, weight_only):
    """The 2:4 product on PyTorch's semi-structured int8 kernels, or None where they do not
    run it (the caller then runs the op)."""
    if semi_structured.semi_structured_int8_reason(x, values, meta, weight_only=weight_only) is not None:
        semi_structured.release_int8_copy(values)
        return None
    w_semi = semi_structured.semi_structured_int8_weight(values, meta, x.shape[1])
    if w_semi is None:
        return None
    # The casts the op's autocast rule makes (recorded by autograd); nothing after them is cast.
    x = x.to(_autocast.dtype_seen(x))
    bias = None if bias is None else bias.to(_autocast.dtype_seen(bias))
    try:
        return _SemiStructuredInt8Product.apply(x, values, meta, scales, bias, (w_semi,))
    except torch.cuda.OutOfMemoryError:
        raise  # this call's trouble, not the kernel's: the next call may fit
    except RuntimeError as exc:
        # A limit the predicate cannot see (a cuSPARSELt without int32 output, say): the
        # op gives the answer, now and until the tensors change.
        semi_structured.remember_int8_failure(
            values, meta, x.shape[1], f"the semi-structured int8 product failed: {exc}"
        )
        return None


# -- argument checks ----------------------------------------------------------------------------
def _check_scales(op: str, scales) -> int:
    _validate.check_tensor(op, "scales", scales)
    _validate.check_dtype(op, "scales", scales, (torch.float32,))
    _validate.check_dim(op, "scales", scales, 1)
    return scales.shape[0]


def check_block_args(op: str, x, values, scales, crow, col, bias) -> None:
    """Shapes, dtypes and devices of a block-sparse int8 product, and the index bounds the
    kernels' memory accesses rely on (row pointers from 0 to nnzb without decreasing,
    block columns inside the matrix)."""
    check_x(op, x)
    _validate.check_tensor(op, "values", values)
    _validate.check_dtype(op, "values", values, (torch.int8,))
    if values.dim() != 3 or values.shape[1] not in BLOCK_SIZES or values.shape[2] not in BLOCK_SIZES:
        raise ValueError(
            f"{op}: values must be (blocks, BN, BK) with BN and BK in {list(BLOCK_SIZES)}, "
            f"got shape {tuple(values.shape)}"
        )
    n = _check_scales(op, scales)
    nnzb, bn, bk = values.shape
    n_block_rows, n_block_cols = -(-n // bn), -(-x.shape[-1] // bk)
    for name, t, length in (("crow", crow, n_block_rows + 1), ("col", col, nnzb)):
        _validate.check_tensor(op, name, t)
        _validate.check_dtype(op, name, t, (torch.int64,))
        if tuple(t.shape) != (length,):
            raise ValueError(
                f"{op}: {name} must have shape ({length},) ({n_block_rows} block rows of {bn} for "
                f"N = scales.shape[0] = {n}, {nnzb} blocks in values), got {tuple(t.shape)}"
            )
    check_bias(op, bias, n, "scales.shape[0]")
    _validate.check_same_device(op, x=x, values=values, scales=scales, crow=crow, col=col, bias=bias)
    if values.is_meta or x.is_meta:
        return
    if not bool((crow[0] == 0) & (crow[-1] == nnzb) & (crow.diff() >= 0).all()):
        raise ValueError(f"{op}: crow must run from 0 to {nnzb} (the number of blocks) without decreasing")
    if nnzb and not bool(((col >= 0) & (col < n_block_cols)).all()):
        raise ValueError(
            f"{op}: col must hold block columns in [0, {n_block_cols}) (K = {x.shape[-1]}, blocks of {bk}); "
            f"got values from {int(col.min())} to {int(col.max())}"
        )


def check_sparse24_args(op: str, x, values, meta, scales, bias) -> None:
    check_x(op, x)
    n = _check_scales(op, scales)
    k = x.shape[-1]
    if k % 4:
        raise ValueError(f"{op}: 2:4 needs in_features divisible by 4, got x of shape {tuple(x.shape)}")
    expected = (("values", values, (n, k // 2), torch.int8), ("meta", meta, (n, (k + 7) // 8), torch.uint8))
    for name, t, shape, dtype in expected:
        _validate.check_tensor(op, name, t)
        _validate.check_dtype(op, name, t, (dtype,))
        if tuple(t.shape) != shape:
            raise ValueError(
                f"{op}: {name} must have shape {shape} (N = scales.shape[0] = {n}, K = {k}), got {tuple(t.shape)}"
            )
    check_bias(op, bias, n, "scales.shape[0]")
    _validate.check_same_device(op, x=x, values=values, meta=meta, scales=scales, bias=bias)


# -- public functions ---------------------------------------------------------------------------
def run_block_sparse(x, values, scales, crow, col, bias, weight_only: bool) -> torch.Tensor:
    """:func:`block_sparse_int8_linear` on arguments already checked (the module checks its
    structure once, not per call)."""
    y = backends.call(block_sparse_int8_linear_op, _block_table, as_2d(x), values, scales, crow, col, bias, weight_only)
    return restore_leading_dims(y, x)


def run_sparse24(x, values, meta, scales, bias, weight_only: bool) -> torch.Tensor:
    """:func:`sparse24_int8_linear` on arguments already checked."""
    x2 = as_2d(x)
    y = _sparse24_semi_structured(x2, values, meta, scales, bias, weight_only)
    if y is None:
        y = backends.call(sparse24_int8_linear_op, _s24_table, x2, values, meta, scales, bias, weight_only)
    return restore_leading_dims(y, x)


def block_sparse_int8_linear(
    x: torch.Tensor,
    values: torch.Tensor,
    scales: torch.Tensor,
    crow: torch.Tensor,
    col: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    weight_only: bool = False,
) -> torch.Tensor:
    """``x @ (W_q * scales[:, None]).T + bias`` for a block-sparse int8 weight, visiting only
    the kept blocks.

    Args:
        x: ``(..., K)`` float32, float16 or bfloat16 activations, any strides.
        values: ``(nnzb, BN, BK)`` int8 kept blocks in block-row order (BN, BK in 16..128),
            zero past the matrix edge; from :func:`quantize_block_sparse`.
        scales: ``(N,)`` float32 per-output-channel scales.
        crow: ``(ceil(N / BN) + 1,)`` int64 row pointer; ``col``: ``(nnzb,)`` int64 block
            column of each block (as :class:`memkern.ops.BlockSparseWeight`).
        bias: optional ``(N,)`` float32, float16 or bfloat16.
        weight_only: W8A16 (x kept in its dtype) instead of W8A8 (x quantised per row as
            :func:`memkern.ops.int8_linear` does).

    Returns:
        ``(..., N)`` tensor of x's dtype. W8A8: exact int8 products, so every backend gives
        the reference's float32 epilogue result; a row of x holding NaN or inf gives a row
        of NaN. W8A16: float32 accumulation over kept blocks only.
    """
    check_block_args("block_sparse_int8_linear", x, values, scales, crow, col, bias)
    return run_block_sparse(x, values, scales, crow, col, bias, weight_only)


def sparse24_int8_linear(
    x: torch.Tensor,
    values: torch.Tensor,
    meta: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    weight_only: bool = False,
) -> torch.Tensor:
    """``x @ (W_q * scales[:, None]).T + bias`` for a 2:4 int8 weight.

    Args:
        x: ``(..., K)`` float32, float16 or bfloat16, K a multiple of 4.
        values: ``(N, K/2)`` int8 kept values; ``meta``: ``(N, ceil(K/8))`` uint8 positions
            (as :class:`memkern.ops.Sparse24Weight`).
        scales, bias, weight_only: as :func:`block_sparse_int8_linear`.

    What runs:

    * CUDA, W8A8, when :func:`semi_structured_int8_reason` returns None (compute capability
      >= 8.0, a shape the kernel takes, no forced backend, not under ``torch.compile``):
      x quantised per token by :func:`memkern.ops.quantize_rowwise`, its product with the
      int8 kept values on PyTorch's semi-structured kernels (cuSPARSELt, or CUTLASS) summed
      exactly in int32, then the float32 epilogue of every backend; the semi-structured
      copy is built once per state of ``values``/``meta`` and kept while ``values`` lives.
      The arithmetic of the memkern op (exact integer sums, the same epilogue). A build
      or product failure is remembered (the reason says it), warned once, and the call
      runs the op.
    * Otherwise (CPU; W8A16, which PyTorch's semi-structured kernels do not multiply;
      CUDA where the reason says no): every backend expands the int8 weight (N x K bytes,
      for the call only) and runs its dense int8 kernel (:func:`memkern.ops.int8_linear`,
      :func:`memkern.ops.int8_weight_only_linear`).
    """
    check_sparse24_args("sparse24_int8_linear", x, values, meta, scales, bias)
    return run_sparse24(x, values, meta, scales, bias, weight_only)
