"""The options of kd_loss and linear_kd_loss that reshape the objective: normalizer,
return_components, logit scales and soft-caps, shared_vocab, chunk_size. Every backend that
runs on the CPU against float64 formulas written out here."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import memkern
from conftest import CPU_BACKENDS, KDOptions64, LargestTensor, assert_rel_close, require_backend
from memkern.ops import kd_loss, linear_kd_loss

F32 = torch.float32


# -- the float64 formulas ------------------------------------------------------------------------
def transformed(z, scale=None, cap=None):
    """scale, then cap * tanh(z / cap); -inf stays -inf."""
    x = z * (scale or 1.0)
    if cap is not None:
        x = torch.where(z == -math.inf, z, cap * torch.tanh(x / cap))
    return x


def _kl(log_a, log_b):
    """sum a * (log a - log b), with 0 log 0 = 0."""
    a = log_a.exp()
    return torch.where(a == 0, 0.0, a * (log_a - log_b)).sum(-1)


def terms64(
    s,
    t,
    labels,
    *,
    shared_vocab=None,
    student_logit_scale=None,
    teacher_logit_scale=None,
    student_softcap=None,
    teacher_softcap=None,
    **options,
):
    """Per-row (loss, ce, kd, counted) in float64, differentiable in s."""
    alpha, temperature, divergence, beta, ignore_index, soft_loss_scale = KDOptions64(**options)
    s = transformed(s.double(), student_logit_scale, student_softcap)
    t = transformed(t.double(), teacher_logit_scale, teacher_softcap)
    n = shared_vocab or s.shape[-1]
    lq = torch.log_softmax(s[..., :n] / temperature, -1)
    lp = torch.log_softmax(t[..., :n] / temperature, -1)
    if divergence == "forward_kl":
        kd = _kl(lp, lq)
    elif divergence == "reverse_kl":
        kd = _kl(lq, lp)
    else:
        lm = torch.logsumexp(torch.stack([lp + math.log(beta), lq + math.log1p(-beta)]), 0)
        kd = beta * _kl(lp, lm) + (1 - beta) * _kl(lq, lm)
    if labels is None:
        counted = torch.ones(s.shape[:-1], dtype=torch.bool)
        ce = torch.zeros_like(kd)
    else:
        counted = labels != ignore_index
        target = torch.where(counted, labels, 0)
        ce = torch.logsumexp(s, -1) - s.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    k = temperature**2 if soft_loss_scale == "t2" else 1.0
    zero = torch.zeros_like(kd)
    ce, kd = torch.where(counted, ce, zero), torch.where(counted, kd, zero)
    return alpha * ce + (1 - alpha) * k * kd, ce, kd, counted


def reduce64(x, counted, reduction, normalizer=None):
    if normalizer is not None:
        return x.sum() / normalizer
    if reduction == "none":
        return x
    return x.sum() if reduction == "sum" else x.sum() / max(int(counted.sum()), 1)


def _labels(lead, vocab, ignored=(1, 4)):
    y = torch.randint(0, vocab, lead)
    flat = y.view(-1)
    for i in ignored:
        flat[i] = -100
    return y


ROWS, V_S, V_T, SHARED = (3, 5), 37, 41, 29
OPTION_SETS = {
    "components": dict(alpha=0.3, temperature=2.0),
    "scales-caps": dict(
        alpha=0.4,
        temperature=1.5,
        divergence="reverse_kl",
        student_logit_scale=1.7,
        teacher_logit_scale=0.6,
        student_softcap=2.5,
        teacher_softcap=4.0,
    ),
    "shared-vocab-jsd": dict(
        alpha=0.6,
        temperature=0.8,
        divergence="jsd",
        beta=0.3,
        shared_vocab=SHARED,
        soft_loss_scale="none",
        student_softcap=3.0,
    ),
}


def _logits_inputs(name):
    vt = V_T if "shared_vocab" in OPTION_SETS[name] else V_S
    s = torch.randn(*ROWS, V_S) * 2
    t = torch.randn(*ROWS, vt) * 2
    return s, t, _labels(ROWS, V_S)


@pytest.mark.parametrize("backend", CPU_BACKENDS, indirect=True)
@pytest.mark.parametrize("name", sorted(OPTION_SETS))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_kd_loss_terms_and_gradients_match_float64(backend, name, reduction):
    opts = OPTION_SETS[name]
    s, t, y = _logits_inputs(name)
    require_backend("kd_loss_rows", backend, s.reshape(-1, V_S))
    leaf = s.clone().requires_grad_()
    loss, ce, kd = kd_loss(leaf, t, y, reduction=reduction, return_components=True, chunk_size=4, **opts)
    ref = [x for x in terms64(s, t, y, **opts)]
    counted = ref.pop()
    for got, want in zip((loss, ce, kd), ref):
        assert_rel_close(got, reduce64(want, counted, reduction), F32)
    # loss is the weighted sum of the returned terms, exactly
    k = opts["temperature"] ** 2 if opts.get("soft_loss_scale", "t2") == "t2" else 1.0
    assert torch.equal(loss, opts["alpha"] * ce + (1 - opts["alpha"]) * k * kd)
    # the gradient of any weighted sum of the three: here each alone, and a mix
    leaf64 = s.double().requires_grad_()
    refs = [reduce64(x, counted, reduction) for x in terms64(leaf64, t, y, **opts)[:3]]
    for weights in ((0.0, 1.0, 0.0), (0.0, 0.0, 1.0), (0.7, -1.3, 2.1)):
        up = torch.rand(loss.shape) + 0.5 if reduction == "none" else torch.tensor(1.0)
        got = torch.autograd.grad(
            sum(w * (x * up).sum() for w, x in zip(weights, (loss, ce, kd)) if w), leaf, retain_graph=True
        )[0]
        want = torch.autograd.grad(
            sum(w * (x * up.double()).sum() for w, x in zip(weights, refs) if w), leaf64, retain_graph=True
        )[0]
        assert_rel_close(got, want, F32)


@pytest.mark.parametrize("backend", CPU_BACKENDS, indirect=True)
@pytest.mark.parametrize("name", sorted(OPTION_SETS))
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_kd_loss_terms_and_gradients_match_float64(backend, name, reduction):
    opts = OPTION_SETS[name]
    vt = V_T if "shared_vocab" in opts else V_S
    hs, ws, bs = torch.randn(*ROWS, 8), torch.randn(V_S, 8), torch.randn(V_S)
    ht, wt = torch.randn(*ROWS, 6), torch.randn(vt, 6)
    y = _labels(ROWS, V_S)
    require_backend("kd_loss_rows", backend, hs.reshape(-1, 8))
    leaves = [x.clone().requires_grad_() for x in (hs, ws, bs)]
    loss, ce, kd = linear_kd_loss(
        leaves[0],
        leaves[1],
        ht,
        wt,
        y,
        student_bias=leaves[2],
        reduction=reduction,
        return_components=True,
        chunk_size=2,
        **opts,
    )
    leaves64 = [x.double().requires_grad_() for x in (hs, ws, bs)]
    s64 = leaves64[0] @ leaves64[1].T + leaves64[2]
    *refs, counted = terms64(s64, ht.double() @ wt.double().T, y, **opts)
    refs = [reduce64(x, counted, reduction) for x in refs]
    for got, want in zip((loss, ce, kd), refs):
        assert_rel_close(got, want, F32)
    up = torch.rand(loss.shape) + 0.5
    got = torch.autograd.grad((0.5 * loss * up).sum() + (2.0 * kd * up).sum() - (ce * up).sum(), leaves)
    want = torch.autograd.grad((0.5 * refs[0] * up).sum() + (2.0 * refs[2] * up).sum() - (refs[1] * up).sum(), leaves64)
    for g, w in zip(got, want):
        assert_rel_close(g, w, F32)


@pytest.mark.parametrize("backend", ["cpp", "torch"], indirect=True)
def test_gradcheck_float64_with_every_option(backend):
    opts = dict(OPTION_SETS["shared-vocab-jsd"], teacher_logit_scale=0.8, student_logit_scale=1.3)
    s = (torch.randn(5, 11, dtype=torch.float64) * 2).requires_grad_()
    t = torch.randn(5, 13, dtype=torch.float64)
    y = torch.tensor([3, -100, 10, 0, 7])
    opts["shared_vocab"] = 9

    def f(x):
        return kd_loss(x, t, y, return_components=True, chunk_size=2, reduction="none", **opts)

    assert torch.autograd.gradcheck(f, (s,))
    hs, ws = (
        torch.randn(4, 3, dtype=torch.float64, requires_grad=True),
        torch.randn(11, 3, dtype=torch.float64, requires_grad=True),
    )
    ht, wt = torch.randn(4, 2, dtype=torch.float64), torch.randn(13, 2, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda h, w: linear_kd_loss(h, w, ht, wt, y[:4], return_components=True, chunk_size=3, **opts), (hs, ws)
    )


# -- masked logits under a soft-cap ----------------------------------------------------------------
@pytest.mark.parametrize("backend", CPU_BACKENDS, indirect=True)
def test_minus_inf_stays_masked_under_softcap(backend):
    s, t = torch.randn(4, 19) * 3, torch.randn(4, 19) * 3
    s[:, [2, 5]] = -math.inf  # the student masks two entries; the teacher masks them too
    t[:, [2, 5]] = -math.inf
    y = torch.tensor([0, 7, -100, 18])
    require_backend("kd_loss_rows", backend, s)
    opts = dict(alpha=0.5, temperature=2.0, student_softcap=1.5, teacher_softcap=2.0)
    leaf = s.clone().requires_grad_()
    loss = kd_loss(leaf, t, y, **opts)
    loss.backward()
    # a masked entry is absent: the same as the 17-entry rows without it
    keep = [i for i in range(19) if i not in (2, 5)]
    y17 = torch.tensor([0, keep.index(7), -100, keep.index(18)])
    *ref, counted = terms64(s[:, keep], t[:, keep], y17, **opts)
    assert_rel_close(loss, reduce64(ref[0], counted, "mean"), F32)
    assert torch.isfinite(leaf.grad).all()
    assert (leaf.grad[:, [2, 5]] == 0).all()


# -- normalizer ------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", CPU_BACKENDS, indirect=True)
@pytest.mark.parametrize("form", ["logits", "linear"])
def test_normalizer_makes_accumulated_halves_equal_the_whole_batch(backend, form):
    rows, vocab = 10, 23
    y = torch.randint(0, vocab, (rows,))
    y[[1, 2, 7]] = -100  # the halves count 3 and 4 rows: per-half means would weigh rows apart
    if form == "logits":
        s, t = torch.randn(rows, vocab), torch.randn(rows, vocab)
        require_backend("kd_loss_rows", backend, s)
        leaves = [s.clone().requires_grad_()]
        call = lambda sel, **kw: kd_loss(leaves[0][sel], t[sel], y[sel], alpha=0.3, temperature=2.0, **kw)  # noqa: E731
    else:
        hs, ws, ht, wt = torch.randn(rows, 8), torch.randn(vocab, 8), torch.randn(rows, 5), torch.randn(vocab, 5)
        require_backend("linear_kd_loss", backend, hs)
        leaves = [hs.clone().requires_grad_(), ws.clone().requires_grad_()]
        call = lambda sel, **kw: linear_kd_loss(
            leaves[0][sel], leaves[1], ht[sel], wt, y[sel], alpha=0.3, temperature=2.0, **kw
        )  # noqa: E731
    whole = call(slice(None))
    want = torch.autograd.grad(whole, leaves)
    count = (y != -100).sum()  # a 0-dim int64 tensor, as HF's num_items_in_batch
    halves = [call(slice(0, 5), normalizer=count), call(slice(5, None), normalizer=count, reduction="sum")]
    got = torch.autograd.grad(halves[0] + halves[1], leaves)
    assert_rel_close(halves[0] + halves[1], whole, F32)
    for g, w in zip(got, want):
        assert_rel_close(g, w, F32)
    # a number works alike, and the terms are divided by it too
    loss, ce, kd = call(slice(None), normalizer=2.5, return_components=True)
    *ref, counted = terms64(
        s if form == "logits" else hs @ ws.T, t if form == "logits" else ht @ wt.T, y, alpha=0.3, temperature=2.0
    )
    for x, r in zip((loss, ce, kd), ref):
        assert_rel_close(x, r.sum() / 2.5, F32)


@pytest.mark.parametrize(
    "normalizer, error, words",
    [
        (0, ValueError, "normalizer must be a positive finite number"),
        (-2.0, ValueError, "normalizer must be a positive finite number"),
        (math.nan, ValueError, "normalizer must be a positive finite number"),
        (math.inf, ValueError, "normalizer must be a positive finite number"),
        (True, TypeError, "normalizer must be a positive finite number"),
        ("3", TypeError, "normalizer must be a positive finite number"),
        (torch.tensor(0), ValueError, "normalizer must be positive and finite, got 0"),
        (torch.tensor(math.inf), ValueError, "normalizer must be positive and finite"),
        (torch.tensor([3.0]), ValueError, r"0-dim real tensor, got a float32 tensor of shape \(1,\)"),
        (torch.tensor(2.0, requires_grad=True), ValueError, "normalizer must not require grad"),
    ],
)
def test_bad_normalizer_is_a_clear_error(normalizer, error, words):
    s, t, y = torch.randn(3, 7), torch.randn(3, 7), torch.tensor([1, 2, 3])
    with pytest.raises(error, match=words):
        kd_loss(s, t, y, normalizer=normalizer)
    with pytest.raises(error, match=words):
        linear_kd_loss(
            torch.randn(3, 4), torch.randn(7, 4), torch.randn(3, 2), torch.randn(7, 2), y, normalizer=normalizer
        )


def test_normalizer_with_reduction_none_is_refused():
    s, t = torch.randn(3, 7), torch.randn(3, 7)
    with pytest.raises(ValueError, match="normalizer divides the summed loss.*got reduction='none'"):
        kd_loss(s, t, torch.tensor([1, 2, 3]), normalizer=4, reduction="none")


# -- chunk_size ------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", CPU_BACKENDS, indirect=True)
def test_chunk_size_changes_nothing_but_the_chunks(backend):
    s, t, y = torch.randn(9, 31), torch.randn(9, 31), _labels((9,), 31)
    require_backend("kd_loss_rows", backend, s)
    results = []
    for chunk_size in (1, 4, 9, 100):
        leaf = s.clone().requires_grad_()
        loss = kd_loss(leaf, t, y, alpha=0.2, temperature=3.0, chunk_size=chunk_size, reduction="none")
        loss.sum().backward()
        results.append((loss, leaf.grad))
    for loss, grad in results[1:]:
        torch.testing.assert_close(loss, results[0][0], rtol=0, atol=0)  # rows are independent
        torch.testing.assert_close(grad, results[0][1], rtol=0, atol=0)
    *ref, counted = terms64(s, t, y, alpha=0.2, temperature=3.0)
    assert_rel_close(results[0][0], ref[0], F32)


def test_chunk_size_bounds_the_largest_tensor():
    rows, vocab = 40, 50
    hs, ws = torch.randn(rows, 8, requires_grad=True), torch.randn(vocab, 8, requires_grad=True)
    ht, wt, y = torch.randn(rows, 6), torch.randn(vocab, 6), torch.randint(0, vocab, (rows,))
    with memkern.use_backend("cpp"), LargestTensor() as mode:
        linear_kd_loss(hs, ws, ht, wt, y, chunk_size=3, student_softcap=5.0).backward()
    assert mode.largest <= max(3 * vocab, vocab * 8)
    s, t = torch.randn(rows, vocab, requires_grad=True), torch.randn(rows, vocab)
    with memkern.use_backend("cpp"), LargestNewStorage() as mode:
        kd_loss(s, t, y, chunk_size=3, student_softcap=5.0, teacher_logit_scale=2.0)
    assert 0 < mode.largest <= 3 * vocab * 4  # forward: float32 chunks only, no rows x V transformed copy


class LargestNewStorage(TorchDispatchMode):
    """The most bytes of any new storage an op produced (views of the inputs do not count)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        seen = {
            a.untyped_storage().data_ptr()
            for a in torch.utils._pytree.tree_leaves((args, kwargs))
            if isinstance(a, torch.Tensor)
        }
        for o in torch.utils._pytree.tree_leaves(out):
            if isinstance(o, torch.Tensor) and o.untyped_storage().data_ptr() not in seen:
                self.largest = max(self.largest, o.untyped_storage().nbytes())
        return out


@pytest.mark.parametrize("bad, error", [(0, ValueError), (-3, ValueError), (2.5, TypeError), (True, TypeError)])
def test_bad_chunk_size_is_a_clear_error(bad, error):
    with pytest.raises(
        error,
        match=f"chunk_size must be a positive int or None, got {bad if error is ValueError else type(bad).__name__}",
    ):
        kd_loss(torch.randn(3, 7), torch.randn(3, 7), chunk_size=bad, alpha=0.0)


# -- shared vocabulary and the other bad inputs ----------------------------------------------------
def test_shared_vocab_errors_and_label_range():
    s, t = torch.randn(4, 12), torch.randn(4, 10)
    y = torch.tensor([11, 0, 5, -100])  # 11: past the teacher's vocabulary, inside the student's
    with pytest.raises(ValueError, match=r"student vocabulary size 12 != teacher vocabulary size 10 .*shared_vocab"):
        kd_loss(s, t, y)
    with pytest.raises(
        ValueError, match=r"shared_vocab must be <= both vocabulary sizes \(student 12, teacher 10\), got 11"
    ):
        kd_loss(s, t, y, shared_vocab=11)
    with pytest.raises(ValueError, match="shared_vocab must be a positive int or None, got 0"):
        kd_loss(s, t, y, shared_vocab=0)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 12\)"):
        kd_loss(s, t, torch.tensor([12, 0, 5, -100]), shared_vocab=10)
    loss = kd_loss(s, t, y, shared_vocab=10)  # CE over the student's 12 entries: label 11 is fine
    assert torch.isfinite(loss)
    with pytest.raises(ValueError, match=r"student_weight \(12, 3\), teacher_weight \(10, 2\).*shared_vocab"):
        linear_kd_loss(torch.randn(4, 3), torch.randn(12, 3), torch.randn(4, 2), torch.randn(10, 2), y)


@pytest.mark.parametrize("name", ["student_logit_scale", "teacher_logit_scale", "student_softcap", "teacher_softcap"])
@pytest.mark.parametrize(
    "bad, error",
    [(0.0, ValueError), (-1.0, ValueError), (math.nan, ValueError), (math.inf, ValueError), ("2", TypeError)],
)
def test_bad_transform_is_a_clear_error(name, bad, error):
    with pytest.raises(error, match=f"{name} must be a positive finite float or None"):
        kd_loss(torch.randn(3, 7), torch.randn(3, 7), alpha=0.0, **{name: bad})
    with pytest.raises(error, match=f"{name} must be a positive finite float or None"):
        memkern.nn.LinearKDLoss(**{name: bad})


# -- modules, operators, compile -------------------------------------------------------------------
def test_modules_pass_chunk_size_return_components_and_normalizer():
    s, t, y = torch.randn(6, 40), torch.randn(6, 40), _labels((6,), 40)
    out = memkern.nn.KDLoss(alpha=0.2, return_components=True, chunk_size=2)(s, t, y, normalizer=7)
    want = kd_loss(s, t, y, alpha=0.2, return_components=True, chunk_size=2, normalizer=7)
    assert isinstance(out, tuple) and len(out) == 3
    for a, b in zip(out, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    hs, ws, ht, wt = torch.randn(6, 8), torch.randn(40, 8), torch.randn(6, 5), torch.randn(40, 5)
    module = memkern.nn.LinearKDLoss(return_components=True, chunk_size=1)
    out = module(hs, ws, ht, wt, y, normalizer=torch.tensor(3))
    want = linear_kd_loss(hs, ws, ht, wt, y, return_components=True, chunk_size=1, normalizer=torch.tensor(3))
    for a, b in zip(out, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert "chunk_size=1" in repr(module) and "softcap" not in repr(module)


@pytest.mark.parametrize("backend", ["cpp", "torch"], indirect=True)
def test_opcheck_option_operators(backend):
    s, t, y = torch.randn(5, 9, requires_grad=True), torch.randn(5, 7), torch.tensor([1, -100, 8, 0, 2])
    rest = (0.3, 2.0, "jsd", 0.4, -100, "none", 4.0, [1.5, 3.0, 1.0, 0.0], 6, 2)
    torch.library.opcheck(torch.ops.memkern.kd_loss_options.default, (s, t, y, *rest))
    hs, ws, bs = (
        torch.randn(5, 4, requires_grad=True),
        torch.randn(9, 4, requires_grad=True),
        torch.randn(9, requires_grad=True),
    )
    ht, wt = torch.randn(5, 3), torch.randn(7, 3)
    torch.library.opcheck(torch.ops.memkern.linear_kd_loss_options.default, (hs, ws, bs, ht, wt, None, y, *rest))


def test_options_compile_without_graph_breaks():
    def f(s, t, y, n):
        loss, ce, kd = kd_loss(s, t, y, alpha=0.3, student_softcap=3.0, return_components=True, normalizer=n)
        return loss + 0.1 * ce

    s, t, y = torch.randn(6, 17, requires_grad=True), torch.randn(6, 17), _labels((6,), 17)
    n = torch.tensor(4.0)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got = compiled(s, t, y, n)
    want = f(s, t, y, n)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(torch.autograd.grad(got, s)[0], torch.autograd.grad(want, s)[0])


# -- the plain-PyTorch reference of the options ----------------------------------------------------
@pytest.mark.parametrize("name", sorted(OPTION_SETS))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reference_module_states_the_same_definitions(name, reduction):
    from memkern import reference_kd_options

    s, t, y = _logits_inputs(name)
    s = s.double().requires_grad_()
    opts = OPTION_SETS[name]
    got = reference_kd_options.kd_loss_terms(s, t.double(), y, reduction=reduction, **opts)
    *want, counted = terms64(s, t, y, **opts)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, reduce64(w, counted, reduction), rtol=1e-12, atol=1e-12)
    g1 = torch.autograd.grad(got[1].sum() - 2 * got[2].sum(), s)[0]
    g2 = torch.autograd.grad(
        reduce64(want[1], counted, reduction).sum() - 2 * reduce64(want[2], counted, reduction).sum(), s
    )[0]
    torch.testing.assert_close(g1, g2, rtol=1e-10, atol=1e-12)
    normalized = reference_kd_options.kd_loss_terms(s, t.double(), y, normalizer=3.0, **opts)
    torch.testing.assert_close(normalized[0], want[0].sum() / 3.0, rtol=1e-12, atol=1e-12)


def test_teacher_gets_no_gradient_and_double_backward_is_refused():
    s, t = torch.randn(4, 9, requires_grad=True), torch.randn(4, 9, requires_grad=True)
    loss = kd_loss(s, t, torch.tensor([1, 2, -100, 0]), student_softcap=2.0)
    (g,) = torch.autograd.grad(loss, s, create_graph=True)
    assert t.grad is None
    with pytest.raises(RuntimeError, match="kd_loss"):
        g.sum().backward()
    hs, ws = torch.randn(4, 3, requires_grad=True), torch.randn(9, 3, requires_grad=True)
    wt = torch.randn(9, 2, requires_grad=True)
    loss = linear_kd_loss(hs, ws, torch.randn(4, 2), wt, torch.tensor([1, 2, -100, 0]), chunk_size=1)
    gh, _ = torch.autograd.grad(loss, (hs, ws), create_graph=True)
    assert wt.grad is None
    with pytest.raises(RuntimeError, match="linear_kd_loss"):
        gh.sum().backward()


@pytest.mark.parametrize("backend", ["triton"], indirect=True)
def test_triton_fused_linear_transforms_tiles_in_registers(backend):
    # The tiled kernels take the transforms and the terms apart: no chunk of logits (rows x V)
    # is ever allocated, only O(rows) statistics and the gradients.
    rows, vocab, hidden = 40, 64, 4
    hs, ws = torch.randn(rows, hidden, requires_grad=True), torch.randn(vocab, hidden, requires_grad=True)
    ht, wt, y = torch.randn(rows, 3), torch.randn(vocab, 3), _labels((rows,), vocab)
    require_backend("linear_kd_loss", backend, hs)
    opts = dict(alpha=0.3, temperature=2.0, student_softcap=2.0, teacher_logit_scale=1.5, teacher_softcap=3.0)
    with LargestNewStorage() as mode:
        loss, ce, kd = linear_kd_loss(hs, ws, ht, wt, y, return_components=True, **opts)
        (ce + 0.5 * kd).backward()
    assert mode.largest < rows * vocab  # bytes: a quarter of one float32 rows x V chunk
    *ref, counted = terms64(hs.detach() @ ws.detach().T, ht @ wt.T, y, **opts)
    for got, want in zip((loss, ce, kd), ref):
        assert_rel_close(got, reduce64(want, counted, "mean"), F32)
    leaves64 = [hs.detach().double().requires_grad_(), ws.detach().double().requires_grad_()]
    *ref, counted = terms64(leaves64[0] @ leaves64[1].T, ht @ wt.T, y, **opts)
    want = torch.autograd.grad(reduce64(ref[1] + 0.5 * ref[2], counted, "mean"), leaves64)
    for g, w in zip((hs.grad, ws.grad), want):
        assert_rel_close(g, w, F32)


@pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")  # -inf - -inf, masked on purpose
@pytest.mark.parametrize("backend", CPU_BACKENDS, indirect=True)
def test_linear_minus_inf_bias_stays_masked_under_softcap(backend):
    # a -inf bias masks an entry of every row; soft-capped, it stays masked (the tiled Triton
    # kernels transform in registers, the others a chunk at a time)
    rows, vocab = 6, 21
    hs, ws, bs = torch.randn(rows, 5), torch.randn(vocab, 5), torch.randn(vocab)
    ht, wt, bt = torch.randn(rows, 3), torch.randn(vocab, 3), torch.randn(vocab)
    bs[4] = bt[4] = -math.inf
    y = torch.tensor([0, 3, -100, 20, 7, 9])
    require_backend("linear_kd_loss", backend, hs)
    opts = dict(alpha=0.4, temperature=1.5, student_softcap=2.0, teacher_softcap=2.5)
    leaves = [x.clone().requires_grad_() for x in (hs, ws)]
    loss = linear_kd_loss(leaves[0], leaves[1], ht, wt, y, student_bias=bs, teacher_bias=bt, **opts)
    loss.backward()
    keep = [i for i in range(vocab) if i != 4]
    s64, t64 = (
        (hs.double() @ ws.double().T + bs.double())[:, keep],
        (ht.double() @ wt.double().T + bt.double())[:, keep],
    )
    y_kept = torch.tensor([v if v < 4 else v - 1 for v in y.tolist()])
    y_kept[2] = -100
    *ref, counted = terms64(s64, t64, y_kept, **opts)
    assert_rel_close(loss, reduce64(ref[0], counted, "mean"), F32)
    assert torch.isfinite(leaves[0].grad).all() and torch.isfinite(leaves[1].grad).all()
    assert (leaves[1].grad[4] == 0).all()
