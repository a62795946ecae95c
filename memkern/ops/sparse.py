"""Sparse-masked matrix products for pruned weights: ``masked_matmul(x, weight, bias)``.

Two storages of a pruned weight W (out_features x in_features) with mask M:

* :class:`BlockSparseWeight`: only the kept (BN x BK) blocks (values + block indices, in
  row order for the forward and column order for ``dx``), plus an optional element mask
  inside kept blocks so unstructured masks also work. At 50% block sparsity it holds about
  half the dense weight.
* :class:`Sparse24Weight`: a 2:4 weight (at most 2 kept values in every 4 consecutive
  input columns) as kept values (half the columns) + 2-bit positions: 9/16 of dense fp16.
  On CUDA, when :func:`semi_structured_reason` allows it, the product runs on PyTorch's
  semi-structured sparse kernels (cuSPARSELt or CUTLASS) instead of memkern's op.

Where each part lives: the storages in :mod:`memkern.ops.sparse_weights`, their structure
checks (untrusted tensors) in :mod:`memkern.ops.sparse_format`, the operators and their
backends in :mod:`memkern.ops.sparse_ops`, PyTorch's semi-structured path for 2:4 in
:mod:`memkern.ops.semi_structured`; this module holds the public function.
"""

from __future__ import annotations

import torch

from memkern import _autocast, _validate, backends
from memkern.ops import semi_structured
from memkern.ops.semi_structured import semi_structured_reason
from memkern.ops.sparse_ops import (
    block_sparse_matmul_op,
    block_sparse_matmul_table,
    sparse24_matmul_op,
    sparse24_matmul_table,
)
from memkern.ops.sparse_weights import BlockSparseWeight, Sparse24Weight

__all__ = ["BlockSparseWeight", "Sparse24Weight", "masked_matmul", "semi_structured_reason"]


# -- public function -------------------------------------------------------------------------
def masked_matmul(
    x: torch.Tensor, weight: BlockSparseWeight | Sparse24Weight, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``x @ (W * M)^T + bias`` for a pruned weight, visiting only kept blocks / values.

    Args:
        x: ``(..., in_features)`` float32, float16 or bfloat16, the weight's dtype and
            device, any strides (e.g. ``(N, K)`` or ``(B, T, K)``).
        weight: a :class:`BlockSparseWeight` or :class:`Sparse24Weight` of shape
            ``(out_features, in_features)``.
        bias: optional ``(out_features,)`` tensor of x's dtype.

    Returns:
        ``(..., out_features)`` tensor of x's dtype; products accumulate in float32.

    Differentiable in ``x``, ``weight.values`` and ``bias``. The weight gradient exists only
    for stored (kept) values, so pruned weights stay exactly zero under any optimiser.
    ``in_features`` may be 0: the output is then the bias (or zeros).

    NaN or inf in ``x`` propagates through every kept weight (including zeros inside kept
    blocks and 2:4 groups). Pruned blocks are skipped, so a non-finite x meeting only pruned
    blocks leaves the output finite on the block-skipping backends (cpp, triton), whereas the
    ``torch`` reference, a dense product with zeros, gives NaN there (NaN * 0).

    What runs for a :class:`Sparse24Weight`:

    * CPU: the memkern 2:4 op (C++: expand the weight, one dense product).
    * CUDA, when :func:`semi_structured_reason` returns None (fp16/bf16, compute
      capability >= 8.0, no gradient of ``weight.values`` wanted, no forced backend,
      supported shape, not under ``torch.compile``): PyTorch's semi-structured sparse
      kernels (cuSPARSELt, or CUTLASS) through ``F.linear`` on a
      ``SparseSemiStructuredTensor`` built once per weight state and cached on the weight.
      Gradients of x and bias are computed as by the memkern op. Accumulation follows
      PyTorch's kernels.
    * CUDA otherwise: the memkern 2:4 op (expand the weight with memkern's kernel, then one
      dense product); training always takes this path, since it gives the kept values'
      gradient. ``semi_structured_reason(x, weight)`` says why a call took it.
    """
    op = "masked_matmul"
    _validate.check_tensor(op, "x", x)
    if not isinstance(weight, (BlockSparseWeight, Sparse24Weight)):
        raise TypeError(f"{op}: weight must be a BlockSparseWeight or Sparse24Weight, got {type(weight).__name__}")
    weight.check(op, "weight.")  # again only if its tensors were replaced or its index changed in place
    _validate.check_dtype(op, "x", x, _validate.FLOAT_DTYPES)
    if x.dim() < 1:
        raise ValueError(f"{op}: x must be at least 1-D, got 0-D")
    n_out, k = weight.shape
    if x.shape[-1] != k:
        raise ValueError(f"{op}: x's last dimension must be in_features={k}, got shape {tuple(x.shape)}")
    if _autocast.dtype_seen(x) != _autocast.dtype_seen(weight.values):  # autocast casts both
        raise TypeError(f"{op}: x must have the weight's dtype {weight.dtype}; got {x.dtype}")
    if bias is not None:
        _validate.check_tensor(op, "bias", bias)
        if bias.shape != (n_out,):
            raise ValueError(f"{op}: bias must have shape ({n_out},), got {tuple(bias.shape)}")
        if _autocast.dtype_seen(bias) != _autocast.dtype_seen(x):
            raise TypeError(f"{op}: bias must have x's dtype {x.dtype}; got {bias.dtype}")
    _validate.check_same_device(op, x=x, weight=weight.values, bias=bias)
    lead = x.shape[:-1]
    x2 = x.reshape(lead.numel(), k)  # not -1: in_features may be 0
    if isinstance(weight, BlockSparseWeight):
        y = backends.call(
            block_sparse_matmul_op,
            block_sparse_matmul_table,
            x2,
            weight.effective_values(),
            weight.crow,
            weight.col,
            weight.ccol,
            weight.csc_row,
            weight.csc_block,
            n_out,
            bias,
        )
    else:
        values = weight.effective_values()
        w_semi = (
            semi_structured.semi_structured_weight(weight)
            if semi_structured.semi_structured_reason(x2, weight) is None
            else None
        )
        if w_semi is not None:
            y = semi_structured.SemiStructuredProduct.apply(x2, bias, values, weight.meta, (w_semi,))
        else:
            cache = weight.semi_structured_cache
            if cache is not None and cache.failure is None:
                # Not used on this call (training, a CPU copy, ...): free the device copy; a
                # remembered build failure stays, so the build is not retried every call.
                weight.semi_structured_cache = None
            y = backends.call(sparse24_matmul_op, sparse24_matmul_table, x2, values, weight.meta, bias)
    # Not a view of the 2-D product (F.linear's output is none either): FSDP2 hooks a
    # module's output for backward, and an in-place op on a view (y += residual) drops that.
    return torch.ops.aten._unsafe_view(y, (*lead, n_out))
