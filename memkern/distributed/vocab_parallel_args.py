"""Argument checks of the vocabulary-parallel distillation losses
(memkern.distributed.vocab_parallel). Every check reads only what all ranks share: global
shapes, dtypes, meshes, placements and the replicated labels; so a bad call raises the same
exception on every rank, before any collective (no rank is left waiting in an all-reduce).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.distributed.tensor import DTensor, Replicate, Shard

from memkern import _validate
from memkern.kd_options import KD_DTYPES, KDOptions, check_labels, check_options, mean_scale


@dataclass(frozen=True)
class Call:
    """A checked call: options, the vocabulary shard of this rank and its process group."""

    opts: KDOptions
    reduction: str
    group: object  # the process group of the mesh dimension sharding the vocabulary
    vocab: int  # global vocabulary size
    vocab_start: int  # first vocabulary entry of this rank's shard
    lead: tuple[int, ...]  # leading shape of the rows
    labels: torch.Tensor | None  # (rows,) int64, local
    loss_scale: object  # float or 0-dim tensor: 1 / N, 1 or 1 / normalizer
    compute_grad: bool
    dtype: torch.dtype
    device: torch.device

    @staticmethod
    def local(x):
        return x.to_local() if isinstance(x, DTensor) else x


def _placements(x) -> str:
    mesh = x.device_mesh
    names = f" {mesh.mesh_dim_names}" if mesh.mesh_dim_names else ""
    return f"a {mesh.device_type} mesh of ranks {mesh.mesh.tolist()}{names}, placements {tuple(x.placements)}"


def _vocab_mesh_dim(op: str, name: str, x: DTensor, vocab_dim: int) -> int:
    """The one mesh dimension that shards ``x`` on ``vocab_dim``; every other one must replicate."""
    sharding = [i for i, p in enumerate(x.placements) if isinstance(p, Shard) and p.dim % x.dim() == vocab_dim]
    others_replicate = all(isinstance(p, Replicate) for i, p in enumerate(x.placements) if i not in sharding)
    if len(sharding) != 1 or not others_replicate:
        raise ValueError(
            f"{op}: {name} must be sharded on the vocabulary (Shard({vocab_dim})) over exactly one mesh "
            f"dimension and replicated over the others, got {_placements(x)}"
        )
    return sharding[0]


def _same_sharding(op: str, name: str, x, ref_name: str, ref: DTensor) -> None:
    if not isinstance(x, DTensor):
        raise ValueError(
            f"{op}: {ref_name} is a DTensor sharded on the vocabulary but {name} is a "
            f"{type(x).__name__}; shard both lm_heads (weights and biases) the same way"
        )
    if x.device_mesh != ref.device_mesh or tuple(x.placements) != tuple(ref.placements):
        raise ValueError(
            f"{op}: {name} and {ref_name} must be sharded the same way, got {name} on {_placements(x)} "
            f"and {ref_name} on {_placements(ref)}"
        )


def _replicated(op: str, name: str, x, ref: DTensor, mesh_dim: int) -> None:
    """Hidden states and labels: plain tensors, or DTensors replicated over the vocabulary's mesh dim."""
    if x is None or not isinstance(x, DTensor):
        return
    if x.device_mesh != ref.device_mesh or not isinstance(x.placements[mesh_dim], Replicate):
        raise ValueError(
            f"{op}: {name} must be a plain tensor or a DTensor replicated over the mesh dimension "
            f"that shards the vocabulary (dimension {mesh_dim} of {_placements(ref)}), got {_placements(x)}"
        )


def _shard_start(op: str, name: str, x: DTensor, mesh_dim: int, vocab: int, local: int) -> int:
    """First entry of this rank's shard under DTensor's Shard rule (torch.chunk: ceil(V / n)
    entries per rank, the last ranks may hold fewer or none)."""
    mesh = x.device_mesh
    n, coordinate = mesh.size(mesh_dim), mesh.get_local_rank(mesh_dim)
    per_rank = -(-vocab // n)
    start = min(coordinate * per_rank, vocab)
    size = max(0, min(per_rank, vocab - start))
    if local != size:
        raise ValueError(
            f"{op}: {name} holds {local} vocabulary entries on this rank, but Shard of {vocab} over "
            f"{n} ranks gives rank {coordinate} {size}; build it with distribute_tensor or "
            f"DTensor.from_local of torch.chunk pieces"
        )
    return start


def check_normalizer(op: str, normalizer, reduction: str, device: torch.device):
    """1 / normalizer (a float or a 0-dim tensor), or None when no normalizer is given."""
    if normalizer is None:
        return None
    if reduction == "none":
        raise ValueError(f"{op}: normalizer divides the summed loss; it needs reduction 'mean' or 'sum', got 'none'")
    if isinstance(normalizer, torch.Tensor):
        normalizer = Call.local(normalizer)
        if normalizer.dim() != 0 or normalizer.dtype == torch.bool or normalizer.is_complex():
            raise ValueError(
                f"{op}: normalizer must be a number or a 0-dim real tensor, got shape "
                f"{tuple(normalizer.shape)} {_validate.dtype_name(normalizer.dtype)}"
            )
        if normalizer.device != device:
            raise ValueError(f"{op}: normalizer must be on {device}, got {normalizer.device}")
        return 1.0 / normalizer.to(torch.float64)
    if isinstance(normalizer, bool) or not isinstance(normalizer, (int, float)):
        raise TypeError(f"{op}: normalizer must be a number or a 0-dim tensor, got {type(normalizer).__name__}")
    if not (math.isfinite(normalizer) and normalizer > 0):
        raise ValueError(f"{op}: normalizer must be a finite number > 0, got {normalizer}")
    return 1.0 / normalizer


def _finish(op, opts, reduction, ref: DTensor, mesh_dim, vocab, start, rows, labels, normalizer, grad_inputs):
    """The checked Call; ``rows``: the student's logits or hidden states (the leading shape,
    the local dtype and device), ``grad_inputs``: the student's tensors."""
    lead, local = tuple(rows.shape[:-1]), Call.local(rows)
    dtype, device = local.dtype, local.device
    compute_grad = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in grad_inputs)
    labels = check_labels(op, Call.local(labels), lead, device)
    labels = labels.reshape(-1) if labels is not None else None
    scale = check_normalizer(op, normalizer, reduction, device)
    if scale is None:
        _, inv_n = mean_scale(labels, math.prod(lead), opts)
        scale = inv_n if reduction == "mean" else 1.0
    elif isinstance(scale, torch.Tensor):
        scale = scale.to(torch.float64 if dtype == torch.float64 else torch.float32)
    group = ref.device_mesh.get_group(mesh_dim)
    return Call(opts, reduction, group, vocab, start, lead, labels, scale, compute_grad, dtype, device)


def _options(op, has_labels, options) -> tuple[KDOptions, str]:
    opts = check_options(op, has_labels=has_labels, **options)
    return opts, options.get("reduction", "mean")


def check_kd_call(student, teacher, labels, normalizer, options) -> Call:
    op = "kd_loss"
    for name, x in (("student_logits", student), ("teacher_logits", teacher)):
        _validate.check_tensor(op, name, x)
    if not isinstance(student, DTensor) and not isinstance(teacher, DTensor):
        raise ValueError(
            f"{op}: DTensor labels need logits that are DTensors sharded on the vocabulary (the last "
            f"dimension); got student_logits {type(student).__name__}, teacher_logits {type(teacher).__name__}"
        )
    if not isinstance(student, DTensor):
        _same_sharding(op, "student_logits", student, "teacher_logits", teacher)
    _same_sharding(op, "teacher_logits", teacher, "student_logits", student)
    _validate.check_dim(op, "student_logits", student, (2, 3))
    _validate.check_dtype(op, "student_logits", student, KD_DTYPES)
    _validate.check_dtype(op, "teacher_logits", teacher, KD_DTYPES)
    if student.shape != teacher.shape:
        raise ValueError(
            f"{op}: student_logits and teacher_logits must have the same shape, got "
            f"{tuple(student.shape)} and {tuple(teacher.shape)}"
        )
    vocab_dim = student.dim() - 1
    mesh_dim = _vocab_mesh_dim(op, "student_logits", student, vocab_dim)
    _replicated(op, "labels", labels, student, mesh_dim)
    opts, reduction = _options(op, labels is not None, options)
    vocab = student.shape[-1]
    start = _shard_start(op, "student_logits", student, mesh_dim, vocab, student.to_local().shape[-1])
    return _finish(op, opts, reduction, student, mesh_dim, vocab, start, student, labels, normalizer, (student,))


def check_linear_call(hs, ws, ht, wt, labels, bs, bt, normalizer, options) -> Call:
    op = "linear_kd_loss"
    for name, x in (("student_hidden", hs), ("student_weight", ws), ("teacher_hidden", ht), ("teacher_weight", wt)):
        _validate.check_tensor(op, name, x)
        _validate.check_dtype(op, name, x, KD_DTYPES)
    if not isinstance(ws, DTensor) and not isinstance(wt, DTensor):
        raise ValueError(
            f"{op}: DTensor hidden states or biases need lm_head weights that are DTensors sharded on "
            f"the vocabulary (Shard(0)); got student_weight {type(ws).__name__}, teacher_weight {type(wt).__name__}"
        )
    ref_name, ref = ("student_weight", ws) if isinstance(ws, DTensor) else ("teacher_weight", wt)
    _same_sharding(op, "student_weight", ws, ref_name, ref)
    _same_sharding(op, "teacher_weight", wt, ref_name, ref)
    _validate.check_dim(op, "student_hidden", hs, (2, 3))
    _validate.check_dim(op, "teacher_hidden", ht, (2, 3))
    _validate.check_dim(op, "student_weight", ws, 2)
    _validate.check_dim(op, "teacher_weight", wt, 2)
    mesh_dim = _vocab_mesh_dim(op, "student_weight", ws, 0)
    for who, h, w, b in (("student", hs, ws, bs), ("teacher", ht, wt, bt)):
        if h.shape[-1] != w.shape[1]:
            raise ValueError(
                f"{op}: {who}_hidden has hidden size {h.shape[-1]} but {who}_weight "
                f"{tuple(w.shape)} expects {w.shape[1]} (weight is (vocab, hidden))"
            )
        if h.dtype != w.dtype:
            raise TypeError(
                f"{op}: {who}_hidden ({_validate.dtype_name(h.dtype)}) and {who}_weight "
                f"({_validate.dtype_name(w.dtype)}) must have the same dtype"
            )
        _replicated(op, f"{who}_hidden", h, ws, mesh_dim)
        if b is not None:
            _validate.check_tensor(op, f"{who}_bias", b)
            if tuple(b.shape) != (w.shape[0],) or b.dtype != w.dtype:
                raise ValueError(
                    f"{op}: {who}_bias must have shape ({w.shape[0]},) and dtype "
                    f"{_validate.dtype_name(w.dtype)}, got {tuple(b.shape)} {_validate.dtype_name(b.dtype)}"
                )
            if (
                not isinstance(b, DTensor)
                or tuple(b.placements) != tuple(w.placements)
                or b.device_mesh != w.device_mesh
            ):
                raise ValueError(
                    f"{op}: {who}_bias must be sharded like {who}_weight ({_placements(w)}), got "
                    + (_placements(b) if isinstance(b, DTensor) else f"a {type(b).__name__}")
                )
    if ws.shape[0] != wt.shape[0]:
        raise ValueError(
            f"{op}: student vocabulary size {ws.shape[0]} != teacher vocabulary size "
            f"{wt.shape[0]}; memkern does not pad or truncate vocabularies"
        )
    if hs.shape[:-1] != ht.shape[:-1]:
        raise ValueError(
            f"{op}: student_hidden {tuple(hs.shape)} and teacher_hidden {tuple(ht.shape)} must have "
            f"the same leading shape (the same rows)"
        )
    _replicated(op, "labels", labels, ws, mesh_dim)
    opts, reduction = _options(op, labels is not None, options)
    start = _shard_start(op, "student_weight", ws, mesh_dim, ws.shape[0], ws.to_local().shape[0])
    local_h = Call.local(hs)
    _validate.check_same_device(
        op,
        student_hidden=local_h,
        student_weight=ws.to_local(),
        teacher_hidden=Call.local(ht),
        teacher_weight=wt.to_local(),
    )
    return _finish(op, opts, reduction, ws, mesh_dim, ws.shape[0], start, hs, labels, normalizer, (hs, ws, bs))
