"""Double backward (a gradient differentiated again, e.g. a gradient penalty) for every op:
either exact, checked against the eager float64 composition, or a clear error at the
moment the gradient is differentiated. Never a silently missing term.
"""

from __future__ import annotations

import pytest
import torch

import memkern
from memkern import reference
from conftest import CPU_BACKENDS, assert_rel_close, require_backend

# NaN-free; the interpreter's numpy warns on some masked lanes all the same.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")


# -- distillation losses: a clear error ---------------------------------------------------------------
def _kd_call(reduction):
    s = torch.randn(5, 3, 29, requires_grad=True)
    t = torch.randn(5, 3, 29)
    y = torch.randint(0, 29, (5, 3))
    y[0, 1] = -100
    return [s], lambda s: memkern.ops.kd_loss(s, t, y, alpha=0.3, temperature=2.0, reduction=reduction)


def _linear_call(reduction):
    h = torch.randn(7, 6, requires_grad=True)
    w = torch.randn(31, 6, requires_grad=True)
    b = torch.randn(31, requires_grad=True)
    ht, wt, y = torch.randn(7, 4), torch.randn(31, 4), torch.tensor([1, -100, 4, 30, 0, 7, 7])
    return [h, w, b], lambda h, w, b: memkern.ops.linear_kd_loss(
        h, w, ht, wt, y, student_bias=b, alpha=0.3, temperature=2.0, reduction=reduction
    )


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize(
    "op, make", [("kd_loss", _kd_call), ("linear_kd_loss", _linear_call)], ids=["kd_loss", "linear_kd_loss"]
)
def test_kd_double_backward_is_a_clear_error(backend, reduction, op, make):
    leaves, f = make(reduction)
    table = "kd_loss_rows" if op == "kd_loss" else "linear_kd_loss"
    require_backend(table, backend, leaves[0].detach().reshape(-1, leaves[0].shape[-1]))
    with memkern.use_backend(backend):
        loss = f(*leaves).sum()
        first_order = torch.autograd.grad(loss, leaves, retain_graph=True)
        grads = torch.autograd.grad(loss, leaves, create_graph=True)
        # first-order use under create_graph=True is fine, and gives the same gradient
        for g, expected in zip(grads, first_order):
            torch.testing.assert_close(g.detach(), expected, rtol=0, atol=0)
            assert g.requires_grad  # the penalty below cannot silently fall away
        penalty = sum(10 * g.pow(2).sum() for g in grads)
        with pytest.raises(RuntimeError, match=f"{op}: double backward is not supported"):
            (loss + penalty).backward()


def test_kd_gradient_penalty_is_not_silently_dropped():
    # The original symptom: the penalty's share of the gradient went missing without a word.
    s = torch.randn(4, 10, requires_grad=True)
    t, y = torch.randn(4, 10), torch.arange(4)
    loss = memkern.ops.kd_loss(s, t, y)
    (g,) = torch.autograd.grad(loss, s, create_graph=True)
    with pytest.raises(RuntimeError, match="kd_loss: double backward"):
        (loss + 10 * g.pow(2).sum()).backward()


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True:UserWarning")
def test_kd_create_graph_without_second_order_matches_plain_backward():
    s = torch.randn(6, 17, requires_grad=True)
    t, y = torch.randn(6, 17), torch.arange(6)
    memkern.ops.kd_loss(s, t, y, alpha=0.2).backward(create_graph=True)
    with_graph = s.grad.detach().clone()
    s.grad = None  # breaks the parameter <-> gradient reference cycle of create_graph=True
    memkern.ops.kd_loss(s, t, y, alpha=0.2).backward()
    torch.testing.assert_close(with_graph, s.grad, rtol=0, atol=0)


# -- low-precision linear layers: exact, against eager float64 ---------------------------------------
def _exact_int8_activations(rows: int, k: int) -> torch.Tensor:
    """Integer activations whose row absmax is 127: quantisation per row is then exact
    (scale 1), so the W8A8 product equals the float64 product of the same numbers."""
    x = torch.randint(-100, 101, (rows, k)).float()
    x[torch.arange(rows), torch.randint(0, k, (rows,))] = 127.0
    return x


def _second_order(f, x, b):
    """x.grad and b.grad of y.sum() + |d(|y|^2 / 2) / dx|^2 with y = f(x, b): the second term
    differentiates the op's backward (whose upstream gradient y depends on x and b)."""
    y = f(x, b)
    (gx,) = torch.autograd.grad((y * y).sum() / 2, x, create_graph=True)
    (y.sum() + gx.pow(2).sum()).backward()
    return x.grad, b.grad


def _lowp_cases():
    w_q = torch.randint(-127, 128, (9, 13), dtype=torch.int8)
    w_scale = torch.rand(9) * 0.01 + 0.001
    w_half = torch.randn(9, 13).to(torch.float16)
    dequantised = w_q.double() * w_scale.double()[:, None]
    packed = memkern.ops.pack_int8_weight(w_q)
    return [
        ("int8_linear", "int8_linear", lambda x, b: memkern.ops.int8_linear(x, w_q, w_scale, b), dequantised),
        (
            "int8_linear_packed",
            "int8_linear_packed",
            lambda x, b: memkern.ops.int8_linear_packed(x, packed, w_scale, b),
            dequantised,
        ),
        (
            "int8_weight_only_linear",
            "int8_weight_only_linear",
            lambda x, b: memkern.ops.int8_weight_only_linear(x, w_q, w_scale, b),
            dequantised,
        ),
        ("fp16_linear", "fp16_linear", lambda x, b: memkern.ops.fp16_linear(x, w_half, b), w_half.double()),
    ]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("index", range(4), ids=[c[0] for c in _lowp_cases()])
def test_lowp_double_backward_matches_float64(backend, index):
    name, table, f, w64 = _lowp_cases()[index]
    x0 = _exact_int8_activations(5, 13)
    b0 = torch.randn(9)
    require_backend(table, backend, x0)
    x, b = x0.clone().requires_grad_(), b0.clone().requires_grad_()
    with memkern.use_backend(backend):
        gx, gb = _second_order(f, x, b)
    # straight through the activation quantisation: y is linear in x with the dequantised weight
    x64, b64 = x0.double().requires_grad_(), b0.double().requires_grad_()
    ref_gx, ref_gb = _second_order(lambda x, b: x @ w64.t() + b, x64, b64)
    assert_rel_close(gx, ref_gx, torch.float32, factor=10)
    assert_rel_close(gb, ref_gb, torch.float32, factor=10)


# -- pruned weights ------------------------------------------------------------------------------------
def _sparse_weights():
    w = torch.randn(24, 32)
    mask = torch.zeros(24, 32, dtype=torch.bool)
    mask[:, 0::4] = mask[:, 2::4] = True  # 2:4, and whole 16 x 16 blocks kept by the block format
    mask[:16, :16] = False
    return (
        memkern.ops.BlockSparseWeight.from_dense(w, mask, block=(16, 16)),
        memkern.ops.Sparse24Weight.from_dense(w, mask),
    )


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kind", ["block", "2:4"])
def test_masked_matmul_double_backward_with_frozen_weight(backend, kind):
    block, s24 = _sparse_weights()
    weight = block if kind == "block" else s24
    x0, b0 = torch.randn(5, 32), torch.randn(24)
    table = "block_sparse_matmul" if kind == "block" else "sparse24_matmul"
    require_backend(table, backend, x0)
    x, b = x0.clone().requires_grad_(), b0.clone().requires_grad_()
    f = lambda x, b: memkern.ops.masked_matmul(x, weight, b)  # noqa: E731
    if kind == "block":
        # the block-sparse backward is a kernel of its own: differentiating it is refused
        with memkern.use_backend(backend), pytest.raises(RuntimeError, match="memkern.block_sparse_matmul_backward"):
            _second_order(f, x, b)
        return
    # the 2:4 backward is made of differentiable tensor operations around the weight
    with memkern.use_backend(backend):
        gx, gb = _second_order(f, x, b)
    w64 = weight.to_dense().double()
    x64, b64 = x0.double().requires_grad_(), b0.double().requires_grad_()
    ref_gx, ref_gb = _second_order(lambda x, b: x @ w64.t() + b, x64, b64)
    assert_rel_close(gx, ref_gx, torch.float32, factor=10)
    assert_rel_close(gb, ref_gb, torch.float32, factor=10)


@pytest.mark.parametrize("kind", ["block", "2:4"])
def test_masked_matmul_double_backward_through_trained_values_is_an_error(kind):
    block, s24 = _sparse_weights()
    weight = block if kind == "block" else s24
    weight.values.requires_grad_()
    x = torch.randn(5, 32, requires_grad=True)
    y = memkern.ops.masked_matmul(x, weight)
    grads = torch.autograd.grad((y * y).sum() / 2, (x, weight.values), create_graph=True)
    op = "block_sparse_matmul_backward" if kind == "block" else "sparse24_decompress"
    with pytest.raises(RuntimeError, match=f"memkern.{op}"):
        sum(g.pow(2).sum() for g in grads).backward()


def test_quantize_rowwise_is_not_differentiable():
    # q is int8 and the scale an absmax: no gradient is defined, and asking for one says so
    x = torch.randn(4, 9, requires_grad=True)
    _, scale = memkern.ops.quantize_rowwise(x)
    with pytest.raises(RuntimeError, match="memkern.quantize_rowwise"):
        scale.sum().backward()


def test_reference_kd_loss_supports_double_backward():
    # What the error message points to for a gradient penalty: the plain PyTorch reference.
    s = torch.randn(3, 11, dtype=torch.float64, requires_grad=True)
    t, y = torch.randn(3, 11, dtype=torch.float64), torch.arange(3)
    f = lambda s: reference.kd_loss(s, t, y, alpha=0.3, temperature=2.0)  # noqa: E731
    assert torch.autograd.gradgradcheck(f, (s,))
