"""Every public op and module under torch.autocast on the CPU (bfloat16 and float16), on
every backend that runs here: the dtypes memkern/_autocast.py documents, and values and
gradients against float64 computed from the inputs as the op sees them (rounded to the
autocast dtype where its rule casts them).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import memkern
from memkern import reference
from conftest import CPU_BACKENDS, assert_rel_close, require_backend

AMP_DTYPES = [torch.bfloat16, torch.float16]
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")


def _as_seen(t: torch.Tensor, amp: torch.dtype) -> torch.Tensor:
    """A float32 tensor as an autocast cast hands it to the op, in float64 for a reference."""
    return t.detach().to(amp).double()


def _leaf64(t: torch.Tensor, amp: torch.dtype) -> torch.Tensor:
    return _as_seen(t, amp).requires_grad_()


# -- distillation losses -------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("amp", AMP_DTYPES)
@pytest.mark.parametrize("use_module", [False, True], ids=["function", "module"])
def test_linear_kd_loss_in_a_mixed_precision_loop(backend, amp, use_module):
    # The usual loop (Liger-Kernel's test_amp case): a model producing low-precision hidden
    # states under autocast, float32 lm_head weights and bias.
    vocab, hidden = 70, 12
    body, teacher_body = nn.Linear(10, hidden), nn.Linear(10, 8)
    lm_head, teacher_head = nn.Linear(hidden, vocab), nn.Linear(8, vocab)
    x = torch.randn(9, 10)
    labels = torch.tensor([3, -100, 0, 69, 5, 5, -100, 1, 2])
    require_backend("linear_kd_loss", backend, torch.randn(9, hidden, dtype=amp))
    opts = dict(alpha=0.4, temperature=2.0, divergence="jsd")
    loss_fn = (
        memkern.nn.LinearKDLoss(**opts) if use_module else (lambda *a, **k: memkern.ops.linear_kd_loss(*a, **k, **opts))
    )
    with memkern.use_backend(backend):
        with torch.autocast("cpu", dtype=amp):
            hs = body(x)
            with torch.no_grad():
                ht = teacher_body(x)
            hs.retain_grad()
            loss = loss_fn(
                hs,
                lm_head.weight,
                ht,
                teacher_head.weight,
                labels,
                student_bias=lm_head.bias,
                teacher_bias=teacher_head.bias,
            )
        loss.backward()
    assert hs.dtype == ht.dtype == amp and loss.dtype == torch.float32
    assert lm_head.weight.grad.dtype == lm_head.bias.grad.dtype == torch.float32 and hs.grad.dtype == amp
    ws64, bs64 = _leaf64(lm_head.weight, amp), _leaf64(lm_head.bias, amp)
    hs64 = hs.detach().double().requires_grad_()
    ref = reference.linear_kd_loss(
        hs64,
        ws64,
        ht.double(),
        _as_seen(teacher_head.weight, amp),
        labels,
        student_bias=bs64,
        teacher_bias=_as_seen(teacher_head.bias, amp),
        **opts,
    )
    ref.backward()
    # the logits are products in the autocast dtype, as in the eager composition under autocast
    assert_rel_close(loss, ref, amp)
    for grad, ref_grad in ((hs.grad, hs64.grad), (lm_head.weight.grad, ws64.grad), (lm_head.bias.grad, bs64.grad)):
        assert_rel_close(grad, ref_grad, amp, factor=2)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("amp", AMP_DTYPES)
@pytest.mark.parametrize("use_module", [False, True], ids=["function", "module"])
def test_kd_loss_keeps_the_logits_as_they_come(backend, amp, use_module):
    head = nn.Linear(6, 41)
    x, teacher = torch.randn(2, 5, 6), torch.randn(2, 5, 41)  # teacher logits stay float32
    labels = torch.randint(0, 41, (2, 5))
    labels[0, 0] = -100
    require_backend("kd_loss_rows", backend, torch.randn(10, 41, dtype=amp))
    opts = dict(alpha=0.3, temperature=1.5, divergence="reverse_kl")
    loss_fn = memkern.nn.KDLoss(**opts) if use_module else (lambda *a: memkern.ops.kd_loss(*a, **opts))
    with memkern.use_backend(backend):
        with torch.autocast("cpu", dtype=amp):
            student = head(x)
            student.retain_grad()
            loss = loss_fn(student, teacher, labels)
        loss.backward()
    assert student.dtype == amp and loss.dtype == torch.float32 and student.grad.dtype == amp
    s64 = student.detach().double().requires_grad_()
    ref = reference.kd_loss(s64, teacher.double(), labels, **opts)
    ref.backward()
    assert_rel_close(loss, ref, torch.float32, factor=10)  # float32 statistics of exact inputs
    assert_rel_close(student.grad, s64.grad, amp)


def test_mismatched_dtypes_outside_autocast_are_still_refused():
    with pytest.raises(TypeError, match="student_hidden .bfloat16. and student_weight .float32."):
        memkern.ops.linear_kd_loss(
            torch.randn(4, 8, dtype=torch.bfloat16),
            torch.randn(10, 8),
            torch.randn(4, 5),
            torch.randn(10, 5),
            torch.arange(4),
        )


# -- low-precision linear layers ------------------------------------------------------------------------
def _lowp_weights():
    w_q = torch.randint(-127, 128, (9, 16), dtype=torch.int8)
    w_scale = torch.rand(9) * 0.02 + 0.001
    return w_q, w_scale, torch.randn(9, 16).to(torch.float16)


_LOWP = ["int8_linear", "int8_linear_packed", "int8_weight_only_linear", "fp16_linear"]


def _lowp_call(name, w_q, w_scale, w_half):
    if name == "int8_linear":
        return lambda x, b: memkern.ops.int8_linear(x, w_q, w_scale, b)
    if name == "int8_linear_packed":
        packed = memkern.ops.pack_int8_weight(w_q)
        return lambda x, b: memkern.ops.int8_linear_packed(x, packed, w_scale, b)
    if name == "int8_weight_only_linear":
        return lambda x, b: memkern.ops.int8_weight_only_linear(x, w_q, w_scale, b)
    return lambda x, b: memkern.ops.fp16_linear(x, w_half, b)


def _lowp_reference(name, x64, b64, w_q, w_scale, w_half):
    if name.startswith("int8_linear"):
        # the activations are quantised from the autocast dtype, as the op sees them
        out = reference.int8_linear(
            x64.reshape(-1, x64.shape[-1]), w_q, w_scale, b64, torch.float64, compute_dtype=torch.float64
        )
        return out.reshape(*x64.shape[:-1], -1)
    w = w_half.double() if name == "fp16_linear" else w_q.double() * w_scale.double()[:, None]
    return x64 @ w.t() + b64


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("amp", AMP_DTYPES)
@pytest.mark.parametrize("name", _LOWP)
def test_lowp_ops_run_like_linear_under_autocast(backend, amp, name):
    w_q, w_scale, w_half = _lowp_weights()
    x0, b0 = torch.randn(2, 3, 16), torch.randn(9)
    require_backend(name, backend, x0.to(amp))
    x, b = x0.clone().requires_grad_(), b0.clone().requires_grad_()
    f = _lowp_call(name, w_q, w_scale, w_half)
    with memkern.use_backend(backend):
        with torch.autocast("cpu", dtype=amp):
            out = f(x, b)
            like_linear = nn.functional.linear(x0, torch.randn(9, 16), b0)
        upstream = torch.randn(out.shape)
        out.backward(upstream)
    # x and bias in the autocast dtype, so the output is in it, like nn.functional.linear's
    assert out.dtype == like_linear.dtype == amp
    assert x.grad.dtype == b.grad.dtype == torch.float32
    x64, b64 = _leaf64(x0, amp), _leaf64(b0, amp)
    ref = _lowp_reference(name, x64, b64, w_q, w_scale, w_half)
    ref.backward(upstream.double())
    assert_rel_close(out, ref, amp, factor=2)
    if not name.startswith("int8_linear"):  # W8A8: straight through the quantisation
        assert_rel_close(x.grad, x64.grad, amp, factor=2)
    assert_rel_close(b.grad, b64.grad, amp, factor=2)


@pytest.mark.parametrize("amp", AMP_DTYPES)
@pytest.mark.parametrize(
    "kind", ["Int8Linear", "Int8WeightOnlyLinear", "Fp16Linear", "SparseLinear-block", "SparseLinear-2:4"]
)
def test_layers_under_autocast_give_linear_dtype(amp, kind):
    linear = nn.Linear(32, 24)
    if kind.startswith("SparseLinear"):
        mask = torch.zeros(24, 32, dtype=torch.bool)
        mask[:, 0::4] = mask[:, 3::4] = True
        layer = memkern.nn.SparseLinear.from_dense(linear, mask, format=kind.split("-")[1], block=(16, 16))
        dense = linear.weight.detach() * mask
    else:
        layer = getattr(memkern.nn, kind).from_linear(linear)
        dense = layer.dequantized_weight()
    x0 = torch.randn(5, 32)
    x = x0.clone().requires_grad_()
    with torch.autocast("cpu", dtype=amp):
        out = layer(x)
        expected_dtype = linear(x0).dtype
    out.sum().backward()
    assert out.dtype == expected_dtype == amp and x.grad.dtype == torch.float32
    trained = [p for p in layer.parameters() if p.requires_grad]
    assert trained and all(p.grad is not None and p.grad.dtype == p.dtype for p in trained)
    x64 = _as_seen(x0, amp)
    if kind == "Int8Linear":
        ref = reference.int8_linear(
            x64,
            layer.int8_weight(),
            layer.weight_scale,
            _as_seen(linear.bias, amp),
            torch.float64,
            compute_dtype=torch.float64,
        )
    else:
        ref = x64 @ _as_seen(dense, amp).t() + _as_seen(linear.bias, amp)
    assert_rel_close(out, ref, amp, factor=2)


def test_quantize_rowwise_under_autocast_quantises_the_input_as_given():
    x = torch.randn(5, 33)
    expected = memkern.ops.quantize_rowwise(x)
    for amp in AMP_DTYPES:
        with torch.autocast("cpu", dtype=amp):
            q, scale = memkern.ops.quantize_rowwise(x)
        assert torch.equal(q, expected[0]) and torch.equal(scale, expected[1])


# -- pruned weights -------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("amp", AMP_DTYPES)
@pytest.mark.parametrize("kind", ["block", "2:4"])
def test_masked_matmul_under_autocast(backend, amp, kind):
    w = torch.randn(24, 32)
    mask = torch.zeros(24, 32, dtype=torch.bool)
    mask[:, 1::4] = mask[:, 2::4] = True  # two of every four
    if kind == "block":
        mask[:16, :16] = False  # a whole block pruned
        weight = memkern.ops.BlockSparseWeight.from_dense(w, mask, block=(16, 16))
    else:
        weight = memkern.ops.Sparse24Weight.from_dense(w, mask)
    weight.values.requires_grad_()
    x0, b0 = torch.randn(6, 32), torch.randn(24)
    table = "block_sparse_matmul" if kind == "block" else "sparse24_matmul"
    require_backend(table, backend, x0.to(amp))
    x, b = x0.clone().requires_grad_(), b0.clone().requires_grad_()
    with memkern.use_backend(backend):
        with torch.autocast("cpu", dtype=amp):
            out = memkern.ops.masked_matmul(x, weight, b)
        upstream = torch.randn(out.shape)
        out.backward(upstream)
    assert out.dtype == amp
    assert x.grad.dtype == b.grad.dtype == weight.values.grad.dtype == torch.float32
    x64, b64 = _leaf64(x0, amp), _leaf64(b0, amp)
    w64 = _leaf64(w * mask, amp)
    ref = x64 @ w64.t() + b64
    ref.backward(upstream.double())
    assert_rel_close(out, ref, amp, factor=2)
    assert_rel_close(x.grad, x64.grad, amp, factor=2)
    assert_rel_close(b.grad, b64.grad, amp, factor=2)
    # the stored values' gradient is the dense one at the kept positions
    assert_rel_close(_densify(weight, weight.values.grad), w64.grad * mask, amp, factor=2)


def _densify(weight, values: torch.Tensor) -> torch.Tensor:
    """The dense (out, in) matrix of ``values`` laid out as ``weight``'s."""
    if isinstance(weight, memkern.ops.BlockSparseWeight):
        return reference.block_sparse_to_dense(values.double(), weight.crow, weight.col, *weight.shape)
    return reference.sparse24_decompress(values.double(), weight.meta, weight.shape[1])
