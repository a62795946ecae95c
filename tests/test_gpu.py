"""What only a CUDA device can prove: the CUDA backend's own paths, compiled Triton kernels
(real tiles, shared memory, atomics), default backend choice on CUDA tensors, modules and
tools moved to the GPU, Inductor, and the full-size shapes of an 8B model's lm_head.

Each test body is device-generic: its "cpu" cases run everywhere at small shapes and prove
the references, tolerances and assertions; its "cuda" cases are marked gpu (skipped without
a CUDA device) and run the same body on the GPU, at full size where the test says so.
Expected values come from float64 (or, at full size, float32) computations written here or
from the plain-PyTorch reference; integer products are bit-exact.
"""

from __future__ import annotations

import copy
import csv
import itertools
import math
import subprocess
import sys
import warnings
from collections import OrderedDict

import pytest
import torch
from torch import nn

import memkern
from memkern.kernels import kd_linear_stats
from memkern.kernels import kd_chunks
from memkern import backends, prune, reference
from memkern.ops import BlockSparseWeight
from conftest import CPU_BACKENDS, assert_rel_close, require_backend, sqnr_db
from test_demo import STAGES

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
CUDA_BACKENDS = ("cuda", "triton", "torch")
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def _id(value) -> str:
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if isinstance(value, tuple):
        return "x".join(map(_id, value))
    return str(value)


def covering(*axes) -> list[tuple]:
    """A few combinations of the axes' values in which every value of every axis appears:
    the CPU cases, which prove each reference and tolerance without the whole grid (the
    Triton interpreter takes seconds a case)."""
    return [tuple(axis[i % len(axis)] for axis in axes) for i in range(max(map(len, axes)))]


def cases(op: str | None, cpu: list[tuple], cuda: list[tuple]) -> list:
    """pytest parameters (device, *case): ``cpu`` cases and, marked gpu, ``cuda`` cases. A
    case's first value is a backend; cases whose backend ``op`` lacks are left out."""
    impls = backends.OPS[op].impls if op else None

    def keep(case):
        return impls is None or case[0] in impls

    return [pytest.param("cpu", *c, id="-".join(map(_id, ("cpu", *c)))) for c in cpu if keep(c)] + [
        pytest.param("cuda", *c, id="-".join(map(_id, ("cuda", *c))), marks=pytest.mark.gpu) for c in cuda if keep(c)
    ]


def grid(*axes) -> list[tuple]:
    return list(itertools.product(*axes))


def _cpu64(x: torch.Tensor | None) -> torch.Tensor | None:
    return None if x is None else x.detach().cpu().double()


def _leaves(*xs):
    return [None if x is None else x.detach().clone().requires_grad_() for x in xs]


def _kd_reference(s, t, labels, opts, upstream):
    """float64 kd_loss of CPU copies and d(sum(upstream * loss)) / d student."""
    s64 = _cpu64(s).requires_grad_()
    ref = reference.kd_loss(s64, _cpu64(t), None if labels is None else labels.cpu(), **opts)
    ref.backward(_cpu64(upstream))
    return ref.detach(), s64.grad


def _linear_kd_reference(hs, ws, bs, ht, wt, bt, labels, opts, upstream):
    """float64 linear_kd_loss of CPU copies and its gradients in hs, ws, bs."""
    leaves = [None if x is None else _cpu64(x).requires_grad_() for x in (hs, ws, bs)]
    ref = reference.linear_kd_loss(
        leaves[0],
        leaves[1],
        _cpu64(ht),
        _cpu64(wt),
        labels.cpu(),
        student_bias=leaves[2],
        teacher_bias=_cpu64(bt),
        **opts,
    )
    ref.backward(_cpu64(upstream))
    return ref.detach(), [None if x is None else x.grad for x in leaves]


def _linear_kd_inputs(lead, hidden_s, hidden_t, vocab, dtype, device, bias=True):
    hs = torch.randn(*lead, hidden_s)
    ws = torch.randn(vocab, hidden_s) * (3 / math.sqrt(hidden_s))
    ht = torch.randn(*lead, hidden_t)
    wt = torch.randn(vocab, hidden_t) * (3 / math.sqrt(hidden_t))
    bs, bt = (torch.randn(vocab), torch.randn(vocab)) if bias else (None, None)
    labels = torch.randint(0, vocab, lead)
    labels.view(-1)[::4] = -100  # ignored rows: the kept-row gather of every backend
    cast = [None if x is None else x.to(device=device, dtype=dtype) for x in (hs, ws, bs, ht, wt, bt)]
    return (*cast, labels.to(device))


# -- linear_kd_loss: the CUDA backend's chunk loop and the fused Triton kernels ---------------
LINEAR_KD_MODES = (("mean", "forward_kl"), ("none", "jsd"))


@pytest.mark.parametrize(
    "device, backend, dtype, mode",
    cases(
        "linear_kd_loss",
        cpu=[
            ("cpp", BF16, LINEAR_KD_MODES[0]),
            ("cpp", F16, LINEAR_KD_MODES[1]),
            ("triton", F32, LINEAR_KD_MODES[1]),
            ("triton", BF16, LINEAR_KD_MODES[0]),
            ("torch", F16, LINEAR_KD_MODES[0]),
        ],
        cuda=grid(CUDA_BACKENDS, (F32, F16, BF16), LINEAR_KD_MODES),
    ),
)
def test_linear_kd_loss_forward_and_gradients(device, backend, dtype, mode, monkeypatch):
    reduction, divergence = mode
    vocab, lead = 131, (2, 13)
    # 1000 elements: chunks of 7 rows, so the chunked backends (cpp, cuda, torch) take 3 chunks
    # for the 19 kept rows and the weight gradient is accumulated across chunks, on CUDA
    # for half weights by addmm(..., out_dtype=float32) into the float32 accumulator.
    for device_type in ("cpu", "cuda"):
        monkeypatch.setitem(kd_chunks.CHUNK_ELEMENTS, device_type, 1000)
    accumulated = []
    accumulate = kd_chunks.accumulate_fp32
    monkeypatch.setattr(
        kd_chunks, "accumulate_fp32", lambda acc, a, b: (accumulated.append(a.dtype), accumulate(acc, a, b))[1]
    )
    hs, ws, bs, ht, wt, bt, labels = _linear_kd_inputs(lead, 24, 16, vocab, dtype, device)
    require_backend("linear_kd_loss", backend, hs.reshape(-1, 24))
    opts = dict(alpha=0.4, temperature=2.0, divergence=divergence, beta=0.3, reduction=reduction)
    leaves = _leaves(hs, ws, bs)
    with memkern.use_backend(backend):
        loss = memkern.ops.linear_kd_loss(
            leaves[0], leaves[1], ht, wt, labels, student_bias=leaves[2], teacher_bias=bt, **opts
        )
    upstream = torch.tensor(0.7) if reduction == "mean" else torch.rand(lead) + 0.5
    loss.backward(upstream.to(device))  # backward on the forced backend too (register_autograd)
    ref, ref_grads = _linear_kd_reference(hs, ws, bs, ht, wt, bt, labels, opts, upstream)

    assert loss.dtype == F32 and loss.device.type == device
    kept = int((labels != -100).sum())
    # cpp, cuda and torch run the chunk loop; triton its fused kernels
    assert accumulated == ([dtype] * -(-kept // 7) if backend in ("cpp", "cuda", "torch") else [])
    # The chunked and torch backends round the logits to half precision, as the eager
    # composition does; Triton keeps them in float32.
    assert_rel_close(loss.cpu(), ref, dtype, factor=1 if dtype != F32 else 3)
    for leaf, ref_grad in zip(leaves, ref_grads):
        assert leaf.grad.dtype == dtype and leaf.grad.device.type == device
        assert_rel_close(leaf.grad.cpu(), ref_grad, dtype, factor=3)


@pytest.mark.parametrize("device, dtype", cases(None, cpu=[(BF16,)], cuda=[(BF16,), (F16,)]))
def test_weight_gradient_across_vocabulary_slabs(device, dtype, monkeypatch):
    from memkern.kernels import kd_linear as kd_kernels

    vocab = 300 if device == "cuda" else 100  # three tile widths and a partial slab either way
    hidden_s = 24
    hs, ws, bs, ht, wt, bt, labels = _linear_kd_inputs((18,), hidden_s, 16, vocab, dtype, device)
    require_backend("linear_kd_loss", "triton", hs)
    opts = dict(alpha=0.5, temperature=2.0, reduction="mean")

    def gradients():
        leaves = _leaves(hs, ws, bs)
        with memkern.use_backend("triton"):
            memkern.ops.linear_kd_loss(
                leaves[0], leaves[1], ht, wt, labels, student_bias=leaves[2], teacher_bias=bt, **opts
            ).backward()
        return [x.grad.cpu() for x in leaves]

    block_v = kd_linear_stats.grad_launch_config(dtype, dtype)["BLOCK_V"]
    assert kd_kernels._vocab_slab(vocab, hidden_s, dtype, block_v) == vocab
    one_slab = gradients()
    monkeypatch.setattr(kd_kernels, "WEIGHT_GRAD_SLAB_BYTES", 4 * hidden_s * block_v)  # one tile a slab
    slab = kd_kernels._vocab_slab(vocab, hidden_s, dtype, block_v)
    assert slab == block_v and vocab % slab and vocab // slab >= 2
    several = gradients()
    _, ref_grads = _linear_kd_reference(hs, ws, bs, ht, wt, bt, labels, opts, torch.tensor(1.0))
    for name, grad, ref_grad, single in zip(("hidden", "weight", "bias"), several, ref_grads, one_slab):
        assert grad.dtype == dtype, name
        assert_rel_close(grad, ref_grad, dtype, factor=2)
        # the same float32 sums cast per slab: equal up to the order of the atomic adds
        assert_rel_close(grad, single, dtype, factor=0.5)


# -- low precision: gradients, mixed dtypes, the packed layout -------------------------------
LOWP_OPS = ("int8_linear", "int8_weight_only_linear", "fp16_linear")
# (x, bias, fp16_linear's weight): every op accepts any float x and bias and either half
# weight type, and returns x's dtype (checked on the CPU backends; the same contract on CUDA).
LOWP_DTYPES = [(F32, F32, F16), (F16, F32, F16), (BF16, BF16, BF16), (BF16, F32, F16), (F16, F16, BF16)]


def _lowp_weights(op, n, k, half_dtype, device):
    w = torch.randn(n, k)
    if op == "fp16_linear":
        w_half = w.to(half_dtype)
        return (w_half.to(device),), w_half.double()
    w_q, w_scale = reference.quantize_rowwise(w)
    return (w_q.to(device), w_scale.to(device)), w_q.double() * w_scale.double()[:, None]


@pytest.mark.parametrize(
    "device, backend, op, dtypes, rows",
    [
        case
        for op in LOWP_OPS
        for case in cases(
            op,
            cpu=[(b, op, d, r) for b, d, r in covering(CPU_BACKENDS, LOWP_DTYPES, (5, 37))],
            # CUDA: Triton's GEMV kernel (<= 8 rows), then its GEMM
            cuda=grid(CUDA_BACKENDS, (op,), LOWP_DTYPES, (5, 37)),
        )
    ],
)
def test_lowp_forward_and_gradients(device, backend, op, dtypes, rows):
    x_dtype, bias_dtype, half_dtype = dtypes
    k, n = 40, 33
    x = (torch.randn(rows, k) * 2).to(x_dtype)
    bias = torch.randn(n).to(bias_dtype)
    grad = torch.randn(rows, n).to(x_dtype)
    weight_args, w64 = _lowp_weights(op, n, k, half_dtype, device)
    x_dev, bias_dev = _leaves(x.to(device), bias.to(device))
    require_backend(op, backend, x_dev.detach(), *weight_args)
    with memkern.use_backend(backend):
        y = getattr(memkern.ops, op)(x_dev, *weight_args, bias_dev)
        y.backward(grad.to(device))

    if op == "int8_linear":  # x quantised exactly as the kernels do, the rest in float64
        w_q, w_scale = (a.cpu() for a in weight_args)
        y_ref = reference.int8_linear(x, w_q, w_scale, bias, out_dtype=torch.float64, compute_dtype=torch.float64)
    else:
        y_ref = x.double() @ w64.t() + bias.double()
    assert y.dtype == x_dtype and x_dev.grad.dtype == x_dtype and bias_dev.grad.dtype == bias_dtype
    assert_rel_close(y.cpu(), y_ref, x_dtype)
    # d/dx through the dequantised weight (straight through the activation quantisation)
    assert_rel_close(x_dev.grad.cpu(), grad.double() @ w64, x_dtype)
    assert_rel_close(bias_dev.grad.cpu(), grad.double().sum(0), bias_dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_mismatched_dtypes_are_refused_on_every_device(device):
    """Where the ops do not accept mixed dtypes, the same clear error on CUDA as on the CPU."""
    x = torch.randn(6, 64, device=device, dtype=BF16)
    w = torch.randn(32, 64)
    block = BlockSparseWeight.from_dense(
        w.to(device, F16), prune.masks(w, 0.5, "block", block=(16, 16)).to(device), (16, 16)
    )
    with pytest.raises(TypeError, match="x must have the weight's dtype torch.float16; got torch.bfloat16"):
        memkern.ops.masked_matmul(x, block)
    with pytest.raises(TypeError, match=r"student_hidden \(bfloat16\) and student_weight \(float16\) must have"):
        memkern.ops.linear_kd_loss(x, w.to(device, F16), x, w.to(device, BF16))
    w_q, w_scale = memkern.ops.quantize_rowwise(w.to(device))
    with pytest.raises(TypeError, match="w_scale must have dtype float32; got bfloat16"):
        memkern.ops.int8_linear(x, w_q, w_scale.to(BF16))
    with pytest.raises(TypeError, match="w_half must have dtype float16, bfloat16; got float32"):
        memkern.ops.fp16_linear(x, w.to(device))


@pytest.mark.parametrize(
    "device, backend, dtype",
    cases("int8_linear_packed", cpu=covering(CPU_BACKENDS, (F32, BF16)), cuda=grid(CUDA_BACKENDS, (F32, BF16))),
)
def test_int8_linear_packed_is_int8_linear_bit_for_bit(device, backend, dtype):
    m, k, n = 37, 45, 21  # K and N not multiples of the packed blocks (4, 16)
    w_q, w_scale = reference.quantize_rowwise(torch.randn(n, k))
    w_q, w_scale = w_q.to(device), w_scale.to(device)
    packed = memkern.ops.pack_int8_weight(w_q)
    assert packed.device == w_q.device and tuple(packed.shape) == memkern.ops.int8_packing.packed_shape(n, k)
    assert torch.equal(memkern.ops.unpack_int8_weight(packed, n, k), w_q)
    # The packed layout is a CPU kernel's; Int8Linear keeps the plain one on CUDA.
    if device == "cuda":
        assert not memkern.ops.int8_packed_kernel_native(device)
    x = (torch.randn(m, k) * 3).to(device, dtype)
    bias = torch.randn(n, device=device)
    grad = torch.randn(m, n).to(device, dtype)
    require_backend("int8_linear_packed", backend, x, packed)
    require_backend("int8_linear", backend, x, w_q)
    results = []
    for fn, weight in ((memkern.ops.int8_linear_packed, packed), (memkern.ops.int8_linear, w_q)):
        xg = x.clone().requires_grad_()
        with memkern.use_backend(backend):
            y = fn(xg, weight, w_scale, bias)
            y.backward(grad)
        results.append((y, xg.grad))
    (y_packed, dx_packed), (y_plain, dx_plain) = results
    assert torch.equal(y_packed, y_plain) and torch.equal(dx_packed, dx_plain)
    # integer activations whose row maximum is 127 quantise with scale 1: the int8 product
    # itself, which must equal the int64 one
    x_int = torch.randint(-127, 128, (m, k)).float()
    x_int[:, 0] = 127.0
    with memkern.use_backend(backend):
        exact = memkern.ops.int8_linear_packed(x_int.to(device), packed, torch.ones(n, device=device), out_dtype=F32)
    assert torch.equal(exact.cpu().long(), x_int.long() @ w_q.cpu().long().t())


# -- block-sparse: the largest and rectangular blocks ---------------------------------------
BLOCKS = ((128, 128), (64, 128), (32, 64), (128, 32), (16, 128))


@pytest.mark.parametrize(
    "device, backend, block, dtype",
    cases(
        "block_sparse_matmul",
        cpu=covering(CPU_BACKENDS, BLOCKS, (F32, F16, BF16)),
        cuda=grid(CUDA_BACKENDS, BLOCKS, (F32, F16, BF16)),
    ),
)
def test_block_sparse_large_and_rectangular_blocks(device, backend, block, dtype):
    n_out, n_in, lead = 300, 270, (3, 26)  # 78 rows: two row tiles; edge blocks hang over
    w = torch.randn(n_out, n_in)
    mask = prune.masks(w, 0.5, "block", block=block)
    weight = BlockSparseWeight.from_dense(w.to(device, dtype), mask.to(device), block)
    assert weight.block == block and 0 < weight.block_density < 1
    x = torch.randn(*lead, n_in).to(dtype)
    bias = torch.randn(n_out).to(dtype)
    grad = torch.randn(*lead, n_out).to(dtype)
    x_dev, b_dev = _leaves(x.to(device), bias.to(device))
    require_backend("block_sparse_matmul", backend, x_dev.detach().reshape(-1, n_in))
    weight.values = weight.values.detach().requires_grad_()
    with memkern.use_backend(backend):
        y = memkern.ops.masked_matmul(x_dev, weight, b_dev)
        y.backward(grad.to(device))

    w_kept = (w.to(dtype) * mask).double()
    x64, g64 = x.double().reshape(-1, n_in), grad.double().reshape(-1, n_out)
    assert y.dtype == dtype
    assert_rel_close(y.cpu(), (x64 @ w_kept.t() + bias.double()).reshape(*lead, n_out), dtype)
    assert_rel_close(x_dev.grad.cpu(), (g64 @ w_kept).reshape(x.shape), dtype)
    dw = reference.block_sparse_to_dense(
        weight.values.grad.cpu().double(), weight.crow.cpu(), weight.col.cpu(), n_out, n_in
    )
    assert_rel_close(dw * mask, (g64.t() @ x64) * mask, dtype)
    assert_rel_close(b_dev.grad.cpu(), g64.sum(0), dtype)


# -- bitmask weights: the Triton product reading the bits a tile at a time ----------------------
@pytest.mark.parametrize(
    "device, backend, dtype",
    cases("bitmask_matmul", cpu=[("triton", F32), ("triton", BF16)], cuda=grid(CUDA_BACKENDS, (F32, F16, BF16))),
)
def test_bitmask_product_across_tiles(device, backend, dtype):
    from memkern.ops.sparse_bitmask import BitmaskWeight, bitmask_matmul

    # 150 outputs: three 64-row tiles, the last partial; 270 columns: 8 full 32-column
    # steps and a partial one; 37 rows of x
    n_out, n_in, rows = 150, 270, 37
    w = torch.randn(n_out, n_in)
    mask = torch.rand(n_out, n_in) < 0.3
    mask[5] = False
    mask[6] = True
    weight = BitmaskWeight.from_dense(w.to(device, dtype), mask.to(device))
    x = torch.randn(rows, n_in).to(dtype)
    bias = torch.randn(n_out).to(dtype)
    x_dev, b_dev = _leaves(x.to(device), bias.to(device))
    require_backend("bitmask_matmul", backend, x_dev.detach())
    with memkern.use_backend(backend):
        y = bitmask_matmul(x_dev, weight, b_dev)
    w_kept = (w.to(dtype) * mask).double()
    assert y.dtype == dtype and y.shape == (rows, n_out)
    assert_rel_close(y.detach().cpu(), x.double() @ w_kept.t() + bias.double(), dtype)
    assert torch.equal(y[:, 5].detach().cpu(), bias[5].expand(rows))


# -- 2:4 int8 on PyTorch's semi-structured int8 kernels -------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", (F32, F16, BF16))
def test_sparse24_int8_runs_on_the_semi_structured_kernels(dtype, monkeypatch):
    from memkern.nn import SparseInt8Linear, SparseLinear
    from memkern.ops import semi_structured, sparse_int8

    # N and K multiples of both int8 tiles (cuSPARSELt 32 x 32, CUTLASS 16 x 128); M odd,
    # so the dense operand is padded to the kernel's 16.
    n, k, m = 96, 256, 37
    linear = nn.Linear(k, n)
    sparse = SparseLinear.from_dense(linear, prune.masks(linear.weight, 0.5, "n:m"), format="2:4")
    layer = SparseInt8Linear.from_sparse(sparse).cuda()
    x = (torch.randn(m, k) * 2).to(dtype)
    x_dev = x.cuda().requires_grad_(True)
    reason = sparse_int8.semi_structured_int8_reason(x_dev, layer.values, layer.meta)
    if reason is not None and ("compute capability" in reason or "this torch has no" in reason):
        pytest.skip(reason)
    assert reason is None, reason
    products = []
    real_mm = semi_structured.semi_structured_int8_mm
    monkeypatch.setattr(semi_structured, "semi_structured_int8_mm", lambda *a: products.append(1) or real_mm(*a))
    grad = torch.randn(m, n).to(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a failed build or product warns
        y = layer(x_dev)
        y.backward(grad.cuda())
    assert products, "the semi-structured int8 product did not run"
    assert sparse_int8.semi_structured_int8_reason(x_dev, layer.values, layer.meta) is None

    w_q, w_scale, bias = layer.int8_weight().cpu(), layer.scales.cpu(), layer.bias.detach().cpu()
    y_ref = reference.int8_linear(x, w_q, w_scale, bias, out_dtype=torch.float64, compute_dtype=torch.float64)
    assert y.dtype == dtype and y.shape == (m, n) and y.is_contiguous()
    assert_rel_close(y.detach().cpu(), y_ref, dtype)
    assert_rel_close(x_dev.grad.cpu(), grad.double() @ (w_q.double() * w_scale.double()[:, None]), dtype)

    # The int32 sums bit for bit: integer activations whose row maximum is 127 quantise
    # with scale 1, and unit weight scales leave the exact integer product.
    x_int = torch.randint(-127, 128, (m, k))
    x_int[:, 0] = 127
    with torch.no_grad():
        layer.scales.fill_(1)
        layer.bias.zero_()
        exact = layer(x_int.float().cuda())
    assert len(products) == 2
    assert torch.equal(exact.cpu().long(), x_int.long() @ w_q.long().t())


# -- kd_loss: half precision and every divergence on the row kernel --------------------------
@pytest.mark.parametrize(
    "device, backend, divergence, dtype",
    cases(
        "kd_loss_rows",
        cpu=[(b, d, t) for b, (d, t) in zip(CPU_BACKENDS * 2, grid(reference.KD_DIVERGENCES, (F16, F32)))],
        cuda=grid(CUDA_BACKENDS, reference.KD_DIVERGENCES, (F16, F32)),
    ),
)
def test_kd_loss_divergences_on_the_row_kernel(device, backend, divergence, dtype):
    # Vocabularies past one 1024-wide tile; the CUDA case at GPT-2's 50257.
    shape = (3, 37, 50257) if device == "cuda" else (2, 3, 1100)
    s = (torch.randn(shape) * 3).to(dtype)
    t = (torch.randn(shape) * 3).to(dtype)
    labels = torch.randint(0, shape[-1], shape[:-1])
    labels.view(-1)[::5] = -100
    student = s.to(device).requires_grad_()
    require_backend("kd_loss_rows", backend, s.reshape(-1, shape[-1]).to(device))
    opts = dict(alpha=0.3, temperature=2.0, divergence=divergence, beta=0.3, reduction="none")
    with memkern.use_backend(backend):
        loss = memkern.ops.kd_loss(student, t.to(device), labels.to(device), **opts)
    upstream = torch.rand(shape[:-1]) + 0.5
    loss.backward(upstream.to(device))
    ref, ref_grad = _kd_reference(s, t, labels, opts, upstream)
    assert loss.dtype == F32 and student.grad.dtype == dtype
    assert_rel_close(loss.cpu(), ref, F32, factor=10)  # float32 statistics of exact inputs
    assert_rel_close(student.grad.cpu(), ref_grad, dtype, factor=2)


# -- every module on the device against the same module on the CPU --------------------------
MODULES = (
    "KDLoss",
    "LinearKDLoss",
    "SparseLinear-block",
    "SparseLinear-2:4",
    "Int8Linear",
    "Int8WeightOnlyLinear",
    "Fp16Linear",
    "Fp16Linear-bf16",
)


def _module_case(name: str, dtype: torch.dtype):
    """(module, inputs, indices of the inputs that take a gradient), all on the CPU."""
    if name in ("KDLoss", "LinearKDLoss"):
        labels = torch.randint(0, 131, (2, 5))
        labels[0, 1] = -100
        if name == "KDLoss":
            module = memkern.nn.KDLoss(alpha=0.3, temperature=2.0, divergence="jsd", beta=0.3)
            logits = [(torch.randn(2, 5, 131) * 3).to(dtype) for _ in range(2)]
            return module, (*logits, labels), (0,)
        module = memkern.nn.LinearKDLoss(alpha=0.5, temperature=2.0, divergence="reverse_kl")
        inputs = (torch.randn(2, 5, 24), torch.randn(131, 24) / 2, torch.randn(2, 5, 16), torch.randn(131, 16) / 2)
        return module, (*(x.to(dtype) for x in inputs), labels), (0, 1)
    linear = nn.Linear(128, 64)
    x = torch.randn(3, 7, 128).to(dtype)
    if name.startswith("SparseLinear"):
        pattern = "n:m" if name.endswith("2:4") else "block"
        mask = prune.masks(linear.weight.detach(), 0.5, pattern, block=(16, 32))
        module = memkern.nn.SparseLinear.from_dense(
            linear, mask, format="2:4" if pattern == "n:m" else "block", block=(16, 32)
        )
        return module.to(dtype), (x,), (0,)
    if name == "Fp16Linear-bf16":
        return memkern.nn.Fp16Linear.from_linear(linear, weight_dtype=BF16), (x,), (0,)
    # from_linear keeps the float32 bias, so half inputs meet a float32 bias here
    return getattr(memkern.nn, name).from_linear(linear), (x,), (0,)


def _module_run(module, inputs, grad_indices, upstream):
    inputs = [x.detach().clone().requires_grad_() if i in grad_indices else x for i, x in enumerate(inputs)]
    out = module(*inputs)
    out.backward(upstream)
    grads = [inputs[i].grad for i in grad_indices] + [p.grad for p in module.parameters()]
    with torch.no_grad():  # inference: the direct call, and 2:4 on CUDA's semi-structured kernels
        inference = module(*inputs)
    return [out, *grads, inference]


@pytest.mark.parametrize(
    "device, name, dtype", cases(None, cpu=covering(MODULES, (F32, F16, BF16)), cuda=grid(MODULES, (F32, F16, BF16)))
)
def test_module_on_device_matches_the_cpu_reference(device, name, dtype):
    module, inputs, grad_indices = _module_case(name, dtype)
    on_device = copy.deepcopy(module).to(device)
    assert all(t.device.type == device for t in (*on_device.parameters(), *on_device.buffers()))
    with torch.no_grad():
        out = module(*inputs)
    upstream = torch.randn(out.shape).to(out.dtype)
    with memkern.use_backend("torch"):  # the plain-PyTorch reference of every op
        expected = _module_run(module, inputs, grad_indices, upstream)
    got = _module_run(on_device, [x.to(device) for x in inputs], grad_indices, upstream.to(device))
    assert len(got) == len(expected) > 2
    for g, e in zip(got, expected):
        assert g is not None and g.device.type == device and g.dtype == e.dtype
        assert_rel_close(g.cpu(), e, dtype, factor=2)


# -- convert and memory_footprint on the device ---------------------------------------------
def _small_model() -> nn.Sequential:
    # N multiples of 16 and K of 4: the CPU's packed int8 layout then holds N x K bytes too.
    return nn.Sequential(
        OrderedDict(fc1=nn.Linear(64, 96), act=nn.ReLU(), fc2=nn.Linear(96, 64), lm_head=nn.Linear(64, 48, bias=False))
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "scheme, layer_type, weight_dtype, min_sqnr_db",
    [
        ("int8", "Int8Linear", "int8", 30),
        ("int8_weight_only", "Int8WeightOnlyLinear", "int8", 35),
        ("fp16", "Fp16Linear", "float16", 55),
    ],
)
def test_convert_and_memory_footprint_on_device(device, scheme, layer_type, weight_dtype, min_sqnr_db):
    model = _small_model()
    x = torch.randn(5, 64)
    with torch.no_grad():
        exact = copy.deepcopy(model).double()(x.double())
        on_cpu = memkern.convert(copy.deepcopy(model), scheme)(x)
    converted = memkern.convert(copy.deepcopy(model).to(device), scheme, inplace=False)

    assert type(converted.fc1).__name__ == type(converted.fc2).__name__ == layer_type
    assert type(converted.lm_head) is nn.Linear
    assert all(t.device.type == device for t in (*converted.parameters(), *converted.buffers()))
    # bytes from first principles: weights N x K in their storage dtype, a float32 scale per
    # output channel for int8, float32 biases, and the lm_head left in float32
    weights = 64 * 96 + 96 * 64
    width = 2 if weight_dtype == "float16" else 1
    scales = (96 + 64) * 4 if weight_dtype == "int8" else 0
    float32 = scales + (96 + 64) * 4 + 48 * 64 * 4
    fp = memkern.memory_footprint(converted)
    assert fp.by_dtype == {weight_dtype: weights * width, "float32": float32}
    assert fp.by_layer_type == {layer_type: weights * width + scales + (96 + 64) * 4, "Linear": 48 * 64 * 4}
    assert fp.total_bytes == weights * width + float32
    assert fp.parameters == 96 + 64 + 48 * 64
    with torch.no_grad():
        out = converted(x.to(device))
    assert out.device.type == device and out.dtype == F32
    assert sqnr_db(out.cpu(), exact) > min_sqnr_db
    # the same converted model on the CPU: float32 sums in another order, which can move an
    # int8 activation of the second layer by one step (about 1e-3 of the output)
    if scheme == "int8":
        assert_rel_close(out.cpu(), on_cpu, F16)
    else:
        assert_rel_close(out.cpu(), on_cpu, F32, factor=10)


# -- the demo end to end -----------------------------------------------------------------------
# CUDA only: even cut to one training step a stage, the CPU run takes 15-50 s on the 2-core
# CI machine (imports, tokenizer, six evaluations); tests/test_demo.py covers the CPU demo.
@pytest.mark.gpu
def test_demo_cli_quick_on_cuda(tmp_path):
    cmd = [sys.executable, "-m", "memkern.cli", "demo", "--quick", "--device", "cuda", "--out", str(tmp_path)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    assert "Traceback" not in out.stderr
    assert "memkern demo on cuda" in out.stdout  # the table's title
    for stage in STAGES:
        assert stage in out.stdout
    rows = list(csv.DictReader(open(tmp_path / "demo.csv")))
    assert [r["stage"] for r in rows] == STAGES
    for r in rows:
        assert float(r["weight_mib"]) > 0 and float(r["peak_mib"]) > 0, r
        perplexity = float(r["val_perplexity"])
        assert perplexity > 1 and math.isfinite(perplexity), r
    assert (tmp_path / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# -- torch.compile ---------------------------------------------------------------------------
# Inductor on CUDA; on the CPU its C++ compile takes about a minute a graph here, so the CPU
# cases trace through AOTAutograd only (the same graphs, eager kernels).
COMPILER = {"cpu": "aot_eager", "cuda": "inductor"}


def _compile_case(name: str, device: str):
    """(function of the inputs returning a scalar, inputs, indices that take a gradient)."""
    labels = torch.randint(0, 131, (9,), device=device)
    if name == "KDLoss":
        module = memkern.nn.KDLoss(alpha=0.3, temperature=2.0)
        inputs = (torch.randn(9, 131) * 3, torch.randn(9, 131) * 3)
        return (lambda s, t: module(s * 1.5, t.relu(), labels)), inputs, (0,)
    if name == "LinearKDLoss":
        module = memkern.nn.LinearKDLoss(alpha=0.5, temperature=2.0, reduction="none")
        inputs = (torch.randn(9, 24), torch.randn(131, 24) / 2, torch.randn(9, 16), torch.randn(131, 16) / 2)
        return (lambda hs, ws, ht, wt: module(hs * 1.5, ws, ht, wt, labels).square().sum()), inputs, (0, 1)
    layer = memkern.nn.Int8Linear.from_linear(nn.Linear(64, 48)).to(device)
    return (lambda x: layer(x * 2).relu().sum()), (torch.randn(7, 64),), (0,)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["KDLoss", "LinearKDLoss", "Int8Linear"])
def test_compiled_module_matches_eager(device, name):
    torch._dynamo.reset()
    fn, inputs, grad_indices = _compile_case(name, device)
    compiled = torch.compile(fn, fullgraph=True, backend=COMPILER[device])
    results = []
    for f in (compiled, fn):
        xs = [x.detach().to(device).clone().requires_grad_(i in grad_indices) for i, x in enumerate(inputs)]
        out = f(*xs)
        out.backward()
        results.append([out.detach(), *(xs[i].grad for i in grad_indices)])
    torch._dynamo.reset()
    for c, e in zip(*results):
        assert_rel_close(c.cpu(), e.cpu(), F32, factor=10)


# -- full size: an 8B model's lm_head (8192 rows x 4096 hidden x 128256 vocabulary) -------------
def _peak_above(base: int) -> int:
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def _reset_peak() -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


@pytest.mark.parametrize(
    "device, backend, shape",
    cases("kd_loss_rows", cpu=grid(CPU_BACKENDS, [(16, 1100)]), cuda=grid(("cuda", "triton"), [(8192, 128256)])),
)
def test_kd_loss_at_full_vocabulary(device, backend, shape):
    rows, vocab = shape  # 8191 x 128256 + 128255 = 1.05e9: element offsets near 2^30, bytes past 2^31
    s = torch.randn(rows, vocab, device=device, dtype=BF16).mul_(3)
    t = torch.randn(rows, vocab, device=device, dtype=BF16).mul_(3)
    labels = torch.randint(0, vocab, (rows,), device=device)
    labels[::7] = -100
    require_backend("kd_loss_rows", backend, s)
    opts = dict(alpha=0.5, temperature=2.0, divergence="forward_kl", reduction="none")
    student = s.requires_grad_()
    base = _reset_peak() if device == "cuda" else 0
    with memkern.use_backend(backend):
        loss = memkern.ops.kd_loss(student, t, labels, **opts)
    if device == "cuda":  # one buffer the size of the student logits (the gradient) and O(rows)
        assert _peak_above(base) <= student.numel() * student.element_size() + (64 << 20)
    loss.sum().backward()  # an upstream gradient of ones: the buffer is handed on as it is

    assert bool(torch.isfinite(loss).all())
    assert loss[0].item() == 0.0 and not bool(student.grad[0].any())  # row 0 is ignored
    check = torch.tensor([1, 2, rows // 2, rows - 2, rows - 1], device=device)  # the last rows: largest offsets
    ref, ref_grad = _kd_reference(s[check], t[check], labels[check], opts, torch.ones(len(check)))
    assert_rel_close(loss[check].cpu(), ref, F32, factor=10)
    assert_rel_close(student.grad[check].cpu(), ref_grad, BF16, factor=2)


def _chunked_float32_reference(hs, ws, ht, wt, labels, opts, chunk):
    """Per-row losses and the gradients in hs and ws of the mean loss, logits in float32
    chunk by chunk (a float64 rows x vocab reference would not fit)."""
    ref_opts = dict(
        alpha=opts["alpha"],
        temperature=opts["temperature"],
        divergence=opts["divergence"],
        beta=0.5,
        ignore_index=-100,
        kd_scale=opts["temperature"] ** 2,
    )
    wsf, wtf = ws.float(), wt.float()
    rows = hs.shape[0]
    loss = torch.empty(rows, device=hs.device)
    grad_h = torch.empty(hs.shape, device=hs.device)
    grad_w = torch.zeros(ws.shape, device=hs.device)
    for start in range(0, rows, chunk):
        sel = slice(start, start + chunk)
        hsf = hs[sel].float()
        s, t = hsf @ wsf.t(), ht[sel].float() @ wtf.t()
        loss[sel] = reference.kd_loss_rows(s, t, labels[sel], **ref_opts)
        g = reference.kd_loss_rows_grad(
            s, t, labels[sel], torch.full((s.shape[0],), 1 / rows, device=s.device), **ref_opts
        )
        grad_h[sel] = g @ wsf
        grad_w.addmm_(g.t(), hsf)
    return loss, grad_h, grad_w


@pytest.mark.parametrize(
    "device, backend, shape",
    cases(
        "linear_kd_loss", cpu=grid(CPU_BACKENDS, [(12, 16, 100)]), cuda=grid(("triton", "cuda"), [(8192, 4096, 128256)])
    ),
)
def test_linear_kd_loss_at_full_size(device, backend, shape, monkeypatch):
    rows, hidden, vocab = shape
    monkeypatch.setitem(kd_chunks.CHUNK_ELEMENTS, "cpu", 500)  # the CPU case crosses chunks too
    scale = 3 / math.sqrt(hidden)
    hs = torch.randn(rows, hidden, device=device, dtype=BF16)
    ws = torch.randn(vocab, hidden, device=device, dtype=BF16).mul_(scale)
    ht = torch.randn(rows, hidden, device=device, dtype=BF16)
    wt = torch.randn(vocab, hidden, device=device, dtype=BF16).mul_(scale)
    labels = torch.randint(0, vocab, (rows,), device=device)  # every row counts: no gathered copies
    require_backend("linear_kd_loss", backend, hs)
    opts = dict(alpha=0.5, temperature=2.0, divergence="forward_kl")
    with torch.no_grad(), memkern.use_backend(backend):
        per_row = memkern.ops.linear_kd_loss(hs, ws, ht, wt, labels, reduction="none", **opts)
    leaves = _leaves(hs, ws)
    base = _reset_peak() if device == "cuda" else 0
    with memkern.use_backend(backend):  # reduction "mean": every gradient is computed here
        loss = memkern.ops.linear_kd_loss(leaves[0], leaves[1], ht, wt, labels, **opts)
    if device == "cuda":
        extra = _peak_above(base)
        gradients = ws.numel() * ws.element_size() + hs.numel() * hs.element_size()
        if backend == "triton":
            from memkern.kernels import kd_linear as kd_kernels

            # a vocabulary slab of float32 sums (two while the next one is allocated before
            # the last is released) and the float32 grad_h accumulator
            workspace = 2 * kd_kernels.WEIGHT_GRAD_SLAB_BYTES + rows * hidden * 4
        else:  # the float32 V x H accumulator and two chunks of bf16 logits
            workspace = vocab * hidden * 4 + 2 * kd_chunks.CHUNK_ELEMENTS["cuda"] * 2
        assert extra < rows * vocab * 4, f"{extra / 2**30:.2f} GiB: as much as one float32 rows x vocab tensor"
        assert extra <= gradients + workspace + (256 << 20), (
            f"{extra / 2**30:.2f} GiB above the inputs, expected at most {(gradients + workspace) / 2**30:.2f} + 0.25"
        )
    loss.backward()

    ref_rows, ref_gh, ref_gw = _chunked_float32_reference(hs, ws, ht, wt, labels, opts, chunk=256 if rows > 256 else 8)
    assert per_row.shape == (rows,) and bool(torch.isfinite(per_row).all())
    assert_rel_close(per_row, ref_rows, BF16)
    assert_rel_close(loss, per_row.mean(), F32, factor=10)
    assert leaves[0].grad.dtype == leaves[1].grad.dtype == BF16
    assert_rel_close(leaves[0].grad, ref_gh, BF16)
    assert_rel_close(leaves[1].grad, ref_gw, BF16)
