"""kd_loss and linear_kd_loss: every backend against the float64 reference, options, edge
cases, autograd, opcheck, torch.compile, bad input.

The option grid is not a cartesian product: each case below combines several options so
that every value of every option appears at least once (alpha, T, divergence, reduction,
soft_loss_scale, labels mode, shape).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest
import torch

import memkern
from memkern.kernels import kd_chunks
from memkern import reference
from memkern.ops import kd as kd_ops
from conftest import (
    CPU_BACKENDS,
    LargestTensor,
    assert_compiled_matches_eager,
    assert_rel_close,
    dtype_pairs,
    raises_naming,
    require_backend,
)


_LOSS_OPTIONS = ("alpha", "temperature", "divergence", "beta", "reduction", "soft_loss_scale")


@dataclass(frozen=True)
class Case:
    shape: tuple[int, ...]
    alpha: float
    temperature: float
    divergence: str
    reduction: str
    soft_loss_scale: str = "t2"
    labels: str = "random-ignored"  # "none", "random-ignored", "custom-ignore"
    beta: float = 0.5
    small_for_triton: tuple[int, ...] | None = None  # the interpreter runs one program per row

    def options(self) -> dict:
        """The keyword arguments of kd_loss: the loss options among the fields."""
        opts = {name: getattr(self, name) for name in _LOSS_OPTIONS}
        if self.labels == "custom-ignore":
            opts["ignore_index"] = 3  # a valid class index used as the ignore marker
        return opts

    @property
    def id(self) -> str:
        return (
            f"{'x'.join(map(str, self.shape))}-a{self.alpha}-T{self.temperature}-{self.divergence}"
            f"-{self.reduction}-{self.soft_loss_scale}-{self.labels}"
        )


CASES = [
    Case((47, 31, 123), 0.3, 2.0, "forward_kl", "mean", small_for_triton=(3, 5, 123)),
    Case((64, 257), 0.0, 0.5, "reverse_kl", "sum", "none", labels="none"),
    Case((33, 100), 1.0, 1.0, "jsd", "none", labels="custom-ignore"),
    Case((5, 7, 300), 0.3, 4.0, "jsd", "mean", "none", beta=0.2),
    Case((47, 31, 123), 0.3, 1.0, "reverse_kl", "none", labels="custom-ignore", small_for_triton=(2, 7, 123)),
    Case((17, 1000), 0.0, 2.0, "forward_kl", "none", labels="random-ignored"),
    Case((9, 2, 77), 1.0, 0.5, "forward_kl", "sum", "none"),
    Case((12, 65), 0.0, 4.0, "jsd", "sum", labels="none", beta=0.7),
]


def make_labels(case: Case, shape: tuple[int, ...], vocab: int) -> torch.Tensor | None:
    if case.labels == "none":
        return None
    labels = torch.randint(0, vocab, shape[:-1])
    drop = torch.rand(shape[:-1]) < 0.25
    ignore = -100 if case.labels == "random-ignored" else 3
    return torch.where(drop, torch.full_like(labels, ignore), labels)


def _reference_and_grad(s, t, labels, opts, upstream):
    s64 = s.detach().double().requires_grad_()
    ref = reference.kd_loss(s64, t.detach().double(), labels, **opts)
    ref.backward(upstream.double())
    return ref.detach(), s64.grad


# -- logits form ----------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_kd_loss_matches_float64_reference(backend, case, poisoned_outputs):
    shape = case.small_for_triton if backend == "triton" and case.small_for_triton else case.shape
    s = torch.randn(shape) * 3
    t = torch.randn(shape) * 3
    labels = make_labels(case, shape, shape[-1])
    opts = case.options()
    require_backend("kd_loss_rows", backend, s.reshape(-1, shape[-1]))
    student = s.clone().requires_grad_()
    with memkern.use_backend(backend):
        loss = memkern.ops.kd_loss(student, t, labels, **opts)
    upstream = torch.randn(loss.shape)  # any upstream gradient, per row for "none"
    loss.backward(upstream)
    ref, ref_grad = _reference_and_grad(s, t, labels, opts, upstream)
    assert loss.dtype == torch.float32 and loss.shape == ref.shape
    assert_rel_close(loss, ref, torch.float32)
    assert_rel_close(student.grad, ref_grad, torch.float32)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("s_dtype, t_dtype", dtype_pairs("f16-f32", "bf16-f16", "f32-bf16", "bf16-bf16"))
def test_kd_loss_mixed_dtypes(backend, s_dtype, t_dtype):
    shape = (6, 5, 211)
    s = (torch.randn(shape) * 3).to(s_dtype)
    t = (torch.randn(shape) * 3).to(t_dtype)
    labels = make_labels(Case(shape, 0.5, 2.0, "forward_kl", "mean"), shape, shape[-1])
    require_backend("kd_loss_rows", backend, s.reshape(-1, shape[-1]))
    opts = dict(alpha=0.5, temperature=2.0, divergence="reverse_kl")
    student = s.clone().requires_grad_()
    with memkern.use_backend(backend):
        loss = memkern.ops.kd_loss(student, t, labels, **opts)
    loss.backward()
    ref, ref_grad = _reference_and_grad(s, t, labels, opts, torch.ones(()))
    assert student.grad.dtype == s_dtype
    assert_rel_close(loss, ref, torch.float32, factor=10)  # statistics in fp32 on exact inputs
    assert_rel_close(student.grad, ref_grad, s_dtype)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_rows_ignored_gives_zero_not_nan(backend, reduction):
    s = torch.randn(4, 3, 50, requires_grad=True)
    t = torch.randn(4, 3, 50)
    labels = torch.full((4, 3), -100)
    require_backend("kd_loss_rows", backend, s.reshape(-1, 50))
    with memkern.use_backend(backend):
        loss = memkern.ops.kd_loss(s, t, labels, alpha=0.5, reduction=reduction)
    loss.sum().backward()
    assert torch.equal(loss, torch.zeros_like(loss))
    assert torch.equal(s.grad, torch.zeros_like(s))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
def test_huge_logits_are_finite_and_correct(backend, dtype, divergence):
    s = (torch.randn(6, 97) * 3).to(dtype)
    t = (torch.randn(6, 97) * 3).to(dtype)
    s[:, 5], s[:, 9] = 1e4, -1e4
    t[:, 7], t[:, 9] = 1e4, -1e4
    t[0] = s[0]  # identical distributions: the divergence is exactly 0
    labels = torch.tensor([5, 7, 9, 0, -100, 3])
    require_backend("kd_loss_rows", backend, s)
    opts = dict(alpha=0.3, temperature=2.0, divergence=divergence)
    student = s.clone().requires_grad_()
    with memkern.use_backend(backend):
        loss = memkern.ops.kd_loss(student, t, labels, **opts)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(student.grad).all()
    ref, ref_grad = _reference_and_grad(s, t, labels, opts, torch.ones(()))
    assert_rel_close(loss, ref, torch.float32, factor=10)
    assert_rel_close(student.grad, ref_grad, dtype)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_nan_input_gives_nan_loss(backend):
    s = torch.randn(5, 40)
    t = torch.randn(5, 40)
    s[2, 7] = float("nan")
    require_backend("kd_loss_rows", backend, s)
    with memkern.use_backend(backend):
        assert torch.isnan(memkern.ops.kd_loss(s, t, torch.arange(5))).item()
        per_row = memkern.ops.kd_loss(s, t, torch.arange(5), reduction="none")
    assert torch.isnan(per_row[2]) and torch.isfinite(per_row[[0, 1, 3, 4]]).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_teacher_gets_no_gradient(backend):
    s = torch.randn(6, 33, requires_grad=True)
    t = torch.randn(6, 33, requires_grad=True)
    require_backend("kd_loss_rows", backend, s)
    with memkern.use_backend(backend):
        memkern.ops.kd_loss(s, t, torch.arange(6)).backward()
    assert s.grad is not None and t.grad is None


def test_no_gradient_buffer_without_grad():
    s, t = torch.randn(6, 33), torch.randn(6, 33)
    out = torch.ops.memkern.kd_loss(s, t, None, 0.0, 1.0, "forward_kl", 0.5, -100, "mean", 1.0, False)
    assert out[1].numel() == 0
    with torch.no_grad():
        loss = memkern.ops.kd_loss(s.requires_grad_(), t, None, alpha=0.0)
    torch.testing.assert_close(loss, reference.kd_loss(s.detach(), t, None, alpha=0.0))


@pytest.mark.parametrize("backend", ["cpp", "torch"])
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_gradcheck_float64(backend, divergence):
    s = torch.randn(3, 2, 11, dtype=torch.float64, requires_grad=True)
    t = torch.randn(3, 2, 11, dtype=torch.float64)
    labels = torch.tensor([[1, -100], [4, 10], [0, 7]])
    require_backend("kd_loss_rows", backend, s.detach().reshape(-1, 11))
    for reduction in ("mean", "none"):

        def f(x, reduction=reduction):
            return memkern.ops.kd_loss(
                x, t, labels, alpha=0.3, temperature=2.0, divergence=divergence, beta=0.3, reduction=reduction
            )

        with memkern.use_backend(backend):
            assert torch.autograd.gradcheck(f, (s,))


def test_repeated_backward():
    s = torch.randn(4, 20, requires_grad=True)
    t, y = torch.randn(4, 20), torch.arange(4)
    # An upstream gradient of 1 leaves the saved gradient untouched: backward can repeat.
    loss = memkern.ops.kd_loss(s, t, y)
    first = torch.autograd.grad(loss, s, retain_graph=True)[0].clone()
    torch.testing.assert_close(torch.autograd.grad(loss, s)[0], first, rtol=0, atol=0)
    # Another scalar scales the saved gradient in place, so a second backward is refused.
    loss = memkern.ops.kd_loss(s, t, y)
    torch.testing.assert_close(torch.autograd.grad(loss * 0.5, s, retain_graph=True)[0], first * 0.5)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(loss * 0.5, s)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_opcheck_kd_loss(backend):
    s = torch.randn(2, 3, 29, requires_grad=True)
    t = torch.randn(2, 3, 29)
    labels = torch.tensor([[1, -100, 4], [0, 28, 3]])
    require_backend("kd_loss_rows", backend, s.detach().reshape(-1, 29))
    with memkern.use_backend(backend):
        for reduction, div in (("mean", "forward_kl"), ("none", "jsd")):
            torch.library.opcheck(
                torch.ops.memkern.kd_loss.default, (s, t, labels, 0.3, 2.0, div, 0.5, -100, reduction, 4.0, True)
            )


def test_kd_loss_compiles_without_graph_breaks():
    def f(s, t, y):
        return memkern.ops.kd_loss(s * 1.5, t, y, alpha=0.3, temperature=2.0)

    s = torch.randn(3, 4, 37)
    t = torch.randn(3, 4, 37)
    y = torch.randint(0, 37, (3, 4))
    assert_compiled_matches_eager(f, [s], t, y)


def test_kdloss_module_is_the_function():
    s = torch.randn(5, 3, 40, requires_grad=True)
    t = torch.randn(5, 3, 40)
    y = torch.randint(0, 40, (5, 3))
    module = memkern.nn.KDLoss(alpha=0.2, temperature=3.0, divergence="reverse_kl")
    assert "reverse_kl" in repr(module)
    expected = memkern.ops.kd_loss(s, t, y, alpha=0.2, temperature=3.0, divergence="reverse_kl")
    torch.testing.assert_close(module(s, t, y), expected, rtol=0, atol=0)


def test_default_backend_on_cpu_is_cpp_when_built():
    from memkern import _library, backends

    expected = "cpp" if _library.has_cpp() else "torch"
    assert backends.OPS["kd_loss_rows"].select(torch.randn(2, 3)).backend == expected
    assert backends.OPS["linear_kd_loss"].select(torch.randn(2, 3)).backend == expected


# -- bad input ------------------------------------------------------------------------------------
def _s():
    return torch.randn(4, 10)


def _hidden_and_weights(**shapes):
    """linear_kd_loss's hidden states and weights: 4 rows, hidden sizes 8 and 5, a vocabulary of
    10, with the shapes named in ``shapes`` changed."""
    shapes = {
        "student_hidden": (4, 8),
        "student_weight": (10, 8),
        "teacher_hidden": (4, 5),
        "teacher_weight": (10, 5),
        **shapes,
    }
    return [torch.randn(shape) for shape in shapes.values()]


BAD_CALLS = {
    "vocab-mismatch": (
        lambda: memkern.ops.kd_loss(_s(), torch.randn(4, 12), torch.arange(4)),
        ValueError,
        ["10", "12", "vocabulary"],
    ),
    "T-zero": (
        lambda: memkern.ops.kd_loss(_s(), _s(), torch.arange(4), temperature=0.0),
        ValueError,
        ["temperature", "0.0"],
    ),
    "T-negative": (
        lambda: memkern.ops.kd_loss(_s(), _s(), torch.arange(4), temperature=-1.0),
        ValueError,
        ["temperature"],
    ),
    "alpha-above-1": (
        lambda: memkern.ops.kd_loss(_s(), _s(), torch.arange(4), alpha=1.5),
        ValueError,
        ["alpha", "[0, 1]", "1.5"],
    ),
    "alpha-negative": (lambda: memkern.ops.kd_loss(_s(), _s(), torch.arange(4), alpha=-0.1), ValueError, ["alpha"]),
    "label-too-big": (
        lambda: memkern.ops.kd_loss(_s(), _s(), torch.tensor([0, 1, 10, 2])),
        ValueError,
        ["labels", "[0, 10)", "10"],
    ),
    "label-negative": (
        lambda: memkern.ops.kd_loss(_s(), _s(), torch.tensor([0, -5, 1, 2])),
        ValueError,
        ["labels", "-5"],
    ),
    "no-labels-with-alpha": (
        lambda: memkern.ops.kd_loss(_s(), _s(), None, alpha=0.5),
        ValueError,
        ["labels=None", "alpha"],
    ),
    "labels-shape": (lambda: memkern.ops.kd_loss(_s(), _s(), torch.arange(3)), ValueError, ["labels", "(4,)", "(3,)"]),
    "labels-float": (
        lambda: memkern.ops.kd_loss(_s(), _s(), torch.arange(4.0)),
        TypeError,
        ["labels", "int64", "float32"],
    ),
    "divergence": (
        lambda: memkern.ops.kd_loss(_s(), _s(), torch.arange(4), divergence="kl"),
        ValueError,
        ["divergence", "'kl'"],
    ),
    "jsd-beta": (
        lambda: memkern.ops.kd_loss(_s(), _s(), torch.arange(4), divergence="jsd", beta=0.0),
        ValueError,
        ["beta", "(0, 1)"],
    ),
    "reduction": (
        lambda: memkern.ops.kd_loss(_s(), _s(), torch.arange(4), reduction="avg"),
        ValueError,
        ["reduction", "'avg'"],
    ),
    "soft-loss-scale": (
        lambda: memkern.ops.kd_loss(_s(), _s(), torch.arange(4), soft_loss_scale="T2"),
        ValueError,
        ["soft_loss_scale"],
    ),
    "int-logits": (
        lambda: memkern.ops.kd_loss(_s().long(), _s(), torch.arange(4)),
        TypeError,
        ["student_logits", "int64"],
    ),
    "1-D": (lambda: memkern.ops.kd_loss(torch.randn(10), torch.randn(10)), ValueError, ["student_logits", "1-D"]),
    "shape-mismatch": (
        lambda: memkern.ops.kd_loss(torch.randn(2, 2, 10), torch.randn(4, 10), alpha=0.0),
        ValueError,
        ["shape"],
    ),
    "hidden-weight-mismatch": (
        lambda: memkern.ops.linear_kd_loss(*_hidden_and_weights(student_weight=(10, 6)), torch.arange(4)),
        ValueError,
        ["student_hidden", "8", "student_weight", "6"],
    ),
    "linear-vocab-mismatch": (
        lambda: memkern.ops.linear_kd_loss(*_hidden_and_weights(teacher_weight=(12, 5)), torch.arange(4)),
        ValueError,
        ["10", "12", "vocabulary"],
    ),
    "linear-rows-mismatch": (
        lambda: memkern.ops.linear_kd_loss(*_hidden_and_weights(teacher_hidden=(3, 5)), torch.arange(4)),
        ValueError,
        ["teacher_hidden", "rows"],
    ),
    "bias-shape": (
        lambda: memkern.ops.linear_kd_loss(*_hidden_and_weights(), torch.arange(4), student_bias=torch.randn(9)),
        ValueError,
        ["student_bias", "(10,)", "(9,)"],
    ),
    "linear-label-range": (
        lambda: memkern.ops.linear_kd_loss(*_hidden_and_weights(), torch.tensor([0, 1, 2, 10])),
        ValueError,
        ["labels", "[0, 10)"],
    ),
    "empty-vocab": (
        lambda: memkern.ops.kd_loss(torch.randn(4, 0), torch.randn(4, 0), None, alpha=0.0),
        ValueError,
        ["vocabulary", "at least one", "(4, 0)"],
    ),
    "linear-empty-vocab": (
        lambda: memkern.ops.linear_kd_loss(
            *_hidden_and_weights(student_weight=(0, 8), teacher_weight=(0, 5)), None, alpha=0.0
        ),
        ValueError,
        ["vocabulary", "at least one", "student_weight", "(0, 8)"],
    ),
}


@pytest.mark.parametrize("call, error, words", list(BAD_CALLS.values()), ids=list(BAD_CALLS))
def test_bad_input_is_a_clear_error(call, error, words):
    with raises_naming(error, words):
        call()


# -- fused-linear form ------------------------------------------------------------------------------
@dataclass(frozen=True)
class LinearCase:
    rows: tuple[int, ...]
    hidden_s: int
    hidden_t: int
    vocab: int
    case: Case
    bias: bool = True
    extra: dict = field(default_factory=dict)

    @property
    def id(self) -> str:
        rows = "x".join(map(str, self.rows))
        return f"{rows}-h{self.hidden_s}/{self.hidden_t}-v{self.vocab}-bias{self.bias}-{self.case.id}"


LINEAR_CASES = [
    LinearCase((47, 31), 24, 40, 123, Case((0,), 0.3, 2.0, "forward_kl", "mean")),
    LinearCase((37,), 16, 16, 257, Case((0,), 0.0, 0.5, "reverse_kl", "none", "none", labels="none"), bias=False),
    LinearCase((5, 9), 32, 8, 77, Case((0,), 1.0, 4.0, "jsd", "sum", labels="custom-ignore")),
    LinearCase((40,), 12, 20, 300, Case((0,), 0.3, 1.0, "jsd", "none", beta=0.2)),
]


def _linear_inputs(lc: LinearCase, dtype=torch.float32, t_dtype=None):
    t_dtype = t_dtype or dtype
    hs = torch.randn(*lc.rows, lc.hidden_s).to(dtype)
    ws = (torch.randn(lc.vocab, lc.hidden_s) / math.sqrt(lc.hidden_s) * 3).to(dtype)
    bs = torch.randn(lc.vocab).to(dtype) if lc.bias else None
    ht = torch.randn(*lc.rows, lc.hidden_t).to(t_dtype)
    wt = (torch.randn(lc.vocab, lc.hidden_t) / math.sqrt(lc.hidden_t) * 3).to(t_dtype)
    bt = torch.randn(lc.vocab).to(t_dtype) if lc.bias else None
    labels = make_labels(lc.case, (*lc.rows, lc.vocab), lc.vocab)
    return hs, ws, bs, ht, wt, bt, labels


def _linear_reference(hs, ws, bs, ht, wt, bt, labels, opts, upstream):
    leaves = [x.detach().double().requires_grad_() if x is not None else None for x in (hs, ws, bs)]
    d = lambda x: x.detach().double() if x is not None else None  # noqa: E731
    ref = reference.linear_kd_loss(
        leaves[0], leaves[1], d(ht), d(wt), labels, student_bias=leaves[2], teacher_bias=d(bt), **opts
    )
    ref.backward(upstream.double())
    return ref.detach(), [x.grad if x is not None else None for x in leaves]


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of a few rows, so every test crosses chunk boundaries."""
    monkeypatch.setitem(kd_chunks.CHUNK_ELEMENTS, "cpu", 2000)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("lc", LINEAR_CASES, ids=lambda c: c.id)
def test_linear_kd_loss_matches_float64_reference(backend, lc, small_chunks):
    if backend == "triton" and math.prod(lc.rows) > 40:
        lc = LinearCase((2, 9), lc.hidden_s, lc.hidden_t, lc.vocab, lc.case, lc.bias)  # interpreter time
    hs, ws, bs, ht, wt, bt, labels = _linear_inputs(lc)
    require_backend("linear_kd_loss", backend, hs.reshape(-1, lc.hidden_s))
    opts = lc.case.options()
    leaves = [x.clone().requires_grad_() if x is not None else None for x in (hs, ws, bs)]
    with memkern.use_backend(backend):  # backward too: reduction="none" recomputes there
        loss = memkern.ops.linear_kd_loss(
            leaves[0], leaves[1], ht, wt, labels, student_bias=leaves[2], teacher_bias=bt, **opts
        )
        upstream = torch.randn(loss.shape)
        loss.backward(upstream)
    ref, ref_grads = _linear_reference(hs, ws, bs, ht, wt, bt, labels, opts, upstream)
    assert_rel_close(loss, ref, torch.float32)
    for leaf, ref_grad in zip(leaves, ref_grads):
        if leaf is not None:
            assert leaf.grad.dtype == leaf.dtype
            assert_rel_close(leaf.grad, ref_grad, torch.float32, factor=3)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])  # "none": the forward without gradients
def test_linear_kd_loss_mixed_dtypes(backend, reduction, small_chunks):
    lc = LinearCase((6, 5), 16, 24, 131, Case((0,), 0.5, 2.0, "forward_kl", reduction))
    hs, ws, bs, ht, wt, bt, labels = _linear_inputs(lc, torch.bfloat16, torch.float32)
    require_backend("linear_kd_loss", backend, hs.reshape(-1, 16))
    leaves = [x.clone().requires_grad_() for x in (hs, ws, bs)]
    opts = lc.case.options()
    with memkern.use_backend(backend):
        loss = memkern.ops.linear_kd_loss(
            leaves[0], leaves[1], ht, wt, labels, student_bias=leaves[2], teacher_bias=bt, **opts
        )
        upstream = torch.rand(loss.shape) + 0.5
        loss.backward(upstream)
    ref, ref_grads = _linear_reference(hs, ws, bs, ht, wt, bt, labels, opts, upstream)
    # The logits themselves are bf16 matmul outputs, as in the eager composition.
    assert_rel_close(loss, ref, torch.bfloat16)
    for leaf, ref_grad in zip(leaves, ref_grads):
        assert leaf.grad.dtype == torch.bfloat16
        assert_rel_close(leaf.grad, ref_grad, torch.bfloat16, factor=2)


@pytest.mark.parametrize("backend", ["cpp", "torch"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_gradcheck_float64(backend, reduction, small_chunks):
    hs = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    ws = torch.randn(13, 5, dtype=torch.float64, requires_grad=True)
    bs = torch.randn(13, dtype=torch.float64, requires_grad=True)
    ht, wt = torch.randn(7, 3, dtype=torch.float64), torch.randn(13, 3, dtype=torch.float64)
    labels = torch.tensor([1, -100, 4, 12, 0, 7, 7])
    require_backend("linear_kd_loss", backend, hs.detach())

    def f(h, w, b):
        return memkern.ops.linear_kd_loss(
            h, w, ht, wt, labels, student_bias=b, alpha=0.4, temperature=1.5, divergence="jsd", reduction=reduction
        )

    with memkern.use_backend(backend):
        assert torch.autograd.gradcheck(f, (hs, ws, bs))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_opcheck_linear_kd_loss(backend):
    hs = torch.randn(6, 8, requires_grad=True)
    ws = torch.randn(21, 8, requires_grad=True)
    bs = torch.randn(21, requires_grad=True)
    ht, wt = torch.randn(6, 4), torch.randn(21, 4)
    labels = torch.tensor([1, -100, 4, 20, 0, 7])
    require_backend("linear_kd_loss", backend, hs.detach())
    with memkern.use_backend(backend):
        for reduction in ("mean", "none"):
            torch.library.opcheck(
                torch.ops.memkern.linear_kd_loss.default,
                (hs, ws, bs, ht, wt, None, labels, 0.3, 2.0, "forward_kl", 0.5, -100, reduction, 4.0, True),
            )


def test_linear_kd_loss_compiles_without_graph_breaks():
    def f(h, w, ht, wt, y):
        return memkern.ops.linear_kd_loss(h * 2, w, ht, wt, y, alpha=0.5, temperature=2.0, reduction="none").sum()

    h, w = torch.randn(9, 8), torch.randn(30, 8)
    ht, wt = torch.randn(9, 6), torch.randn(30, 6)
    y = torch.randint(0, 30, (9,))
    assert_compiled_matches_eager(f, [h, w], ht, wt, y)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_never_materialises_rows_by_vocab(reduction, small_chunks):
    rows, hidden, vocab = 64, 4, 100  # rows x vocab = 6400; chunks hold 2000 // 100 = 20 rows
    hs = torch.randn(rows, hidden, requires_grad=True)
    ws = torch.randn(vocab, hidden, requires_grad=True)
    ht, wt = torch.randn(rows, hidden), torch.randn(vocab, hidden)
    labels = torch.randint(0, vocab, (rows,))
    with LargestTensor() as mode:
        loss = memkern.ops.linear_kd_loss(hs, ws, ht, wt, labels, reduction=reduction)
        loss.sum().backward()
    assert mode.largest <= 2000, f"a tensor of {mode.largest} elements (rows x vocab = {rows * vocab})"


def test_teacher_of_linear_gets_no_gradient():
    hs, ws = torch.randn(5, 8, requires_grad=True), torch.randn(20, 8, requires_grad=True)
    ht, wt = torch.randn(5, 6, requires_grad=True), torch.randn(20, 6, requires_grad=True)
    memkern.ops.linear_kd_loss(hs, ws, ht, wt, torch.arange(5)).backward()
    assert hs.grad is not None and ws.grad is not None
    assert ht.grad is None and wt.grad is None


def test_linear_module_is_the_function():
    hs, ws = torch.randn(5, 8, requires_grad=True), torch.randn(20, 8)
    ht, wt = torch.randn(5, 6), torch.randn(20, 6)
    y = torch.arange(5)
    module = memkern.nn.LinearKDLoss(alpha=0.1, divergence="jsd", beta=0.3)
    expected = memkern.ops.linear_kd_loss(hs, ws, ht, wt, y, alpha=0.1, divergence="jsd", beta=0.3)
    torch.testing.assert_close(module(hs, ws, ht, wt, y), expected, rtol=0, atol=0)


def test_linear_all_rows_ignored():
    hs, ws = torch.randn(5, 8, requires_grad=True), torch.randn(20, 8, requires_grad=True)
    loss = memkern.ops.linear_kd_loss(hs, ws, torch.randn(5, 6), torch.randn(20, 6), torch.full((5,), -100))
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(hs.grad, torch.zeros_like(hs)) and torch.equal(ws.grad, torch.zeros_like(ws))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_matches_reference(backend, dtype):
    shape = (8, 129, 32003)
    s = (torch.randn(shape, device="cuda") * 3).to(dtype)
    t = (torch.randn(shape, device="cuda") * 3).to(dtype)
    labels = make_labels(CASES[0], shape, shape[-1]).cuda()
    require_backend("kd_loss_rows", backend, s.reshape(-1, shape[-1]))
    opts = dict(alpha=0.3, temperature=2.0, divergence="jsd")
    student = s.clone().requires_grad_()
    with memkern.use_backend(backend):
        loss = memkern.ops.kd_loss(student, t, labels, **opts)
    loss.backward()
    ref, ref_grad = _reference_and_grad(s.cpu(), t.cpu(), labels.cpu(), opts, torch.ones(()))
    assert_rel_close(loss.cpu(), ref, torch.float32, factor=10)
    assert_rel_close(student.grad.cpu(), ref_grad, dtype, factor=2)


def test_modules_check_options_at_construction():
    with pytest.raises(ValueError, match="KDLoss: temperature"):
        memkern.nn.KDLoss(temperature=0.0)
    with pytest.raises(ValueError, match="LinearKDLoss: divergence"):
        memkern.nn.LinearKDLoss(divergence="kl")


# -- temperature range ------------------------------------------------------------------------------
_LOW_T, _HIGH_T = kd_ops.TEMPERATURE_RANGE


def _linear_with(**opts):
    return memkern.ops.linear_kd_loss(
        torch.randn(4, 8), torch.randn(10, 8), torch.randn(4, 5), torch.randn(10, 5), torch.arange(4), **opts
    )


@pytest.mark.parametrize(
    "temperature",
    [1e-40, 1e20, 1e200, 10**400, float("inf"), float("nan"), _LOW_T / 2, _HIGH_T * 1.01],
    ids=["1e-40", "1e20", "1e200", "int-10^400", "inf", "nan", "below", "above"],
)
@pytest.mark.parametrize(
    "call",
    [
        lambda T: memkern.ops.kd_loss(_s(), _s(), torch.arange(4), temperature=T),
        lambda T: _linear_with(temperature=T),
        lambda T: memkern.nn.KDLoss(temperature=T),
        lambda T: memkern.nn.LinearKDLoss(temperature=T),
    ],
    ids=["kd_loss", "linear_kd_loss", "KDLoss", "LinearKDLoss"],
)
def test_temperature_outside_the_range_is_a_clear_error(call, temperature):
    with raises_naming(ValueError, ["temperature", f"[{_LOW_T:g}, {_HIGH_T:g}]", str(temperature)[:20]]):
        call(temperature)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("temperature", [_LOW_T, _HIGH_T], ids=["lowest", "highest"])
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_temperature_range_ends_match_float64(backend, temperature, divergence):
    s, t = torch.randn(6, 97) * 3, torch.randn(6, 97) * 3
    labels = torch.tensor([5, -100, 9, 0, 96, 3])
    require_backend("kd_loss_rows", backend, s)
    opts = dict(alpha=0.3, temperature=temperature, divergence=divergence, soft_loss_scale="none")
    student = s.clone().requires_grad_()
    with memkern.use_backend(backend):
        loss = memkern.ops.kd_loss(student, t, labels, **opts)
    loss.backward()
    ref, ref_grad = _reference_and_grad(s, t, labels, opts, torch.ones(()))
    # T = 100: the soft term is a float32 cancellation of terms ~gap / T (TEMPERATURE_RANGE)
    factor = 30 if temperature == _HIGH_T else 1
    assert_rel_close(loss, ref, torch.float32, factor=factor)
    assert_rel_close(student.grad, ref_grad, torch.float32, factor=factor)


# -- torch.compile with dynamic shapes --------------------------------------------------------------
def _compiled_matches_eager(module, make_inputs, grad_positions):
    compiled = torch.compile(module, fullgraph=True, dynamic=True, backend="aot_eager")
    for rows in (6, 11):  # a second shape reuses the dynamic graph
        inputs = make_inputs(rows)
        eager_inputs = [x.detach().clone().requires_grad_(x.requires_grad) for x in inputs]
        out_c, out_e = compiled(*inputs), module(*eager_inputs)
        out_c.sum().backward()
        out_e.sum().backward()
        torch.testing.assert_close(out_c, out_e)
        for i in grad_positions:
            torch.testing.assert_close(inputs[i].grad, eager_inputs[i].grad)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_kdloss_module_compiles_with_dynamic_shapes(reduction):
    module = memkern.nn.KDLoss(alpha=0.3, temperature=2.5, divergence="jsd", beta=0.4, reduction=reduction)

    def make_inputs(rows):
        return [torch.randn(rows, 37, requires_grad=True), torch.randn(rows, 37), torch.randint(0, 37, (rows,))]

    _compiled_matches_eager(module, make_inputs, [0])


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_kdloss_module_compiles_with_dynamic_shapes(reduction):
    module = memkern.nn.LinearKDLoss(alpha=0.3, temperature=0.7, divergence="reverse_kl", reduction=reduction)

    def make_inputs(rows):
        return [
            torch.randn(rows, 8, requires_grad=True),
            torch.randn(30, 8, requires_grad=True),
            torch.randn(rows, 6),
            torch.randn(30, 6),
            torch.randint(0, 30, (rows,)),
        ]

    _compiled_matches_eager(module, make_inputs, [0, 1])


# -- the modules pass every option on -----------------------------------------------------------------
# A value other than the default for every constructor option of both modules.
_NON_DEFAULT_OPTIONS = dict(
    alpha=0.2,
    temperature=3.0,
    divergence="jsd",
    beta=0.3,
    ignore_index=3,
    reduction="sum",
    soft_loss_scale="none",
    student_logit_scale=1.5,
    teacher_logit_scale=0.5,
    student_softcap=2.0,
    teacher_softcap=3.0,
    shared_vocab=30,
)
# Options that leave the loss's value as it is; tests/test_kd_options.py checks that the modules pass them on.
_VALUE_PRESERVING_OPTIONS = ("chunk_size", "return_components")


def test_every_module_option_is_covered():
    import inspect

    for module in (memkern.nn.KDLoss, memkern.nn.LinearKDLoss):
        params = [p for p in inspect.signature(module.__init__).parameters if p != "self"]
        assert sorted(params) == sorted([*_NON_DEFAULT_OPTIONS, *_VALUE_PRESERVING_OPTIONS]), module
        for name, value in _NON_DEFAULT_OPTIONS.items():
            assert inspect.signature(module.__init__).parameters[name].default != value, name


@pytest.mark.parametrize("option", sorted(_NON_DEFAULT_OPTIONS))
def test_modules_pass_each_option_on(option):
    # beta matters only for jsd, soft_loss_scale only at T != 1
    opts = {"divergence": "jsd", "temperature": 2.0, option: _NON_DEFAULT_OPTIONS[option]}
    if option == "divergence":
        opts["divergence"] = "reverse_kl"
    s, t = torch.randn(6, 40) * 2, torch.randn(6, 40) * 2
    labels = torch.tensor([3, 1, 3, 0, 39, 7])  # 3: a class, or the ignore marker
    hs, ws, ht, wt = torch.randn(6, 8), torch.randn(40, 8), torch.randn(6, 5), torch.randn(40, 5)
    calls = [
        (memkern.nn.KDLoss, (s, t, labels), memkern.ops.kd_loss),
        (memkern.nn.LinearKDLoss, (hs, ws, ht, wt, labels), memkern.ops.linear_kd_loss),
    ]
    for module, args, function in calls:
        expected = function(*args, **opts)
        default = function(*args, **{k: v for k, v in opts.items() if k != option})
        # the option changes the result here, so a module that dropped it would differ
        assert expected.shape != default.shape or not torch.allclose(expected, default), option
        torch.testing.assert_close(module(**opts)(*args), expected, rtol=0, atol=0)


# -- ignored rows holding NaN / inf --------------------------------------------------------------------
def _poison_ignored_rows(x: torch.Tensor, ignored: torch.Tensor) -> torch.Tensor:
    poisoned = x.clone()
    rows = ignored.nonzero().squeeze(1)
    poisoned[rows[0], 1] = float("nan")
    poisoned[rows[1], 0] = float("inf")
    poisoned[rows[1], 2] = float("-inf")
    return poisoned


@pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")  # NaN on purpose
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_ignored_rows_holding_nan_and_inf_logits_stay_out(backend, divergence):
    s, t = torch.randn(7, 45) * 3, torch.randn(7, 45) * 3
    labels = torch.tensor([4, -100, 0, -100, 44, 9, 2])
    ignored = labels == -100
    require_backend("kd_loss_rows", backend, s)
    opts = dict(alpha=0.4, temperature=2.0, divergence=divergence, reduction="none")
    student = _poison_ignored_rows(s, ignored).requires_grad_()
    with memkern.use_backend(backend):
        loss = memkern.ops.kd_loss(student, _poison_ignored_rows(t, ignored), labels, **opts)
    upstream = torch.rand(7) + 0.5
    loss.backward(upstream)
    ref, ref_grad = _reference_and_grad(s, t, labels, opts, upstream)  # clean copies
    assert torch.isfinite(loss).all() and torch.isfinite(student.grad).all()
    assert torch.equal(loss[ignored], torch.zeros(2))
    assert torch.equal(student.grad[ignored], torch.zeros(2, 45))
    assert_rel_close(loss, ref, torch.float32)
    assert_rel_close(student.grad, ref_grad, torch.float32)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])  # gradients in forward / recomputed in backward
def test_linear_ignored_rows_holding_nan_and_inf_stay_out(backend, reduction, small_chunks):
    lc = LinearCase((9,), 12, 10, 150, Case((0,), 0.3, 2.0, "jsd", reduction))
    hs, ws, bs, ht, wt, bt, _ = _linear_inputs(lc)
    labels = torch.tensor([5, -100, 0, 149, -100, 7, 3, 11, 2])
    ignored = labels == -100
    require_backend("linear_kd_loss", backend, hs)
    opts = lc.case.options()
    leaves = [
        _poison_ignored_rows(hs, ignored).requires_grad_(),
        ws.clone().requires_grad_(),
        bs.clone().requires_grad_(),
    ]
    with memkern.use_backend(backend):
        loss = memkern.ops.linear_kd_loss(
            leaves[0],
            leaves[1],
            _poison_ignored_rows(ht, ignored),
            wt,
            labels,
            student_bias=leaves[2],
            teacher_bias=bt,
            **opts,
        )
        upstream = torch.rand(loss.shape) + 0.5
        loss.backward(upstream)
    ref, ref_grads = _linear_reference(hs, ws, bs, ht, wt, bt, labels, opts, upstream)  # clean copies
    assert torch.isfinite(loss).all()
    assert_rel_close(loss, ref, torch.float32)
    for leaf, ref_grad in zip(leaves, ref_grads):
        assert torch.isfinite(leaf.grad).all()
        assert_rel_close(leaf.grad, ref_grad, torch.float32, factor=3)
    assert torch.equal(leaves[0].grad[ignored], torch.zeros(2, 12))
