"""The sparse operators under masked_matmul: implementations per backend, their tables,
and the ``torch.library`` ops (schema, fake, autograd): the block-sparse product and its
backward, and the 2:4 compress / decompress / product.
"""

from __future__ import annotations

import torch

from memkern import _autocast, _validate, backends, reference
from memkern.ops import sparse_format
from memkern.ops._autograd import dense_matmul_grads, save_matmul_inputs

# The C++ block-sparse kernels also take float64 (gradcheck on the CPU path); the public
# function accepts the float dtypes only.
_CPP_DTYPES = (*_validate.FLOAT_DTYPES, torch.float64)


# -- implementations: block-sparse product -----------------------------------------------
_fwd = block_sparse_matmul_table = backends.op_table("block_sparse_matmul")
_bwd = backends.op_table("block_sparse_matmul_backward")


@_fwd.register("torch")
def _bsmm_torch(x, values, crow, col, ccol, csc_row, csc_block, n_out, bias):
    return reference.block_sparse_matmul(x, values, crow, col, n_out, bias)


@_fwd.register("cpp", dtypes=_CPP_DTYPES)
def _bsmm_cpp(x, values, crow, col, ccol, csc_row, csc_block, n_out, bias):
    return torch.ops.memkern.block_sparse_matmul_kernel(x, values, crow, col, n_out, bias)


@_fwd.register("triton", dtypes=_validate.FLOAT_DTYPES)
def _bsmm_triton(x, values, crow, col, ccol, csc_row, csc_block, n_out, bias):
    from memkern.kernels.sparse import block_sparse_matmul as launch

    return launch(x, values, crow, col, n_out, bias)


@_bwd.register("torch")
def _bsmm_bwd_torch(grad, x, values, crow, col, ccol, csc_row, csc_block):
    # Dense reference of both gradients; dW is read back only at the kept blocks.
    n_out, k = grad.shape[1], x.shape[1]
    nnzb, bn, bk = values.shape
    w = reference.block_sparse_to_dense(values, crow, col, n_out, k)
    dx, dw, _ = dense_matmul_grads(grad, x, w, has_bias=False)
    n_br, n_bc = -(-n_out // bn), -(-k // bk)
    padded = dw.new_zeros(n_br * bn, n_bc * bk)
    padded[:n_out, :k] = dw
    grid = padded.reshape(n_br, bn, n_bc, bk).permute(0, 2, 1, 3)
    rows = torch.repeat_interleave(torch.arange(n_br, device=crow.device), crow.diff())
    return dx, sparse_format.row_panel_layout(grid[rows, col].to(values.dtype))


@_bwd.register("cpp", dtypes=_CPP_DTYPES)
def _bsmm_bwd_cpp(grad, x, values, crow, col, ccol, csc_row, csc_block):
    return torch.ops.memkern.block_sparse_matmul_backward_kernel(grad, x, values, crow, col, ccol, csc_row, csc_block)


@_bwd.register("triton", dtypes=_validate.FLOAT_DTYPES)
def _bsmm_bwd_triton(grad, x, values, crow, col, ccol, csc_row, csc_block):
    from memkern.kernels.sparse import block_sparse_matmul_backward as launch

    return launch(grad, x, values, crow, col, ccol, csc_row, csc_block)


# -- implementations: 2:4 compress / decompress / product -------------------------------
_compress = backends.op_table("sparse24_compress")
_decompress = backends.op_table("sparse24_decompress")
_s24 = sparse24_matmul_table = backends.op_table("sparse24_matmul")


@_compress.register("torch")
def _compress_torch(weight, mask):
    return reference.sparse24_compress(weight, mask)


@_compress.register("cpp", dtypes=_validate.FLOAT_DTYPES)
@_compress.register("cuda", dtypes=_validate.FLOAT_DTYPES)
def _compress_compiled(weight, mask):
    return torch.ops.memkern.sparse24_compress_kernel(weight, mask)


@_decompress.register("torch")
def _decompress_torch(values, meta, cols):
    return reference.sparse24_decompress(values, meta, cols)


@_decompress.register("cpp", dtypes=_validate.FLOAT_DTYPES)
@_decompress.register("cuda", dtypes=_validate.FLOAT_DTYPES)
def _decompress_compiled(values, meta, cols):
    return torch.ops.memkern.sparse24_decompress_kernel(values, meta, cols)


@_decompress.register("triton", dtypes=_validate.FLOAT_DTYPES)
def _decompress_triton(values, meta, cols):
    from memkern.kernels.sparse import sparse24_decompress as launch

    return launch(values, meta, cols)


@_s24.register("torch")
def _s24_torch(x, values, meta, bias):
    return reference.sparse24_matmul(x, values, meta, bias)


def _s24_dense(x, values, meta, bias):
    # Expand once with the compiled kernel, then one dense product: on the CPU this saves
    # memory (the weight lives compressed) but not time; fp16/bf16 accumulate in fp32.
    w = torch.ops.memkern.sparse24_decompress_kernel(values, meta, x.shape[1])
    if x.device.type == "cpu":
        y = torch.nn.functional.linear(x.float(), w.float(), None if bias is None else bias.float())
        return y.to(x.dtype)
    return torch.nn.functional.linear(x, w, bias)


_s24.register("cpp", dtypes=_validate.FLOAT_DTYPES)(_s24_dense)
_s24.register("cuda", dtypes=_validate.FLOAT_DTYPES)(_s24_dense)


@_s24.register("triton", dtypes=_validate.FLOAT_DTYPES)
def _s24_triton(x, values, meta, bias):
    from memkern.kernels.sparse import sparse24_matmul as launch

    return launch(x, values.contiguous(), meta.contiguous(), bias)


# -- operators -----------------------------------------------------------------------------
@torch.library.custom_op("memkern::block_sparse_matmul", mutates_args=())
def block_sparse_matmul_op(
    x: torch.Tensor,
    values: torch.Tensor,
    crow: torch.Tensor,
    col: torch.Tensor,
    ccol: torch.Tensor,
    csc_row: torch.Tensor,
    csc_block: torch.Tensor,
    n_out: int,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    return _fwd(x, values, crow, col, ccol, csc_row, csc_block, n_out, bias)


@block_sparse_matmul_op.register_fake
def _bsmm_fake(x, values, crow, col, ccol, csc_row, csc_block, n_out, bias):
    return x.new_empty((x.shape[0], n_out))


@torch.library.custom_op("memkern::block_sparse_matmul_backward", mutates_args=())
def _bsmm_bwd_op(
    grad: torch.Tensor,
    x: torch.Tensor,
    values: torch.Tensor,
    crow: torch.Tensor,
    col: torch.Tensor,
    ccol: torch.Tensor,
    csc_row: torch.Tensor,
    csc_block: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _bwd(grad, x, values, crow, col, ccol, csc_row, csc_block)


@_bsmm_bwd_op.register_fake
def _bsmm_bwd_fake(grad, x, values, crow, col, ccol, csc_row, csc_block):
    return x.new_empty(x.shape), sparse_format.row_panel_layout(values.new_empty(values.shape))


def _bsmm_backward(ctx, grad):
    x, values, crow, col, ccol, csc_row, csc_block = ctx.saved_tensors
    dx, dv = _bsmm_bwd_op(grad.contiguous(), x, values, crow, col, ccol, csc_row, csc_block)
    db = grad.float().sum(0).to(grad.dtype) if ctx.has_bias else None
    return dx, dv, None, None, None, None, None, None, db


backends.register_autograd(block_sparse_matmul_op, _bsmm_backward, setup_context=save_matmul_inputs)


@torch.library.custom_op("memkern::sparse24_compress", mutates_args=())
def sparse24_compress_op(weight: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _compress(weight, mask)


@sparse24_compress_op.register_fake
def _compress_fake(weight, mask):
    rows, cols = weight.shape
    return weight.new_empty((rows, cols // 2)), weight.new_empty((rows, (cols + 7) // 8), dtype=torch.uint8)


@torch.library.custom_op("memkern::sparse24_decompress", mutates_args=())
def sparse24_decompress_op(values: torch.Tensor, meta: torch.Tensor, cols: int) -> torch.Tensor:
    return _decompress(values, meta, cols)


@sparse24_decompress_op.register_fake
def _decompress_fake(values, meta, cols):
    return values.new_empty((values.shape[0], cols))


@torch.library.custom_op("memkern::sparse24_matmul", mutates_args=())
def sparse24_matmul_op(
    x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    return _s24(x, values, meta, bias)


@sparse24_matmul_op.register_fake
def _s24_fake(x, values, meta, bias):
    return x.new_empty((x.shape[0], values.shape[0]))


def _s24_backward(ctx, grad):
    x, values, meta = ctx.saved_tensors
    cols = x.shape[1]
    dx, dw, db = dense_matmul_grads(grad, x, sparse24_decompress_op(values, meta, cols), ctx.has_bias)
    # dW only at the two slots of each group: positions outside the 2:4 pattern have no
    # storage, so they cannot be revived by any optimiser.
    dw = dw.reshape(values.shape[0], cols // 4, 4)
    dv = torch.gather(dw, 2, sparse_format.kept_positions(meta, cols)).reshape(values.shape).to(values.dtype)
    return dx, dv, None, db


backends.register_autograd(sparse24_matmul_op, _s24_backward, setup_context=save_matmul_inputs)
# Autocast: the products take x, the kept values and bias in the autocast dtype, as
# torch.nn.functional.linear would; the rest runs as called.
for _name in ("block_sparse_matmul", "sparse24_matmul"):
    _autocast.register(_name, cast=("x", "values", "bias"))
for _name in ("block_sparse_matmul_backward", "sparse24_compress", "sparse24_decompress"):
    _autocast.register(_name)
