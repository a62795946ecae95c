"""kd_loss_topk and linear_kd_loss_topk: every CPU backend against the k + 1 bucket
distributions built explicitly here in float64, edge cases (k = 1, k = V, masked logits, an
empty teacher tail, ignored rows), gradients, memory of the fused-linear form, bad input."""

from __future__ import annotations

import math

import pytest
import torch

import memkern
from memkern import reference_topk
from memkern.kernels import kd_chunks
from memkern.ops import kd_topk_ops
from memkern.ops.kd_topk import kd_loss_topk, linear_kd_loss_topk
from conftest import (
    CPU_BACKENDS,
    KDOptions64,
    LargestTensor,
    assert_compiled_matches_eager,
    assert_rel_close,
    require_backend,
)


# -- the expected values, from the definition --------------------------------------------------
def _kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum a log(a / b) per row, 0 log 0 = 0 (the logs see 1 where a = 0: no 0 * inf in autograd)."""
    ones = torch.ones_like(a)
    terms = a * (torch.log(torch.where(a > 0, a, ones)) - torch.log(torch.where(a > 0, b, ones)))
    return terms.sum(-1)


def expected_topk_loss(s, lp, idx, labels, *, reduction="mean", **options):
    """Float64, differentiable in s: the student's softmax summed into buckets with an explicit
    mask, the teacher's bucket probabilities p_j and 1 - sum p raised to 1 / T and normalised."""
    alpha, temperature, divergence, beta, ignore_index, soft_loss_scale = KDOptions64(**options)
    vocab, k = s.shape[-1], lp.shape[-1]
    s2, lp2, idx2 = s.reshape(-1, vocab).double(), lp.reshape(-1, k).double(), idx.reshape(-1, k).long()
    q = torch.softmax(s2 / temperature, dim=-1)
    in_topk = torch.zeros_like(q, dtype=torch.bool).scatter_(1, idx2, True)
    student = torch.cat([q.gather(1, idx2), (q * ~in_topk).sum(-1, keepdim=True)], dim=-1)
    p = lp2.exp()
    tail = (1 - p.sum(-1, keepdim=True)).clamp_min(0) if k < vocab else torch.zeros_like(p[:, :1])
    teacher = torch.cat([p, tail], dim=-1) ** (1 / temperature)
    teacher = teacher / teacher.sum(-1, keepdim=True)
    if divergence == "forward_kl":
        d = _kl(teacher, student)
    elif divergence == "reverse_kl":
        d = _kl(student, teacher)
    else:
        mix = beta * teacher + (1 - beta) * student
        d = beta * _kl(teacher, mix) + (1 - beta) * _kl(student, mix)
    scale = temperature**2 if soft_loss_scale == "t2" else 1.0
    rows = (1 - alpha) * scale * d if alpha != 1 else torch.zeros_like(d)
    y = labels.reshape(-1) if labels is not None else None
    if y is not None:
        counted = y != ignore_index
        safe = torch.where(counted, y, torch.zeros_like(y))
        if alpha != 0:
            rows = rows - alpha * torch.log_softmax(s2, -1).gather(1, safe[:, None]).squeeze(1)
        rows = torch.where(counted, rows, torch.zeros_like(rows))
    if reduction == "none":
        return rows.reshape(s.shape[:-1])
    if reduction == "sum":
        return rows.sum()
    n = rows.numel() if y is None else int((y != ignore_index).sum())
    return rows.sum() / max(n, 1)


def teacher_topk(shape_lead, vocab, k, scale=2.0, dtype=torch.float32):
    """A teacher's top-k log-probabilities (temperature 1) and indices, as a server returns them."""
    logits = torch.randn(*shape_lead, vocab, dtype=torch.float64) * scale
    lp, idx = torch.log_softmax(logits, -1).topk(k, dim=-1)
    return lp.to(dtype), idx


def random_labels(lead, vocab, ignore_index=-100):
    labels = torch.randint(0, vocab, lead)
    return torch.where(torch.rand(lead) < 0.25, torch.full_like(labels, ignore_index), labels)


def run(backend, fn, *args, **kwargs):
    with memkern.use_backend(backend):
        return fn(*args, **kwargs)


def check_against_expected(backend, s, lp, idx, labels, dtype=torch.float32, **opts):
    """Loss and d loss / d s of a backend against expected_topk_loss's (autograd in float64)."""
    x = s.detach().to(dtype).requires_grad_()
    require_backend("kd_loss_topk_rows", backend, x.detach().reshape(-1, s.shape[-1]))
    loss = run(backend, kd_loss_topk, x, lp, idx, labels, **opts)
    upstream = torch.rand_like(loss, dtype=torch.float64) + 0.5
    (grad,) = torch.autograd.grad(loss, x, upstream.to(loss.dtype))
    s64 = s.detach().double().requires_grad_()
    ref = expected_topk_loss(s64, lp.double(), idx, labels, **opts)
    (ref_grad,) = torch.autograd.grad(ref, s64, upstream)
    assert_rel_close(loss, ref, dtype)
    assert_rel_close(grad, ref_grad, dtype)


# (lead shape, V, k, options): every divergence, reduction and label mode, T above and below
# 1, both loss scales, k = 1, k = V, a 3-D batch
CASES = [
    ((6,), 37, 5, dict(alpha=0.3, temperature=2.0, divergence="forward_kl", reduction="mean")),
    ((2, 3), 50, 1, dict(alpha=0.0, temperature=0.5, divergence="reverse_kl", reduction="sum")),
    ((5,), 23, 23, dict(alpha=0.4, temperature=1.0, divergence="jsd", beta=0.3, reduction="none")),
    ((7,), 64, 8, dict(alpha=1.0, temperature=3.0, divergence="forward_kl", reduction="none")),
    ((2, 2), 19, 4, dict(alpha=0.0, temperature=1.5, divergence="jsd", reduction="mean", soft_loss_scale="none")),
    ((4,), 9, 9, dict(alpha=0.2, temperature=0.7, divergence="reverse_kl", reduction="mean", ignore_index=3)),
]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(
    "case", CASES, ids=lambda c: f"{c[0]}-V{c[1]}-k{c[2]}-{c[3]['divergence']}-{c[3]['reduction']}"
)
def test_kd_loss_topk_matches_the_bucket_definition(backend, case):
    lead, vocab, k, opts = case
    s = torch.randn(*lead, vocab) * 1.5  # float32 log-probabilities of |s| / T ~ 30 carry 1e-5 absolute errors
    lp, idx = teacher_topk(lead, vocab, k)
    labels = random_labels(lead, vocab, opts.get("ignore_index", -100))
    check_against_expected(backend, s, lp, idx, labels, **opts)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_without_labels_and_int32_indices(backend):
    s = torch.randn(5, 30) * 2
    lp, idx = teacher_topk((5,), 30, 6)
    check_against_expected(backend, s, lp, idx.int(), None, alpha=0.0, temperature=2.0, divergence="jsd")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_students(backend, dtype):
    s = torch.randn(4, 40) * 2
    lp, idx = teacher_topk((4,), 40, 5, dtype=dtype)
    check_against_expected(
        backend, s.to(dtype).float(), lp, idx, torch.tensor([1, -100, 7, 39]), dtype=dtype, alpha=0.3, temperature=2.0
    )


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_student_tail_far_below_float32_precision(backend):
    # The student puts all but ~1e-12 of its mass on the top-k while the teacher leaves 0.3
    # in the tail: 1 - sum(q_topk) is 0 in float32, the log-sum-exp over the tail is not,
    # and the forward KL's tail term 0.3 * log(0.3 / Q_tail) is about 8 nats.
    vocab, k = 50, 4
    idx = torch.stack([torch.randperm(vocab)[:k] for _ in range(3)])
    s = torch.zeros(3, vocab).scatter_(1, idx, 30.0 + torch.randn(3, k))
    lp = torch.log(torch.full((3, k), 0.7 / k))
    for divergence in ("forward_kl", "jsd"):
        check_against_expected(backend, s, lp, idx, None, alpha=0.0, divergence=divergence)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_teacher_tail_exactly_zero(backend):
    # exp of the log-probabilities sums to 1 (k = 1, a masked entry) or just past it, by
    # rounding (the tail is then 0 and the buckets renormalised): no teacher mass outside
    lp = torch.tensor([[0.0, -math.inf, -math.inf], [-0.69314, -1.38629, -1.38629]])
    idx = torch.tensor([[3, 0, 7], [1, 2, 9]])
    s = torch.randn(2, 10)
    check_against_expected(backend, s, lp, idx, torch.tensor([2, 9]), alpha=0.25, divergence="forward_kl")
    check_against_expected(backend, s, lp, idx, None, alpha=0.0, divergence="jsd", temperature=2.0)
    # reverse KL: the student's tail mass is where the teacher has none: +inf, NaN gradient
    x = s.clone().requires_grad_()
    loss = run(backend, kd_loss_topk, x, lp, idx, alpha=0.0, divergence="reverse_kl", reduction="none")
    assert torch.isinf(loss).all() and (loss > 0).all()
    loss.sum().backward()
    assert torch.isnan(x.grad).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_masked_student_logits(backend):
    vocab, k = 12, 3
    lp, idx = teacher_topk((4,), vocab, k)
    s = torch.randn(4, vocab)
    tail_entries = torch.ones(4, vocab, dtype=torch.bool).scatter_(1, idx, False)
    s[0, idx[0, 1]] = -math.inf  # a top-k entry the teacher favours
    s[1][tail_entries[1]] = -math.inf  # the whole tail: Q_tail = 0 under teacher tail mass
    s[2, tail_entries[2].nonzero()[0]] = -math.inf  # one tail entry
    # forward KL is +inf where the student cannot reach teacher mass; its gradient is the
    # finite closed form q - P * share
    x = s.clone().requires_grad_()
    loss = run(backend, kd_loss_topk, x, lp, idx, alpha=0.0, reduction="none")
    assert torch.isinf(loss[:2]).all() and torch.isfinite(loss[2:]).all()
    loss[2:].sum().backward()
    assert torch.isfinite(x.grad).all()
    ref = expected_topk_loss(s.double(), lp.double(), idx, None, alpha=0.0, reduction="none")
    assert_rel_close(loss[2:], ref[2:], torch.float32)
    # jsd is finite everywhere, and its gradient 0 at the masked entries
    check_against_expected(backend, s[2:], lp[2:], idx[2:], None, alpha=0.0, divergence="jsd")
    x = s.clone().requires_grad_()
    run(backend, kd_loss_topk, x, lp, idx, alpha=0.0, divergence="jsd", reduction="sum").backward()
    assert torch.isfinite(x.grad).all() and (x.grad[torch.isinf(s)] == 0).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_undefined_and_ignored_rows(backend):
    lp, idx = teacher_topk((4,), 8, 2)
    s = torch.randn(4, 8)
    s[0, 5] = math.nan
    s[1] = -math.inf
    lp = lp.clone()
    lp[2, 0] = math.nan
    labels = torch.tensor([1, 2, 3, 4])
    loss = run(backend, kd_loss_topk, s, lp, idx, labels, reduction="none")
    assert torch.isnan(loss[:3]).all() and torch.isfinite(loss[3])
    ignored = torch.tensor([-100, -100, -100, 4])  # NaN rows that are ignored give 0
    x = s.clone().requires_grad_()
    loss = run(backend, kd_loss_topk, x, lp, idx, ignored, reduction="none")
    assert (loss[:3] == 0).all() and torch.isfinite(loss[3])
    loss.sum().backward()
    assert (x.grad[:3] == 0).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_all_rows_ignored(backend):
    lp, idx = teacher_topk((2, 3), 16, 4)
    x = torch.randn(2, 3, 16, requires_grad=True)
    loss = run(backend, kd_loss_topk, x, lp, idx, torch.full((2, 3), -100))
    assert loss.item() == 0.0
    loss.backward()
    assert (x.grad == 0).all()


@pytest.mark.parametrize("backend", ["cpp", "torch"])
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_gradcheck_float64(backend, divergence):
    s = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    lp, idx = teacher_topk((3,), 7, 3, dtype=torch.float64)
    labels = torch.tensor([1, -100, 6])
    require_backend("kd_loss_topk_rows", backend, s.detach())
    opts = dict(alpha=0.3, temperature=1.5, divergence=divergence, reduction="none")
    with memkern.use_backend(backend):
        assert torch.autograd.gradcheck(lambda x: kd_loss_topk(x, lp, idx, labels, **opts), (s,))


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_reference_closed_form_gradient_is_autograd(divergence):
    s = torch.randn(4, 15, dtype=torch.float64, requires_grad=True)
    lp, idx = teacher_topk((4,), 15, 5, dtype=torch.float64)
    labels = torch.tensor([0, 14, -100, 3])
    opts = dict(alpha=0.2, temperature=0.8, divergence=divergence, beta=0.5, ignore_index=-100, kd_scale=0.64)
    rows = reference_topk.kd_topk_loss_rows(s, lp, idx, labels, **opts)
    weights = torch.rand(4, dtype=torch.float64)
    (auto,) = torch.autograd.grad((rows * weights).sum(), s)
    closed = reference_topk.kd_topk_loss_rows_grad(s.detach(), lp, idx, labels, weights, **opts)
    torch.testing.assert_close(closed, auto, rtol=1e-10, atol=1e-12)


def test_teacher_gets_no_gradient():
    lp, idx = teacher_topk((3,), 10, 2)
    lp.requires_grad_()
    s = torch.randn(3, 10, requires_grad=True)
    kd_loss_topk(s, lp, idx, torch.tensor([1, 2, 3])).backward()
    assert s.grad is not None and lp.grad is None


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_opcheck(backend):
    s = torch.randn(2, 3, 21, requires_grad=True)
    lp, idx = teacher_topk((2, 3), 21, 4)
    labels = torch.tensor([[1, -100, 4], [0, 20, 3]])
    require_backend("kd_loss_topk_rows", backend, s.detach().reshape(-1, 21))
    with memkern.use_backend(backend):
        for reduction, div in (("mean", "forward_kl"), ("none", "jsd")):
            torch.library.opcheck(
                torch.ops.memkern.kd_loss_topk.default,
                (s, lp, idx, labels, 0.3, 2.0, div, 0.5, -100, reduction, 4.0, True),
            )


def test_cuda_kernel_leaves_large_k_to_the_others():
    table = memkern.backends.OPS["kd_loss_topk_rows"]
    s, lp, idx = torch.randn(2, 2000), torch.zeros(2, 1025), torch.zeros(2, 1025, dtype=torch.long)
    assert "above the CUDA kernel's 1024" in table.impls["cuda"].check(s, lp, idx)
    assert table.impls["cuda"].check(s, lp[:, :1024], idx[:, :1024]) is None


# -- fused-linear form ------------------------------------------------------------------------
@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of a few rows, so every test crosses chunk boundaries."""
    monkeypatch.setitem(kd_chunks.CHUNK_ELEMENTS, "cpu", 200)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(
    "opts",
    [
        dict(alpha=0.3, temperature=2.0, divergence="forward_kl", reduction="mean"),
        dict(alpha=0.5, temperature=0.5, divergence="reverse_kl", reduction="none"),
        dict(alpha=0.1, temperature=1.0, divergence="jsd", reduction="sum", soft_loss_scale="none"),
    ],
    ids=lambda o: f"{o['divergence']}-{o['reduction']}",
)
@pytest.mark.parametrize("bias", [False, True])
def test_linear_matches_the_bucket_definition(backend, opts, bias, small_chunks):
    rows, hidden, vocab, k = (2, 7), 6, 40, 5  # 40-row... 8 rows of 40 logits a chunk
    hs = torch.randn(*rows, hidden)
    ws = torch.randn(vocab, hidden) * 0.5
    bs = torch.randn(vocab) if bias else None
    lp, idx = teacher_topk(rows, vocab, k)
    labels = random_labels(rows, vocab)
    require_backend("kd_loss_topk_rows", backend, hs.reshape(-1, hidden))
    ins = [hs.clone().requires_grad_(), ws.clone().requires_grad_()] + ([bs.clone().requires_grad_()] if bias else [])
    loss = run(
        backend, linear_kd_loss_topk, ins[0], ins[1], lp, idx, labels, student_bias=ins[2] if bias else None, **opts
    )
    upstream = torch.rand_like(loss, dtype=torch.float64) + 0.5
    grads = torch.autograd.grad(loss, ins, upstream.float())
    ins64 = [x.detach().double().requires_grad_() for x in ins]
    logits = torch.nn.functional.linear(ins64[0], ins64[1], ins64[2] if bias else None)
    ref = expected_topk_loss(logits, lp.double(), idx, labels, **opts)
    ref_grads = torch.autograd.grad(ref, ins64, upstream)
    assert_rel_close(loss, ref, torch.float32)
    for g, r in zip(grads, ref_grads):
        assert_rel_close(g, r, torch.float32)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_never_materialises_rows_by_vocab(backend, reduction, small_chunks):
    rows, hidden, vocab, k = 40, 4, 50, 5  # rows x vocab = 2000; chunks hold 200 // 50 = 4 rows
    hs = torch.randn(rows, hidden, requires_grad=True)
    ws = torch.randn(vocab, hidden, requires_grad=True)
    lp, idx = teacher_topk((rows,), vocab, k)
    labels = torch.randint(0, vocab, (rows,))
    require_backend("kd_loss_topk_rows", backend, hs.detach())
    with LargestTensor() as mode, memkern.use_backend(backend):
        loss = linear_kd_loss_topk(hs, ws, lp, idx, labels, reduction=reduction)
        loss.sum().backward()
    assert mode.largest <= vocab * hidden, f"a tensor of {mode.largest} elements (rows x vocab = {rows * vocab})"


def test_linear_opcheck():
    hs, ws = torch.randn(2, 3, 5, requires_grad=True), torch.randn(17, 5, requires_grad=True)
    lp, idx = teacher_topk((2, 3), 17, 3)
    labels = torch.tensor([[1, -100, 4], [0, 16, 3]])
    for reduction in ("mean", "none"):
        torch.library.opcheck(
            torch.ops.memkern.linear_kd_loss_topk.default,
            (hs, ws, None, lp, idx, labels, 0.3, 2.0, "forward_kl", 0.5, -100, reduction, 4.0, True),
        )


# -- bad input ----------------------------------------------------------------------------------
def _good():
    lp, idx = teacher_topk((3,), 10, 4)
    return torch.randn(3, 10), lp, idx


@pytest.mark.parametrize(
    "mutate, error, match",
    [
        (lambda s, lp, idx: (s, lp, idx.float()), TypeError, "teacher_topk_indices must have dtype int64 or int32"),
        (lambda s, lp, idx: (s, lp.long(), idx), TypeError, "teacher_topk_logprobs must have dtype"),
        (
            lambda s, lp, idx: (s, lp[:2], idx[:2]),
            ValueError,
            r"teacher_topk_logprobs must have shape \(3,\) \+ \(k,\)",
        ),
        (lambda s, lp, idx: (s, lp, idx[:, :3]), ValueError, "teacher_topk_indices must have the shape"),
        (lambda s, lp, idx: (s, lp[:, :0], idx[:, :0]), ValueError, r"k in \[1, 10\].*got k=0"),
        (lambda s, lp, idx: (s, torch.zeros(3, 11) - 3, torch.arange(11).expand(3, 11)), ValueError, "got k=11"),
        (
            lambda s, lp, idx: (s, lp, idx.clone().fill_(10)),
            ValueError,
            r"teacher_topk_indices must be in \[0, 10\); found 10",
        ),
        (lambda s, lp, idx: (s, lp, idx - 20), ValueError, r"must be in \[0, 10\); found -"),
        (
            lambda s, lp, idx: (s, lp, torch.tensor([[1, 2, 3, 4], [5, 5, 6, 7], [0, 1, 2, 3]])),
            ValueError,
            "distinct within a row.*holding 5 twice",
        ),
        (lambda s, lp, idx: (s, lp + 0.5, idx), ValueError, r"teacher_topk_logprobs must be log-probabilities \(<= 0"),
        (
            lambda s, lp, idx: (s, torch.log(torch.full((3, 4), 0.3)), idx),
            ValueError,
            r"exp\(teacher_topk_logprobs\) of a row must sum to at most 1.*1.2",
        ),
        (
            lambda s, lp, idx: (s, lp.unsqueeze(0), idx.unsqueeze(0)),
            ValueError,
            "teacher_topk_logprobs must have shape",
        ),
    ],
)
def test_bad_teacher_inputs(mutate, error, match):
    s, lp, idx = mutate(*_good())
    with pytest.raises(error, match=match):
        kd_loss_topk(s, lp, idx, torch.tensor([1, 2, 3]))
    h, w = torch.randn(3, 4), torch.randn(s.shape[-1], 4)
    with pytest.raises(error, match=match):
        linear_kd_loss_topk(h, w, lp, idx, torch.tensor([1, 2, 3]))


def test_logprob_rounding_within_tolerance_is_accepted():
    # a served bfloat16 log-probability of a near-certain token may round above 0
    lp = torch.tensor([[0.0078, -6.0], [-0.01, -5.0]], dtype=torch.bfloat16)
    idx = torch.tensor([[0, 1], [2, 3]])
    assert kd_topk_ops.logprob_tolerance(torch.bfloat16) > 0.0078
    assert torch.isfinite(kd_loss_topk(torch.randn(2, 6), lp, idx, alpha=0.0))


def test_bad_options_and_student():
    s, lp, idx = _good()
    with pytest.raises(ValueError, match="alpha must be 0"):
        kd_loss_topk(s, lp, idx, None)
    with pytest.raises(ValueError, match="temperature must be in"):
        kd_loss_topk(s, lp, idx, torch.tensor([1, 2, 3]), temperature=0.0)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 10\)"):
        kd_loss_topk(s, lp, idx, torch.tensor([1, 2, 30]))
    with pytest.raises(ValueError, match="student_logits must be 2-D or 3-D"):
        kd_loss_topk(s[0], lp[0], idx[0])
    with pytest.raises(ValueError, match="student_bias must have shape"):
        linear_kd_loss_topk(torch.randn(3, 4), torch.randn(10, 4), lp, idx, alpha=0.0, student_bias=torch.randn(9))
    with pytest.raises(ValueError, match="hidden size"):
        linear_kd_loss_topk(torch.randn(3, 5), torch.randn(10, 4), lp, idx, alpha=0.0)


def test_modules_are_the_functions():
    s = torch.randn(4, 12, requires_grad=True)
    lp, idx = teacher_topk((4,), 12, 3)
    y = torch.tensor([0, 5, -100, 11])
    opts = dict(alpha=0.2, temperature=2.0, divergence="jsd", beta=0.3)
    module = memkern.nn.KDLossTopK(**opts)
    torch.testing.assert_close(module(s, lp, idx, y), memkern.ops.kd_loss_topk(s, lp, idx, y, **opts), rtol=0, atol=0)
    h, w = torch.randn(4, 5), torch.randn(12, 5)
    linear = memkern.nn.LinearKDLossTopK(**opts)
    expected = memkern.ops.linear_kd_loss_topk(h, w, lp, idx, y, **opts)
    torch.testing.assert_close(linear(h, w, lp, idx, y), expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="KDLossTopK: temperature must be in"):
        memkern.nn.KDLossTopK(temperature=1e6)


def test_compiles_without_graph_breaks():
    def f(s, h, w, lp, idx, y):
        a = kd_loss_topk(s * 1.5, lp, idx, y, alpha=0.3, temperature=2.0)
        return a + linear_kd_loss_topk(h, w, lp, idx, y, divergence="reverse_kl")

    lp, idx = teacher_topk((3, 4), 23, 5)
    y = torch.randint(0, 23, (3, 4))
    s, h, w = torch.randn(3, 4, 23), torch.randn(3, 4, 6), torch.randn(23, 6)
    assert_compiled_matches_eager(f, [s, h, w], lp, idx, y)


def test_double_backward_is_refused():
    s = torch.randn(3, 9, requires_grad=True)
    lp, idx = teacher_topk((3,), 9, 2)
    (g,) = torch.autograd.grad(kd_loss_topk(s, lp, idx, torch.tensor([0, 1, 2])), s, create_graph=True)
    with pytest.raises(RuntimeError, match="kd_loss_topk: double backward is not supported"):
        g.pow(2).sum().backward()
