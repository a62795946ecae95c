"""Masked and non-finite logits in kd_loss and linear_kd_loss, on every backend.

The semantics (memkern/reference.py, notes on masked logits): an entry of probability 0
(a -inf logit, or one masked with finfo.min) adds nothing to a KL sum, also where the
other distribution is 0 there (0 log 0 = 0); forward_kl is +inf where the teacher has
mass and the student's logit is -inf, reverse_kl the other way round, jsd is finite; the
gradient is finite where the loss is, is q - p (plus the cross entropy's) where forward_kl
is +inf, and NaN where reverse_kl is +inf; rows with NaN, +inf, or only -inf are NaN.

Expected values come from the float64 computation below (written from the definitions,
not from memkern) and from closed forms such as log(1.5). The fused-linear form gets its
masks through the biases, which is how an lm_head masks vocabulary entries.
"""

from __future__ import annotations

import math

import pytest
import torch

import memkern
from conftest import CPU_BACKENDS, assert_rel_close, require_backend

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy on inf/NaN

INF = math.inf
FMIN = torch.finfo(torch.float32).min
F32_MAX = torch.finfo(torch.float32).max
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")


# -- float64 truth ---------------------------------------------------------------------------
def _log_probs64(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """log softmax(z / T) in float64. Shifted logits that float32 cannot hold are -inf:
    the kernels compute (z - max z) / T in float32, where finfo.min / 0.5 is -inf."""
    z = logits.double()
    shifted = (z - z.max(-1, keepdim=True).values) / temperature
    shifted = torch.where(torch.isinf(shifted.float()), torch.full_like(shifted, -INF), shifted)
    return torch.log_softmax(shifted, dim=-1)


def _sum_a_log_a_over_b(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """sum_j a_j (log a_j - log b_j) over the entries with a_j > 0 (0 log 0 = 0)."""
    a = log_a.exp()
    return (a * torch.where(a > 0, log_a - log_b, torch.zeros_like(log_a))).sum(-1)


def truth_loss_rows(s, t, labels, *, alpha, temperature, divergence, beta=0.5, ignore_index=-100):
    """Per-row loss in float64: alpha * CE + (1 - alpha) * T^2 * D, 0 for ignored rows."""
    lq, lp = _log_probs64(s, temperature), _log_probs64(t, temperature)
    if divergence == "forward_kl":
        d = _sum_a_log_a_over_b(lp, lq)
    elif divergence == "reverse_kl":
        d = _sum_a_log_a_over_b(lq, lp)
    else:
        lm = torch.log(beta * lp.exp() + (1 - beta) * lq.exp())
        d = beta * _sum_a_log_a_over_b(lp, lm) + (1 - beta) * _sum_a_log_a_over_b(lq, lm)
    loss = (1 - alpha) * temperature**2 * d if alpha != 1 else torch.zeros_like(d)
    if labels is None:
        return loss
    counted = labels != ignore_index
    if alpha != 0:
        safe = torch.where(counted, labels, 0)  # -log softmax(s)[y], exact for huge logits too
        loss = loss - alpha * torch.log_softmax(s.double(), -1).gather(1, safe[:, None]).squeeze(1)
    return torch.where(counted, loss, torch.zeros_like(loss))


def truth_grad_rows(s, t, labels, *, alpha, temperature, divergence, beta=0.5, ignore_index=-100):
    """d sum_i l_i / d s in float64, from the derivatives of the definitions:
    d KL(p||q)/dz = q - p; d KL(q||p)/dz = q (r - sum q r) with r = log q - log p;
    d JSD/dz = (1 - beta) q (r - sum q r) with r = log q - log m; CE: softmax(s) - onehot(y);
    z = s / T, and every q r is 0 where q is 0."""
    lq, lp = _log_probs64(s, temperature), _log_probs64(t, temperature)
    q, p = lq.exp(), lp.exp()
    if divergence == "forward_kl":
        dz = q - p
    else:
        if divergence == "reverse_kl":
            r = lq - lp
        else:
            r = (1 - beta) * (lq - torch.log(beta * p + (1 - beta) * q))
        qr = torch.where(q > 0, q * r, torch.zeros_like(q))
        dz = qr - q * qr.sum(-1, keepdim=True)
    grad = (1 - alpha) * temperature * dz if alpha != 1 else torch.zeros_like(dz)
    if labels is None:
        return grad
    counted = labels != ignore_index
    if alpha != 0:
        ce = torch.softmax(s.double(), -1)
        ce[torch.arange(len(labels))[counted], labels[counted]] -= 1
        grad = grad + alpha * ce
    return torch.where(counted[:, None], grad, torch.zeros_like(grad))


# -- runners ----------------------------------------------------------------------------------
def run_kd(backend, s, t, labels, **opts):
    """(per-row loss, d sum(loss) / d s) from kd_loss on ``backend``."""
    require_backend("kd_loss_rows", backend, s)
    student = s.clone().requires_grad_()
    with memkern.use_backend(backend):
        loss = memkern.ops.kd_loss(student, t, labels, reduction="none", **opts)
    loss.sum().backward()
    return loss.detach(), student.grad


def run_linear(backend, hs, ws, bs, ht, wt, bt, labels, reduction="none", **opts):
    """(per-row loss, grad_h, grad_w, grad_b) from linear_kd_loss on ``backend``; the
    gradients of the sum of the rows, through ``reduction``: "none" (backward recomputes
    the logits) or "sum" (the gradients come from the forward pass)."""
    require_backend("linear_kd_loss", backend, hs, ws)
    h, w, b = (x.clone().requires_grad_() for x in (hs, ws, bs))
    with memkern.use_backend(backend):
        call = lambda reduction: memkern.ops.linear_kd_loss(  # noqa: E731
            h, w, ht, wt, labels, student_bias=b, teacher_bias=bt, reduction=reduction, **opts
        )
        loss = call(reduction)
        loss.sum().backward()
        if reduction != "none":
            with torch.no_grad():
                loss = call("none")
    return loss.detach(), h.grad, w.grad, b.grad


def truth_linear(hs, ws, bs, ht, wt, bt, labels, **opts):
    """Float64 truth of run_linear: logits in float64, then the chain rule by hand."""
    s = hs.double() @ ws.double().t() + bs.double()
    t = ht.double() @ wt.double().t() + bt.double()
    loss = truth_loss_rows(s, t, labels, **opts)
    g = truth_grad_rows(s, t, labels, **opts)
    return loss, g @ ws.double(), g.t() @ hs.double(), g.sum(0)


def assert_rows_match(loss, ref):
    """Infinite rows exactly where the truth's are; finite ones to fp32 accuracy."""
    assert torch.equal(torch.isinf(loss), torch.isinf(ref)), f"{loss} vs {ref}"
    assert torch.equal(torch.isnan(loss), torch.isnan(ref)), f"{loss} vs {ref}"
    fin = torch.isfinite(ref)
    assert_rel_close(loss[fin], ref[fin], torch.float32, factor=10)


# -- the two reported cases, exactly ---------------------------------------------------------
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_teacher_masked_with_finfo_min_where_student_is_tiny_gives_zero(backend, divergence):
    # student q = (1, e^-1e4), teacher p = (1, 0): every divergence is 0 and so is the gradient
    loss, grad = run_kd(
        backend,
        torch.tensor([[0.0, -1e4]]),
        torch.tensor([[0.0, FMIN]]),
        torch.tensor([0]),
        alpha=0.0,
        divergence=divergence,
    )
    assert loss.abs().max().item() <= 1e-7, loss
    assert grad.abs().max().item() <= 1e-7, grad


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("mask", [-INF, FMIN], ids=["-inf", "finfo.min"])
def test_teacher_masked_at_one_entry_closed_forms(backend, mask):
    s = torch.zeros(1, 3)
    t = torch.tensor([[0.0, 0.0, mask]])
    # p = (1/2, 1/2, 0), q = (1/3, 1/3, 1/3)
    loss, grad = run_kd(backend, s, t, None, alpha=0.0, divergence="forward_kl")
    assert abs(loss.item() - math.log(1.5)) <= 1e-6
    torch.testing.assert_close(grad, torch.tensor([[-1 / 6, -1 / 6, 1 / 3]]), rtol=1e-5, atol=1e-6)

    # jsd with beta = 1/2: m = (5/12, 5/12, 1/6)
    expected = 0.5 * math.log(6 / 5) + 0.5 * (2 / 3 * math.log(4 / 5) + 1 / 3 * math.log(2))
    loss, grad = run_kd(backend, s, t, None, alpha=0.0, divergence="jsd")
    assert abs(loss.item() - expected) <= 1e-6
    # d/dz = (1/2) q (r - sum q r), r = log(q/m) = (log 4/5, log 4/5, log 2)
    r = torch.tensor([math.log(4 / 5), math.log(4 / 5), math.log(2)], dtype=torch.float64)
    expected_grad = 0.5 * (r - r.mean()) / 3
    torch.testing.assert_close(grad.double(), expected_grad[None], rtol=1e-5, atol=1e-6)

    loss, grad = run_kd(backend, s, t, None, alpha=0.0, divergence="reverse_kl")
    if mask == -INF:  # the student has mass where the teacher has none
        assert loss.item() == INF
        assert torch.isnan(grad).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize(
    "s_mask, t_mask",
    [(-INF, -INF), (FMIN, FMIN), (FMIN, -INF), (-INF, FMIN)],
    ids=["-inf/-inf", "finfo.min/finfo.min", "finfo.min/-inf", "-inf/finfo.min"],
)
def test_masked_on_both_sides_at_the_same_entry_gives_the_unmasked_loss(backend, divergence, s_mask, t_mask):
    loss, grad = run_kd(
        backend,
        torch.tensor([[0.0, 0.0, s_mask]]),
        torch.tensor([[0.0, 0.0, t_mask]]),
        None,
        alpha=0.0,
        divergence=divergence,
    )
    assert loss.item() == 0.0
    assert torch.equal(grad, torch.zeros_like(grad))
    # and a non-trivial pair over the two live entries
    s = torch.tensor([[0.5, -1.0, s_mask]])
    t = torch.tensor([[-0.3, 0.8, t_mask]])
    loss, grad = run_kd(backend, s, t, None, alpha=0.0, divergence=divergence)
    ref = truth_loss_rows(s[:, :2], t[:, :2], None, alpha=0.0, temperature=1.0, divergence=divergence)
    assert abs(loss.item() - ref.item()) <= 1e-6
    assert grad[0, 2].item() == 0.0
    ref_grad = truth_grad_rows(s[:, :2], t[:, :2], None, alpha=0.0, temperature=1.0, divergence=divergence)
    torch.testing.assert_close(grad[:, :2].double(), ref_grad, rtol=1e-5, atol=1e-7)


# -- masks in general ---------------------------------------------------------------------------
# Which side masks more: "same" (both at the same entries), "teacher" (the teacher masks a
# few more entries: reverse_kl is +inf with a -inf mask), "student" (forward_kl is +inf).
# A finite mask value under the other side's mass is a logit like any other (a huge,
# finite term): that regime is left out, except at T < 1 where finfo.min / T is -inf.
RELATIONS = ("same", "teacher", "student")
MASK_PAIRS = {
    "-inf/-inf": (-INF, -INF),
    "finfo.min/finfo.min": (FMIN, FMIN),
    "finfo.min/-inf": (FMIN, -INF),
    "-inf/finfo.min": (-INF, FMIN),
}


def _finite_mask_under_mass(relation, divergence, s_mask, t_mask, temperature):
    if temperature < 1 or divergence == "jsd":
        return False
    none_side = {"teacher": t_mask, "student": s_mask}.get(relation)
    diverges = (relation, divergence) in (("teacher", "reverse_kl"), ("student", "forward_kl"))
    return diverges and none_side == FMIN


def _mask_cases(pair_ids, settings):
    """Parameters (relation, s_mask, t_mask, temperature, *rest of a setting, divergence) for
    every relation, mask pair, setting (temperature, *rest) and divergence, less the regime
    _finite_mask_under_mass leaves out."""
    for relation in RELATIONS:
        for pair_id in pair_ids:
            s_mask, t_mask = MASK_PAIRS[pair_id]
            for temperature, *rest in settings:
                for divergence in DIVERGENCES:
                    if not _finite_mask_under_mass(relation, divergence, s_mask, t_mask, temperature):
                        tag = "-".join([relation, pair_id, f"T{temperature}", *rest, divergence])
                        yield pytest.param(relation, s_mask, t_mask, temperature, *rest, divergence, id=tag)


def _masks(relation, rows, vocab, fraction=0.3):
    """Boolean (rows, vocab) masks of student and teacher; entry 0 is never masked (a live
    entry), and the labels stay on live student entries."""
    forced = (torch.arange(rows), 1 + torch.arange(rows) % (vocab - 1))  # one extra entry a row at least
    base = torch.rand(rows, vocab) < fraction
    base[:, 0] = False
    base[forced] = False
    extra = (torch.rand(rows, vocab) < 0.15) & ~base
    extra[:, 0] = False
    extra[forced] = True
    s_mask, t_mask = base.clone(), base.clone()
    if relation == "teacher":
        t_mask |= extra
    elif relation == "student":
        s_mask |= extra
    return s_mask, t_mask


def _labels_on_live(s_mask, ignored_row=1):
    labels = torch.multinomial((~s_mask).float(), 1).squeeze(1)
    labels[ignored_row] = -100
    return labels


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(
    "relation, s_mask, t_mask, temperature, divergence", list(_mask_cases(MASK_PAIRS, [(0.5,), (1.0,), (2.0,)]))
)
def test_kd_loss_masked_logits_match_float64_truth(backend, relation, s_mask, t_mask, temperature, divergence):
    rows, vocab = 5, 37
    sm, tm = _masks(relation, rows, vocab)
    s = torch.where(sm, torch.full((rows, vocab), s_mask), torch.randn(rows, vocab) * 2)
    t = torch.where(tm, torch.full((rows, vocab), t_mask), torch.randn(rows, vocab) * 2)
    labels = _labels_on_live(sm)
    opts = dict(alpha=0.3, temperature=temperature, divergence=divergence)
    loss, grad = run_kd(backend, s, t, labels, **opts)
    ref = truth_loss_rows(s, t, labels, **opts)
    ref_grad = truth_grad_rows(s, t, labels, **opts)
    assert_rows_match(loss, ref)
    if (relation, divergence) == ("teacher", "reverse_kl"):
        assert torch.isinf(loss[labels != -100]).all()
        counted = labels != -100
        assert torch.isnan(grad[counted]).all() and torch.equal(grad[~counted], torch.zeros_like(grad[~counted]))
    else:
        if (relation, divergence) == ("student", "forward_kl"):
            assert torch.isinf(loss[labels != -100]).all()
        assert_rel_close(grad, ref_grad, torch.float32, factor=10)
        # no probability on either side, no gradient (forward_kl's q - p is -p under teacher mass)
        none = sm & tm if divergence == "forward_kl" else sm
        assert torch.equal(grad[none], torch.zeros_like(grad[none]))
    if relation == "same":  # finfo.min and -inf masks are the same loss
        other, other_grad = run_kd(backend, torch.where(sm, -INF, s), torch.where(tm, -INF, t), labels, **opts)
        assert_rel_close(loss, other, torch.float32)
        assert_rel_close(grad, other_grad, torch.float32)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_kd_loss_masked_low_precision_and_float64(backend, divergence):
    rows, vocab = 4, 29
    sm, tm = _masks("same", rows, vocab)
    s = torch.where(sm, -INF, torch.randn(rows, vocab) * 2)
    t = torch.where(tm, FMIN, torch.randn(rows, vocab) * 2)
    labels = _labels_on_live(sm)
    opts = dict(alpha=0.3, temperature=0.5, divergence=divergence)
    for dtype in (torch.bfloat16, torch.float16, torch.float64):
        if backend == "triton" and dtype == torch.float64:
            continue  # the triton backend takes fp32/fp16/bf16 only
        # finfo(dtype).min is how each dtype is masked (float16: -65504)
        s_d = s.to(dtype)
        t_d = torch.where(tm, torch.finfo(dtype).min, t.to(dtype))
        loss, grad = run_kd(backend, s_d, t_d, labels, **opts)
        ref = truth_loss_rows(s_d, t_d, labels, **opts)
        ref_grad = truth_grad_rows(s_d, t_d, labels, **opts)
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        assert_rel_close(loss, ref, acc, factor=10)
        assert_rel_close(grad, ref_grad, dtype, factor=10)


# -- cross entropy, alpha = 1 -------------------------------------------------------------------
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_alpha_one_ignores_teacher_masks(backend, divergence):
    s = torch.randn(3, 11)
    t = torch.randn(3, 11)
    t[:, 4:7] = -INF  # reverse_kl would be +inf: with alpha = 1 it has weight 0
    labels = torch.tensor([2, 5, 10])
    loss, grad = run_kd(backend, s, t, labels, alpha=1.0, divergence=divergence)
    s64 = s.double()
    ce = torch.logsumexp(s64, -1) - s64.gather(1, labels[:, None]).squeeze(1)
    assert_rel_close(loss, ce, torch.float32)
    assert_rel_close(grad, torch.softmax(s64, -1) - torch.nn.functional.one_hot(labels, 11), torch.float32)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_label_on_a_masked_student_entry_is_infinite_with_a_finite_gradient(backend):
    s = torch.randn(2, 9)
    s[:, 3] = -INF
    t = torch.randn(2, 9)
    t[:, 3] = -INF
    labels = torch.tensor([3, 0])
    opts = dict(alpha=0.4, temperature=2.0, divergence="jsd")
    loss, grad = run_kd(backend, s, t, labels, **opts)
    assert loss[0].item() == INF and math.isfinite(loss[1].item())
    assert_rel_close(grad, truth_grad_rows(s, t, labels, **opts), torch.float32)


# -- rows that are no distribution ---------------------------------------------------------------
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_rows_without_a_distribution_are_nan(backend, divergence):
    s = torch.randn(7, 13)
    t = torch.randn(7, 13)
    s[0] = -INF  # student all -inf
    t[1] = -INF  # teacher all -inf
    s[2, 4] = INF
    t[3, 5] = float("nan")
    s[4] = -INF  # ignored: 0, whatever it holds
    t[4] = -INF
    s[5] = FMIN  # all finfo.min: a uniform distribution, finite
    labels = torch.tensor([0, 1, 2, 3, -100, 5, 6])
    opts = dict(alpha=0.5, temperature=1.0, divergence=divergence)
    loss, grad = run_kd(backend, s, t, labels, **opts)
    assert torch.isnan(loss[:4]).all() and torch.isnan(grad[:4]).all()
    assert loss[4].item() == 0.0 and torch.equal(grad[4], torch.zeros(13))
    ref = truth_loss_rows(s[5:], t[5:], labels[5:], **opts)
    assert_rel_close(loss[5:], ref, torch.float32)
    assert_rel_close(grad[5:], truth_grad_rows(s[5:], t[5:], labels[5:], **opts), torch.float32)


# -- huge finite logits ------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_huge_finite_logits_match_float64_truth(backend, divergence, temperature):
    rows, vocab = 6, 23
    s = torch.randn(rows, vocab) * 2
    t = torch.randn(rows, vocab) * 2
    for x in (s, t):  # +-1e30 at a few random entries of each row, different for s and t
        idx = torch.rand(rows, vocab).argsort(1)[:, :4]
        x.scatter_(1, idx[:, :2], 1e30)
        x.scatter_(1, idx[:, 2:], -1e30)
    t[0] = s[0]  # identical: 0
    labels = torch.tensor([0, 1, 2, 3, -100, 5])
    opts = dict(alpha=0.2, temperature=temperature, divergence=divergence)
    loss, grad = run_kd(backend, s, t, labels, **opts)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    assert_rel_close(loss, truth_loss_rows(s, t, labels, **opts), torch.float32)
    assert_rel_close(grad, truth_grad_rows(s, t, labels, **opts), torch.float32, factor=10)


# -- fused linear ----------------------------------------------------------------------------------------
def _linear_inputs(relation, s_mask, t_mask, rows=5, vocab=150, first_tile_masked=True):
    """Student and teacher lm_heads whose biases mask vocabulary columns: the same columns
    for every row. The teacher's first 70 columns are masked too, so that a row's first
    vocabulary tile (64 wide in the interpreter) holds nothing but masks."""
    col_s, col_t = _masks(relation, 1, vocab)
    if first_tile_masked:
        col_t[0, 1:70] = True
        if relation != "teacher":
            col_s[0, 1:70] = True
    hs, ht = torch.randn(rows, 6), torch.randn(rows, 5)
    ws, wt = torch.randn(vocab, 6) * 0.5, torch.randn(vocab, 5) * 0.5
    bs = torch.where(col_s[0], s_mask, torch.randn(vocab) * 0.1)
    bt = torch.where(col_t[0], t_mask, torch.randn(vocab) * 0.1)
    return (hs, ws, bs, ht, wt, bt), col_s[0], col_t[0]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(
    "relation, s_mask, t_mask, temperature, reduction, divergence",
    list(_mask_cases(("-inf/-inf", "finfo.min/finfo.min"), [(0.5, "sum"), (2.0, "none")])),
)
def test_linear_kd_loss_masked_through_bias_matches_float64_truth(
    backend, relation, s_mask, t_mask, temperature, reduction, divergence
):
    (hs, ws, bs, ht, wt, bt), col_s, col_t = _linear_inputs(relation, s_mask, t_mask)
    live = (~col_s).nonzero().squeeze(1)
    labels = live[torch.randint(0, live.numel(), (hs.shape[0],))]
    labels[1] = -100
    opts = dict(alpha=0.3, temperature=temperature, divergence=divergence)
    loss, gh, gw, gb = run_linear(backend, hs, ws, bs, ht, wt, bt, labels, reduction, **opts)
    ref, ref_gh, ref_gw, ref_gb = truth_linear(hs, ws, bs, ht, wt, bt, labels, **opts)
    assert_rows_match(loss, ref)
    if (relation, divergence) == ("teacher", "reverse_kl"):
        assert torch.isnan(gh[labels != -100]).all() and torch.isnan(gw).all() and torch.isnan(gb).all()
        return
    for out, want in ((gh, ref_gh), (gw, ref_gw), (gb, ref_gb)):
        assert torch.isfinite(out).all()
        assert_rel_close(out, want, torch.float32, factor=10)
    none = col_s & col_t if divergence == "forward_kl" else col_s  # as in the logits form
    assert torch.equal(gw[none], torch.zeros_like(gw[none]))
    assert torch.equal(gb[none], torch.zeros_like(gb[none]))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_linear_teacher_masked_with_finfo_min_where_student_is_tiny_gives_zero(backend, divergence):
    # logits: student (0, -1e4), teacher (0, finfo.min), as in the logits-form test
    hs, ws, bs = torch.ones(1, 1), torch.tensor([[0.0], [-1e4]]), torch.zeros(2)
    ht, wt, bt = torch.ones(1, 1), torch.zeros(2, 1), torch.tensor([0.0, FMIN])
    loss, gh, gw, gb = run_linear(backend, hs, ws, bs, ht, wt, bt, torch.tensor([0]), alpha=0.0, divergence=divergence)
    for x in (loss, gh, gw, gb):
        assert x.abs().max().item() <= 1e-7, x


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_linear_teacher_without_distribution_is_nan(backend, divergence):
    hs, ws, bs = torch.randn(3, 4), torch.randn(10, 4), torch.zeros(10)
    ht, wt, bt = torch.randn(3, 4), torch.randn(10, 4), torch.full((10,), -INF)
    loss, gh, gw, gb = run_linear(
        backend, hs, ws, bs, ht, wt, bt, torch.tensor([1, -100, 2]), alpha=0.5, divergence=divergence
    )
    assert torch.isnan(loss[[0, 2]]).all() and loss[1].item() == 0.0
    assert torch.isnan(gh[[0, 2]]).all() and torch.equal(gh[1], torch.zeros(4))
    assert torch.isnan(gw).all() and torch.isnan(gb).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_linear_huge_finite_logits_match_float64_truth(backend, divergence):
    rows, vocab = 5, 90
    hs, ws = torch.randn(rows, 6), torch.randn(vocab, 6) * 0.5
    ht, wt = torch.randn(rows, 5), torch.randn(vocab, 5) * 0.5
    bs, bt = torch.zeros(vocab), torch.zeros(vocab)
    idx = torch.randperm(vocab)
    bs[idx[:3]], bs[idx[3:6]] = 1e30, -1e30
    bt[idx[2:5]], bt[idx[5:9]] = 1e30, -1e30
    labels = torch.tensor([0, -100, 7, 8, 9])
    opts = dict(alpha=0.2, temperature=0.5, divergence=divergence)
    loss, gh, gw, gb = run_linear(backend, hs, ws, bs, ht, wt, bt, labels, **opts)
    ref, ref_gh, ref_gw, ref_gb = truth_linear(hs, ws, bs, ht, wt, bt, labels, **opts)
    assert torch.isfinite(loss).all()
    assert_rel_close(loss, ref, torch.float32)
    for out, want in ((gh, ref_gh), (gw, ref_gw), (gb, ref_gb)):
        assert_rel_close(out, want, torch.float32, factor=10)


@pytest.mark.parametrize("backend", ["cpp", "torch"])  # the float64 backends
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_gradcheck_float64_with_masks_on_both_sides(backend, divergence):
    s = torch.randn(3, 7, dtype=torch.float64)
    t = torch.randn(3, 7, dtype=torch.float64)
    s[:, 2], t[:, 2] = -INF, torch.finfo(torch.float64).min
    s[:, 4], t[:, 4] = FMIN, -INF
    labels = torch.tensor([0, -100, 6])
    require_backend("kd_loss_rows", backend, s)
    with memkern.use_backend(backend):
        assert torch.autograd.gradcheck(
            lambda x: memkern.ops.kd_loss(
                x, t, labels, alpha=0.3, temperature=0.5, divergence=divergence, reduction="sum"
            ),
            (s.requires_grad_(),),
        )


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("temperature", [0.5, 1.0])
def test_backends_agree_row_by_row(divergence, temperature):
    """One batch holding every kind of row: all backends give the same loss and gradient,
    the same +inf and NaN entries included."""
    vocab = 12
    s = torch.randn(9, vocab) * 2
    t = torch.randn(9, vocab) * 2
    t[0, 3:6] = FMIN  # teacher masked
    t[1, 3:6] = -INF
    s[2, 3:6], t[2, 3:6] = FMIN, -INF  # both masked
    s[3, 7] = -INF  # student masked under teacher mass: forward_kl +inf
    t[4, 7] = -INF  # teacher masked under student mass: reverse_kl +inf
    s[5] = -INF  # no distribution
    t[6, 2] = float("nan")
    s[7], t[7] = -INF, -INF  # ignored
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 6, -100, 8])
    opts = dict(alpha=0.25, temperature=temperature, divergence=divergence)
    results = {b: run_kd(b, s, t, labels, **opts) for b in CPU_BACKENDS}
    ref_loss, ref_grad = results["torch"]
    for backend, (loss, grad) in results.items():
        for out, ref in ((loss, ref_loss), (grad, ref_grad)):
            assert torch.equal(torch.isnan(out), torch.isnan(ref)), backend
            assert torch.equal(out == INF, ref == INF), backend
            fin = torch.isfinite(ref)
            assert_rel_close(out[fin], ref[fin], torch.float32, factor=10)
    assert torch.isnan(ref_loss[[5, 6]]).all() and ref_loss[7].item() == 0.0
    assert (ref_loss[3].item() == INF) == (divergence == "forward_kl")
    assert (ref_loss[4].item() == INF) == (divergence == "reverse_kl")
