"""quantize_rowwise: symmetric absmax int8 quantisation per row.

Reads top to bottom: reference -> kernel launchers -> backend table -> op registration
(schema, fake) -> public function.
"""

from __future__ import annotations

import torch

from memkern import _autocast, _validate, backends, reference

# -- implementations ---------------------------------------------------------------------
_table = backends.op_table("quantize_rowwise")


@_table.register("torch")
def _quantize_rowwise_torch(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return reference.quantize_rowwise(x)


@_table.register("cpp", dtypes=_validate.FLOAT_DTYPES)
@_table.register("cuda", dtypes=_validate.FLOAT_DTYPES)
def _quantize_rowwise_compiled(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # One schema, dispatched by device to csrc/cpu or csrc/cuda.
    return torch.ops.memkern.quantize_rowwise_kernel(x)


@_table.register("triton", dtypes=_validate.FLOAT_DTYPES)
def _quantize_rowwise_triton(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from memkern.kernels.quantize import quantize_rowwise as launch

    return launch(x)


# -- operator ----------------------------------------------------------------------------
@torch.library.custom_op("memkern::quantize_rowwise", mutates_args=())
def _quantize_rowwise_op(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _table(x)


@_quantize_rowwise_op.register_fake
def _quantize_rowwise_fake(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x.new_empty(x.shape, dtype=torch.int8), x.new_empty((x.shape[0],), dtype=torch.float32)


_autocast.register("quantize_rowwise")  # autocast: x as it is (the scales come from its values)


# -- public function ---------------------------------------------------------------------
def quantize_rowwise(x: torch.Tensor, dtype: torch.dtype = torch.int8) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise each row of ``x`` to int8 with a symmetric absmax scale.

    Args:
        x: ``(rows, cols)`` float32, float16 or bfloat16 tensor, any strides.
        dtype: the quantised dtype; only ``torch.int8`` is supported.

    Returns:
        ``(q, scale)``: ``q`` is ``(rows, cols)`` int8 (contiguous) and ``scale`` is
        ``(rows,)`` float32, with ``x ~= q * scale[:, None]``.

    ``scale = max|x_row| / 127`` in float32 and ``q = round_half_to_even(x / scale)``
    clamped to [-127, 127]; -128 is never produced, so the range is symmetric. A row of
    zeros gets ``scale = 1`` and ``q = 0``. A row containing NaN or +-inf is not an error
    (checking would cost a device synchronisation): it gets ``scale = NaN`` and ``q = 0``,
    so anything dequantised from it is NaN rather than silently plausible.
    """
    op = "quantize_rowwise"
    _validate.check_tensor(op, "x", x)
    if dtype != torch.int8:
        raise ValueError(f"{op}: dtype must be torch.int8, got {dtype}")
    _validate.check_dim(op, "x", x, 2)
    _validate.check_dtype(op, "x", x, _validate.FLOAT_DTYPES)
    return backends.call(_quantize_rowwise_op, _table, x)
