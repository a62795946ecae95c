"""The packed int8 weight layout that memkern's CPU int8 kernel reads (AVX512-VNNI):
pack, unpack, its shape and its checks. int8_linear_packed (memkern.ops.lowp) takes it.
"""

from __future__ import annotations

import torch

from memkern import _validate, backends


# The packed layout: blocks of PACK_COLUMNS output channels x PACK_DEPTH inputs, one
# 64-byte vector of the VNNI kernel each.
PACK_COLUMNS = 16
PACK_DEPTH = 4


def packed_shape(out_features: int, in_features: int) -> tuple[int, int, int, int]:
    """Shape of :func:`pack_int8_weight`'s result for an ``(out_features, in_features)`` weight."""
    return (-(-out_features // PACK_COLUMNS), -(-in_features // PACK_DEPTH), PACK_COLUMNS, PACK_DEPTH)


def pack_int8_weight(w_q: torch.Tensor) -> torch.Tensor:
    """The int8 weight ``(N, K)`` in the layout :func:`int8_linear_packed` reads.

    ``packed[j, g, c, t] = w_q[16 j + c, 4 g + t]``, shape ``(ceil(N / 16), ceil(K / 4), 16,
    4)``, zero past N and K: each 64-byte block holds 4 consecutive inputs of 16 consecutive
    output channels, the operand of the CPU's VNNI instruction, so the kernel streams the
    weight in order. A permutation of the bytes (plus padding), exactly undone by
    :func:`unpack_int8_weight`; works on any device, including meta.
    """
    op = "pack_int8_weight"
    _validate.check_tensor(op, "w_q", w_q)
    _validate.check_dim(op, "w_q", w_q, 2)
    _validate.check_dtype(op, "w_q", w_q, (torch.int8,))
    n, k = w_q.shape
    blocks_n, groups, _, _ = packed_shape(n, k)
    padded = torch.nn.functional.pad(w_q, (0, groups * PACK_DEPTH - k, 0, blocks_n * PACK_COLUMNS - n))
    return padded.view(blocks_n, PACK_COLUMNS, groups, PACK_DEPTH).permute(0, 2, 1, 3).contiguous()


def unpack_int8_weight(w_packed: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """The ``(out_features, in_features)`` int8 weight that :func:`pack_int8_weight` packed."""
    op = "unpack_int8_weight"
    check_packed(op, w_packed, out_features, in_features)
    blocks_n, groups, _, _ = w_packed.shape
    plain = w_packed.permute(0, 2, 1, 3).reshape(blocks_n * PACK_COLUMNS, groups * PACK_DEPTH)
    return plain[:out_features, :in_features].contiguous()


def int8_packed_kernel_native(device: torch.device | str) -> bool:
    """Whether :func:`int8_linear_packed` runs a kernel that reads the packed layout
    directly on ``device`` (memkern's C++ CPU kernel, built with AVX512-VNNI). Elsewhere it
    unpacks the weight on every call, so :class:`memkern.nn.Int8Linear` keeps the plain
    ``(N, K)`` layout there."""
    if torch.device(device).type != "cpu" or backends.OPS["int8_linear_packed"].static_reason("cpp", "cpu") is not None:
        return False
    return bool(torch.ops.memkern.int8_packed_kernel_native())


def check_packed(op: str, w_packed, out_features: int, in_features: int) -> None:
    _validate.check_tensor(op, "w_packed", w_packed)
    _validate.check_dtype(op, "w_packed", w_packed, (torch.int8,))
    expected = packed_shape(out_features, in_features)
    if tuple(w_packed.shape) != expected:
        raise ValueError(
            f"{op}: w_packed must have shape {expected} (pack_int8_weight of an "
            f"({out_features}, {in_features}) weight), got {tuple(w_packed.shape)}"
        )
