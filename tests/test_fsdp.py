"""memkern layers under FSDP2 (fully_shard on gloo ranks): training and inference give the
one-process results, the kept values of a SparseLinear are what is sharded and pruned
weights stay zero through optimiser steps, int8 weights never travel or change dtype, and
the fused LinearKDLoss trains an lm_head under fully_shard. One spawned body per world
size holds every check (spawning costs seconds)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from torch import nn

import memkern
from memkern.nn import (
    Fp16Linear,
    Int4WeightOnlyLinear,
    Int8Linear,
    Int8WeightOnlyLinear,
    LinearKDLoss,
    SparseLinear,
)
from tests.multirank import run_ranks

BLOCK = (16, 16)


def _block_mask(gen: torch.Generator) -> torch.Tensor:
    """(48, 64) mask over 3 x 4 blocks of 16 x 16: 5 blocks pruned whole, the others with
    pruned elements inside (so the layer keeps an element mask)."""
    keep_block = torch.tensor([[1, 0, 1, 1], [0, 1, 0, 1], [1, 0, 1, 0]], dtype=torch.bool)
    inside = torch.rand(48, 64, generator=gen) > 0.25
    return keep_block.repeat_interleave(16, 0).repeat_interleave(16, 1) & inside


def _mask_24(gen: torch.Generator, rows: int, cols: int) -> torch.Tensor:
    """Two random positions of every four inputs, and one row group keeping only one."""
    order = torch.rand(rows, cols // 4, 4, generator=gen).argsort(-1)
    mask = (order < 2).reshape(rows, cols)
    mask[0, 0:4] = torch.tensor([True, False, False, False])
    return mask


class Net(nn.Module):
    """Every memkern layer in one chain: block-sparse and 2:4 SparseLinear, the quantised
    layers, and a plain head."""

    def __init__(self, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        # Built on the default backend whatever a test forces: compressing a 2:4 weight has
        # no Triton implementation.
        with memkern.use_backend(None):
            self.block = SparseLinear.from_dense(nn.Linear(64, 48), _block_mask(gen), block=BLOCK)
            self.two_four = SparseLinear.from_dense(nn.Linear(48, 32), _mask_24(gen, 32, 48), format="2:4")
            self.int8 = Int8Linear.from_linear(nn.Linear(32, 32))
            self.int8_weight_only = Int8WeightOnlyLinear.from_linear(nn.Linear(32, 32))
            self.fp16 = Fp16Linear.from_linear(nn.Linear(32, 32))
            self.int4 = Int4WeightOnlyLinear.from_linear(nn.Linear(32, 32), group_size=32)
        self.head = nn.Linear(32, 8)

    def forward(self, x):
        x = torch.relu(self.block(x))
        x = torch.relu(self.two_four(x))
        x = self.int4(self.fp16(self.int8_weight_only(self.int8(x))))
        return self.head(x)


def dense_masks(model: Net) -> dict[str, torch.Tensor]:
    """Where each SparseLinear's dense weight may be nonzero, from the masks it was built with."""
    gen = torch.Generator().manual_seed(0)
    return {"block": _block_mask(gen), "two_four": _mask_24(gen, 32, 48)}


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _gathered_bytes():
    """Patch FSDP2's all-gather (torch.distributed.all_gather_single in recent releases,
    all_gather_into_tensor before) to count the bytes of every gathered output."""
    counted = {"bytes": 0}
    originals = {}
    for name in ("all_gather_single", "all_gather_into_tensor"):
        original = getattr(dist, name, None)
        if original is None:
            continue

        def counting(output, *args, _original=original, **kwargs):
            counted["bytes"] += output.numel() * output.element_size()
            return _original(output, *args, **kwargs)

        originals[name] = original
        setattr(dist, name, counting)

    def restore():
        for name, original in originals.items():
            setattr(dist, name, original)

    return counted, restore


def _padded_gather_bytes(params, world_size: int, dtype: torch.dtype | None = None) -> int:
    """Bytes one all-gather of ``params`` brings: FSDP2 splits dim 0 into world_size equal
    shards (the last ones padded), so each parameter travels as world_size padded shards."""
    total = 0
    for p in params:
        rows = -(-p.shape[0] // world_size) * world_size
        total += rows * (p[0].numel() if p.dim() else 1) * (dtype or p.dtype).itemsize
    return total


class KDHead(nn.Module):
    """A student's lm_head with the fused loss in its forward, so FSDP2 gathers the weight
    before the loss reads it (and again for backward when resharded after forward)."""

    def __init__(self):
        super().__init__()
        self.lm_head = nn.Linear(16, 40, bias=False)
        self.loss = LinearKDLoss(alpha=0.3, temperature=2.0)

    def forward(self, hidden, teacher_hidden, teacher_weight, labels):
        return self.loss(hidden, self.lm_head.weight, teacher_hidden, teacher_weight, labels)


class KDStudent(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.body = nn.Linear(16, 16)
        self.head = KDHead()

    def forward(self, x, teacher_hidden, teacher_weight, labels):
        return self.head(torch.tanh(self.body(x)), teacher_hidden, teacher_weight, labels)


def _policy(mp_policy) -> dict:
    return {} if mp_policy is None else {"mp_policy": mp_policy}


def _check_training(rank, world_size, mesh, mp_policy):
    """Two AdamW steps (weight decay on) sharded and in one process from the same state and
    inputs: the same outputs and gradients, and pruned weights exactly zero afterwards."""
    from memkern.distributed.fsdp import prepare_for_fully_shard, shard_model

    model, reference = Net(), prepare_for_fully_shard(Net())
    shard_model(model, mesh, **_policy(mp_policy))
    assert type(model.block.values).__name__ == "DTensor"
    # The kept values are what is sharded: rank r holds blocks of values' dim 0 (7 kept).
    kept = reference.block.values.shape[0]
    assert kept == 7 and model.block.values.to_local().shape[1:] == BLOCK
    chunk = -(-kept // world_size)
    assert model.block.values.to_local().shape[0] == max(0, min(chunk, kept - rank * chunk))

    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.1)
    low = mp_policy is not None
    for step in range(2):
        x = torch.randn(6, 64, generator=torch.Generator().manual_seed(10 + step))  # same on every rank
        out = model(x)
        if low:  # what FSDP2's policy computes: parameters and input in bf16, buffers as stored
            shadow = copy.deepcopy(reference).bfloat16()
            ref_out = shadow(x.bfloat16())
        else:
            ref_out = reference(x)
        assert out.dtype == ref_out.dtype
        torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
        out.float().square().mean().backward()
        ref_out.float().square().mean().backward()
        for (name, p), ref_p in zip(model.named_parameters(), (shadow if low else reference).parameters()):
            torch.testing.assert_close(_full(p.grad), ref_p.grad.float(), rtol=1e-6, atol=1e-7, msg=name)
        if low:
            for p, q in zip(reference.parameters(), shadow.parameters()):
                p.grad = q.grad.float()
        opt.step()
        ref_opt.step()
        opt.zero_grad()
        ref_opt.zero_grad()
    masks = dense_masks(reference)
    for name in ("block", "two_four"):
        values = _full(getattr(model, name).values).detach()
        layer = getattr(reference, name)
        torch.testing.assert_close(values, layer.values.detach(), rtol=1e-6, atol=1e-7)
        # Pruned positions exactly zero in the trained weight (the stored values there too).
        one_process = copy.deepcopy(layer)
        with torch.no_grad():
            one_process.values.copy_(values)
        dense = one_process.to_dense()
        assert torch.count_nonzero(dense[~masks[name]]) == 0
        assert torch.count_nonzero(dense[masks[name]]) == int(masks[name].sum())
        assert torch.count_nonzero(values if layer.mask is None else values[~layer.mask]) == (
            values.numel() if layer.mask is None else 0
        )


def _check_in_place_on_outputs(mesh):
    """``h += 1`` on the outputs of SparseLinear layers that are FSDP2 groups of their own
    (3-D input): they keep their backward, as on one process. An output that is a view
    would lose the hook FSDP2 registers on it, and the layers their gradients."""
    from memkern.distributed.fsdp import prepare_for_fully_shard, shard_model

    model, reference = shard_model(Net(), mesh), prepare_for_fully_shard(Net())
    x = torch.randn(2, 3, 64, generator=torch.Generator().manual_seed(4))
    for m in (model, reference):
        h = m.block(x)
        h += 1
        out = m.two_four(torch.relu(h))
        out += 1
        out.square().sum().backward()
    for name in ("block.values", "block.bias", "two_four.values", "two_four.bias"):
        grad = model.get_parameter(name).grad
        assert grad is not None, name
        torch.testing.assert_close(_full(grad), reference.get_parameter(name).grad, rtol=1e-6, atol=1e-6, msg=name)


def _check_inference_and_traffic(world_size, mesh):
    """Quantised weights stay replicated buffers in their storage dtype, the only bytes
    gathered are the parameters' (kept values, biases, the head), and outputs match."""
    from memkern.distributed.fsdp import prepare_for_fully_shard, shard_model
    from torch.distributed.fsdp import MixedPrecisionPolicy

    reference = prepare_for_fully_shard(Net())
    for mp_policy, dtype in ((None, torch.float32), (MixedPrecisionPolicy(param_dtype=torch.bfloat16), torch.bfloat16)):
        model = shard_model(Net(), mesh, **_policy(mp_policy))
        for name, storage in (("int8", torch.int8), ("int8_weight_only", torch.int8), ("fp16", torch.float16)):
            layer, ref_layer = getattr(model, name), getattr(reference, name)
            assert type(layer.weight) is torch.Tensor and layer.weight.dtype == storage
            # The plain (out, in) int8 weight: Int8Linear may hold it packed for its CPU kernel.
            assert torch.equal(*(m.int8_weight() if storage == torch.int8 else m.weight for m in (layer, ref_layer)))
        assert model.int4.weight.dtype == torch.uint8 and torch.equal(model.int4.weight, reference.int4.weight)
        x = torch.randn(5, 64, generator=torch.Generator().manual_seed(7))
        counted, restore = _gathered_bytes()
        try:
            with torch.no_grad():
                out = model(x)
        finally:
            restore()
        shadow = reference if mp_policy is None else copy.deepcopy(reference).bfloat16()
        with torch.no_grad():
            torch.testing.assert_close(out, shadow(x.to(dtype)), rtol=0, atol=0)
        # Two groups (the block layer's and the 2:4 layer's) plus the root's: exactly the
        # parameters, in the compute dtype; no int8/fp16/uint8 weight travels.
        expected = _padded_gather_bytes(model.block.parameters(), world_size, dtype)
        expected += _padded_gather_bytes(model.two_four.parameters(), world_size, dtype)
        rest = [p for n, p in model.named_parameters() if not n.startswith(("block.", "two_four."))]
        expected += _padded_gather_bytes(rest, world_size, dtype)
        assert counted["bytes"] == expected, (counted["bytes"], expected)


def _check_linear_kd_loss(world_size, mesh):
    """LinearKDLoss on a sharded student: the head module resharded after forward (its weight
    gathered again for backward) and the lm_head in the root group; two SGD steps each."""
    from torch.distributed.fsdp import fully_shard

    gen = torch.Generator().manual_seed(5)
    teacher_hidden, teacher_weight = torch.randn(12, 16, generator=gen), torch.randn(40, 16, generator=gen)
    labels = torch.randint(0, 40, (12,), generator=gen)
    labels[3] = -100
    x = torch.randn(12, 16, generator=gen)
    for head_group in (True, False):
        model, reference = KDStudent(), KDStudent()
        fully_shard(model.body, mesh=mesh)
        if head_group:
            fully_shard(model.head, mesh=mesh, reshard_after_forward=True)
        fully_shard(model, mesh=mesh)
        opt, ref_opt = (torch.optim.SGD(m.parameters(), lr=0.5) for m in (model, reference))
        for _ in range(2):
            loss = model(x, teacher_hidden, teacher_weight, labels)
            ref_loss = reference(x, teacher_hidden, teacher_weight, labels)
            torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-7)
            loss.backward()
            ref_loss.backward()
            for (name, p), q in zip(model.named_parameters(), reference.parameters()):
                assert p.grad is not None, name
                torch.testing.assert_close(_full(p.grad), q.grad, rtol=1e-5, atol=1e-7, msg=name)
            for o in (opt, ref_opt):
                o.step()
                o.zero_grad()
        torch.testing.assert_close(_full(model.head.lm_head.weight).detach(), reference.head.lm_head.weight.detach())


def _fsdp_body(rank, world_size, backend):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy

    mesh = init_device_mesh("cpu", (world_size,))
    with memkern.use_backend(backend):
        _check_training(rank, world_size, mesh, None)
        _check_training(rank, world_size, mesh, MixedPrecisionPolicy(param_dtype=torch.bfloat16))
        _check_in_place_on_outputs(mesh)
        _check_inference_and_traffic(world_size, mesh)
        _check_linear_kd_loss(world_size, mesh)
    return "ok"


# Every CPU backend once (the kernels are the same on every rank count), each world size once.
@pytest.mark.parametrize("world_size, backend", [(2, "cpp"), (4, "torch"), (2, "triton")])
def test_memkern_layers_under_fully_shard_match_one_process(world_size, backend):
    assert run_ranks(_fsdp_body, world_size, backend, timeout=300) == ["ok"] * world_size
