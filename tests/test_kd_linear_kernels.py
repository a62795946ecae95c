"""The Triton fused-linear distillation loss with gradients (memkern/kernels/kd_linear.py): the
stats kernel writing per-row statistics and the gradient kernel that recomputes logit tiles
and adds into the hidden, weight and bias gradients with atomics. Run in Triton's
interpreter on the CPU at shapes that cross every tile boundary, against the closed-form
float64 reference (reference.kd_loss_rows and kd_loss_rows_grad).
"""

from __future__ import annotations

import math

import pytest
import torch

import memkern
from memkern.kernels import kd_linear_stats
from memkern.kernels import kd as row_kernels
from memkern.ops import kd_ops as kd_op_tables
from memkern import kd_options
from memkern import reference
from memkern.ops import kd as kd_ops
from conftest import LargestTensor, assert_rel_close, dtype_pairs, require_backend

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")

# NaN and inf inputs are deliberate here; the interpreter's numpy warns about them.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")


@pytest.fixture(autouse=True)
def kernels(request):
    """memkern.kernels.kd_linear, once the triton backend is known to run here (else skip, or fail
    under MEMKERN_REQUIRE_BACKENDS=triton)."""
    device = "cuda" if request.node.get_closest_marker("gpu") is not None else "cpu"
    require_backend("linear_kd_loss", "triton", torch.zeros(1, 1, device=device))
    from memkern.kernels import kd_linear as kd

    return kd


def _tiles() -> dict:
    """The gradient kernel's tile sizes on this machine (the shapes below are built around
    them, so they cross row, column and hidden-dimension tile boundaries)."""

    return kd_linear_stats.grad_launch_config(torch.float32, torch.float32)


def _shape():
    c = _tiles()
    # rows: one full row tile and a partial one; vocab: 3 column tiles and a partial one;
    # hidden: a full hidden tile and a partial one; the teacher's hidden size differs.
    return c["BLOCK_M"] + 3, c["BLOCK_K"] + 7, 2 * c["BLOCK_K"] + 5, 3 * c["BLOCK_V"] + 11


def _inputs(rows, hidden_s, hidden_t, vocab, *, bias=True, dtype=torch.float32, t_dtype=None, labels="random-ignored"):
    t_dtype = t_dtype or dtype
    hs = torch.randn(rows, hidden_s).to(dtype)
    ws = (torch.randn(vocab, hidden_s) * 3 / math.sqrt(hidden_s)).to(dtype)
    bs = torch.randn(vocab).to(dtype) if bias else None
    ht = torch.randn(rows, hidden_t).to(t_dtype)
    wt = (torch.randn(vocab, hidden_t) * 3 / math.sqrt(hidden_t)).to(t_dtype)
    bt = torch.randn(vocab).to(t_dtype) if bias else None
    y = None
    if labels == "random-ignored":
        y = torch.randint(0, vocab, (rows,))
        y[torch.rand(rows) < 0.25] = -100
        if rows >= 2:
            y[0], y[1] = -100, 0  # at least one row of each kind
    elif labels == "all-ignored":
        y = torch.full((rows,), -100)
    return hs, ws, bs, ht, wt, bt, y


def _options(alpha=0.3, temperature=2.0, divergence="forward_kl", beta=0.3, reduction="mean"):
    return dict(
        alpha=alpha,
        temperature=temperature,
        divergence=divergence,
        beta=beta,
        reduction=reduction,
        soft_loss_scale="t2",
    )


def _kd_options(opts: dict, has_labels: bool) -> kd_options.KDOptions:
    return kd_ops.check_options("test", has_labels=has_labels, ignore_index=-100, **opts)


def _reference(hs, ws, bs, ht, wt, bt, y, opts: dict, row_weight: torch.Tensor):
    """Loss per row and the gradients of sum_i row_weight[i] * l_i, in float64 closed form."""
    d = lambda x: x.detach().double() if x is not None else None  # noqa: E731
    ref_opts = _kd_options(opts, y is not None).reference_options()
    s = torch.nn.functional.linear(d(hs), d(ws), d(bs))
    t = torch.nn.functional.linear(d(ht), d(wt), d(bt))
    loss = reference.kd_loss_rows(s, t, y, **ref_opts)
    g = reference.kd_loss_rows_grad(s, t, y, row_weight.double(), **ref_opts)
    return loss, g @ d(ws), g.t() @ d(hs), g.sum(0) if bs is not None else None


def _row_weight(y, rows, reduction, upstream):
    if reduction == "none":
        return upstream
    n = rows if y is None else int((y != -100).sum())
    return torch.full((rows,), 1.0 / max(n, 1) if reduction == "mean" else 1.0, device=upstream.device) * upstream


def _run(hs, ws, bs, ht, wt, bt, y, opts, upstream=None):
    """The public op under the triton backend, forward and backward; returns (loss,
    grads of hs, ws, bs, the upstream gradient used)."""
    require_backend("linear_kd_loss", "triton", hs)
    leaves = [x.clone().requires_grad_() if x is not None else None for x in (hs, ws, bs)]
    # backward inside the block too: with reduction="none" it recomputes through the op table
    with memkern.use_backend("triton"):
        loss = memkern.ops.linear_kd_loss(
            leaves[0], leaves[1], ht, wt, y, student_bias=leaves[2], teacher_bias=bt, **opts
        )
        if upstream is None:
            upstream = (
                torch.randn(loss.shape, device=loss.device)
                if opts["reduction"] == "none"
                else torch.tensor(1.0, device=loss.device)
            )
        loss.backward(upstream)
    return loss, [x.grad if x is not None else None for x in leaves], upstream


class _Spy:
    """Counts launches of a Triton kernel (``kernel[grid](...)``) and passes them on."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.launches = 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


def _forbid(*_args, **_kwargs):
    raise AssertionError("the triton training path must not go through the chunked path or the per-row kernel")


# -- (a) the training path is the fused one ---------------------------------------------------------
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_training_path_is_fused_and_never_holds_rows_by_vocab(reduction, monkeypatch, kernels):
    rows, hidden_t, vocab = 40, 6, 150
    hs, ws, bs, ht, wt, bt, y = _inputs(rows, 8, hidden_t, vocab)
    require_backend("linear_kd_loss", "triton", hs)
    monkeypatch.setattr(kd_op_tables, "linear_chunks", _forbid)
    monkeypatch.setattr(row_kernels, "kd_loss_rows", _forbid)
    spy = _Spy(kernels._linear_kd_grad_kernel)
    monkeypatch.setattr(kernels, "_linear_kd_grad_kernel", spy)
    leaves = [x.clone().requires_grad_() for x in (hs, ws, bs)]
    opts = _options(reduction=reduction)
    with LargestTensor() as mode, memkern.use_backend("triton"):
        loss = memkern.ops.linear_kd_loss(
            leaves[0], leaves[1], ht, wt, y, student_bias=leaves[2], teacher_bias=bt, **opts
        )
        loss.sum().backward()
    assert spy.launches == 1
    # Largest allowed: the inputs and the weight gradient (vocab x hidden), all < rows x vocab.
    assert mode.largest < rows * vocab, f"a tensor of {mode.largest} elements (rows x vocab = {rows * vocab})"
    assert mode.largest <= max(x.numel() for x in (hs, ws, ht, wt))
    upstream = torch.ones(rows) if reduction == "none" else torch.tensor(1.0)
    _, *ref_grads = _reference(hs, ws, bs, ht, wt, bt, y, opts, _row_weight(y, rows, reduction, upstream))
    for leaf, ref in zip(leaves, ref_grads):
        assert_rel_close(leaf.grad, ref, torch.float32, factor=3)


# -- (b) gradients against float64 -------------------------------------------------------------------
@pytest.mark.parametrize("bias, reduction", [(True, "none"), (False, "mean"), (True, "sum")])
@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_gradients_match_float64(divergence, alpha, bias, reduction, poisoned_outputs):
    rows, hidden_s, hidden_t, vocab = _shape()
    hs, ws, bs, ht, wt, bt, y = _inputs(rows, hidden_s, hidden_t, vocab, bias=bias)
    opts = _options(alpha=alpha, divergence=divergence, reduction=reduction)
    loss, grads, upstream = _run(hs, ws, bs, ht, wt, bt, y, opts)
    ref_loss, *ref_grads = _reference(hs, ws, bs, ht, wt, bt, y, opts, _row_weight(y, rows, reduction, upstream))
    n = int((y != -100).sum())
    want = {"none": ref_loss, "sum": ref_loss.sum(), "mean": ref_loss.sum() / n}[reduction]
    assert_rel_close(loss, want, torch.float32)
    for name, grad, ref in zip(("hs", "ws", "bs"), grads, ref_grads):
        if ref is None:
            assert grad is None
            continue
        assert grad.dtype == torch.float32, name
        assert_rel_close(grad, ref, torch.float32, factor=3)
    # ignored rows get exactly zero hidden gradient
    assert torch.equal(grads[0][y == -100], torch.zeros_like(grads[0][y == -100]))


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_soft_loss_only_without_labels(divergence):
    rows, hidden_s, hidden_t, vocab = _shape()
    hs, ws, bs, ht, wt, bt, _ = _inputs(rows, hidden_s, hidden_t, vocab, labels=None)
    opts = _options(alpha=0.0, temperature=0.7, divergence=divergence, beta=0.6, reduction="none")
    loss, grads, upstream = _run(hs, ws, bs, ht, wt, bt, None, opts)
    ref_loss, *ref_grads = _reference(hs, ws, bs, ht, wt, bt, None, opts, upstream)
    assert_rel_close(loss, ref_loss, torch.float32)
    for grad, ref in zip(grads, ref_grads):
        assert_rel_close(grad, ref, torch.float32, factor=3)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_rows_ignored_give_zero_gradients(reduction):
    rows, hidden_s, hidden_t, vocab = _shape()
    hs, ws, bs, ht, wt, bt, y = _inputs(rows, hidden_s, hidden_t, vocab, labels="all-ignored")
    hs[2] = float("nan")  # ignored, so it must not show up anywhere
    loss, grads, _ = _run(hs, ws, bs, ht, wt, bt, y, _options(reduction=reduction, divergence="jsd"))
    assert torch.equal(loss, torch.zeros_like(loss))
    for grad in grads:
        assert torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize(
    "case", ["vocab-1", "vocab-tile-minus-1", "vocab-tile-plus-1", "one-row", "tiny-hidden", "rows-two-tiles"]
)
def test_tile_edges(case):
    c = _tiles()
    rows, hidden_s, hidden_t, vocab = 5, 9, 3, 2 * c["BLOCK_V"] + 1
    if case == "vocab-1":
        vocab = 1
    elif case == "vocab-tile-minus-1":
        vocab = c["BLOCK_V"] - 1
    elif case == "vocab-tile-plus-1":
        vocab = c["BLOCK_V"] + 1
    elif case == "one-row":
        rows = 1
    elif case == "tiny-hidden":
        hidden_s, hidden_t = 1, 1
    elif case == "rows-two-tiles":
        rows, hidden_s = 2 * c["BLOCK_M"], 2 * c["BLOCK_K"]
    hs, ws, bs, ht, wt, bt, y = _inputs(rows, hidden_s, hidden_t, vocab)
    y[-1] = 0  # one-row: it counts
    opts = _options(alpha=0.4, divergence="reverse_kl", reduction="none")
    loss, grads, upstream = _run(hs, ws, bs, ht, wt, bt, y, opts)
    ref_loss, *ref_grads = _reference(hs, ws, bs, ht, wt, bt, y, opts, upstream)
    assert_rel_close(loss, ref_loss, torch.float32)
    for grad, ref in zip(grads, ref_grads):
        if ref.norm() == 0:  # vocab 1: the softmax is 1 and every gradient is 0
            assert grad.abs().max() <= 1e-6
        else:
            assert_rel_close(grad, ref, torch.float32, factor=3)


def test_nan_in_a_counted_row_gives_nan():
    rows, hidden_s, hidden_t, vocab = _shape()
    hs, ws, bs, ht, wt, bt, y = _inputs(rows, hidden_s, hidden_t, vocab)
    y[3] = 7
    hs[3, 5] = float("nan")
    loss, grads, _ = _run(hs, ws, bs, ht, wt, bt, y, _options(reduction="none", divergence="jsd"))
    others = torch.arange(rows) != 3
    assert torch.isnan(loss[3]) and torch.isfinite(loss[others]).all()
    assert torch.isnan(grads[0][3]).all() and torch.isfinite(grads[0][others]).all()
    assert torch.isnan(grads[1]).any() and torch.isnan(grads[2]).any()
    loss, _, _ = _run(hs, ws, bs, ht, wt, bt, y, _options(reduction="mean"))
    assert torch.isnan(loss)


def test_nan_in_an_ignored_row_stays_out():
    rows, hidden_s, hidden_t, vocab = _shape()
    hs, ws, bs, ht, wt, bt, y = _inputs(rows, hidden_s, hidden_t, vocab)
    assert y[0] == -100
    clean_hs, clean_ht = hs.clone(), ht.clone()
    hs[0, 2] = float("nan")
    ht[0, 1] = float("inf")
    opts = _options(reduction="none", divergence="reverse_kl")
    loss, grads, upstream = _run(hs, ws, bs, ht, wt, bt, y, opts)
    # what the ignored row holds does not matter: the reference sees a clean copy
    ref_loss, *ref_grads = _reference(clean_hs, ws, bs, clean_ht, wt, bt, y, opts, upstream)
    assert torch.isfinite(loss).all() and loss[0] == 0
    assert_rel_close(loss, ref_loss, torch.float32)
    for grad, ref in zip(grads, ref_grads):
        assert torch.isfinite(grad).all()
        assert_rel_close(grad, ref, torch.float32, factor=3)
    assert torch.equal(grads[0][0], torch.zeros_like(grads[0][0]))


# -- (c) 16-bit inputs --------------------------------------------------------------------------------
@pytest.mark.parametrize("s_dtype, t_dtype", dtype_pairs("bf16-bf16", "bf16-f32", "f16-bf16", "f32-bf16"))
def test_16_bit_inputs(s_dtype, t_dtype):
    rows, hidden_s, hidden_t, vocab = _shape()
    hs, ws, bs, ht, wt, bt, y = _inputs(rows, hidden_s, hidden_t, vocab, dtype=s_dtype, t_dtype=t_dtype)
    opts = _options(alpha=0.5, divergence="forward_kl", reduction="sum")
    loss, grads, upstream = _run(hs, ws, bs, ht, wt, bt, y, opts)
    ref_loss, *ref_grads = _reference(hs, ws, bs, ht, wt, bt, y, opts, _row_weight(y, rows, "sum", upstream))
    low = s_dtype if s_dtype != torch.float32 else t_dtype
    # the logits are products of 16-bit inputs accumulated in fp32; g enters the gradient
    # products in the student's dtype
    assert_rel_close(loss, ref_loss.sum(), torch.float32, factor=10)
    for x, grad, ref in zip((hs, ws, bs), grads, ref_grads):
        assert grad.dtype == x.dtype
        assert_rel_close(grad, ref, low, factor=2)


# -- the launcher's contract ---------------------------------------------------------------------------
def test_launcher_contract_and_strided_inputs(kernels):
    rows, hidden_s, hidden_t, vocab = _shape()
    hs, ws, bs, ht, wt, bt, y = _inputs(rows, hidden_s, hidden_t, vocab, dtype=torch.bfloat16, t_dtype=torch.float32)
    require_backend("linear_kd_loss", "triton", hs)
    opts = _kd_options(_options(divergence="jsd"), True)
    row_scale = torch.rand(rows) + 0.5
    out = kernels.linear_kd_loss(hs, ws, bs, ht, wt, bt, y, opts, row_scale, 0.25, True)
    loss, gh, gw, gb = out
    assert (loss.dtype, gh.dtype, gw.dtype, gb.dtype) == (torch.float32, torch.bfloat16, torch.float32, torch.float32)
    assert gh.shape == hs.shape and gw.shape == ws.shape and gb.shape == bs.shape
    ref_loss, *ref_grads = _reference(hs, ws, bs, ht, wt, bt, y, _options(divergence="jsd"), row_scale * 0.25)
    assert_rel_close(loss, ref_loss, torch.float32, factor=10)
    for grad, ref in zip((gh, gw, gb), ref_grads):
        assert_rel_close(grad, ref, torch.bfloat16, factor=2)
    # the same inputs as strided views (transposed, every other column, every other bias)
    strided = lambda x: x.t().contiguous().t()  # noqa: E731
    spread = lambda x: torch.stack([x, torch.zeros_like(x)], dim=-1).flatten(-2)[..., ::2]  # noqa: E731
    views = (strided(hs), spread(ws), spread(bs), strided(ht), spread(wt), spread(bt))
    assert not any(v.is_contiguous() for v in views)
    again = kernels.linear_kd_loss(*views, y, opts, spread(row_scale), 0.25, True)
    for a, b in zip(out, again):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # the forward without gradients reads them alike (a strided bias included)
    plain = kernels.linear_kd_loss(hs, ws, bs, ht, wt, bt, y, opts, None, 1.0, False)[0]
    torch.testing.assert_close(
        kernels.linear_kd_loss(*views, y, opts, None, 1.0, False)[0], plain, rtol=1e-5, atol=1e-6
    )
    # no student bias: no bias gradient
    assert kernels.linear_kd_loss(hs, ws, None, ht, wt, None, y, opts, None, 1.0, True)[3] is None


def test_no_rows(kernels):
    hs, ws, bs, ht, wt, bt, _ = _inputs(0, 8, 5, 40)
    require_backend("linear_kd_loss", "triton", hs)
    opts = _kd_options(_options(), True)
    loss, gh, gw, gb = kernels.linear_kd_loss(
        hs, ws, bs, ht, wt, bt, torch.zeros(0, dtype=torch.long), opts, None, 1.0, True
    )
    assert loss.shape == (0,) and gh.shape == (0, 8)
    assert torch.equal(gw, torch.zeros_like(ws)) and torch.equal(gb, torch.zeros_like(bs))


# -- vocabulary slabs and rows that do not count ------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_weight_gradient_is_accumulated_one_vocabulary_slab_at_a_time(dtype, kernels, monkeypatch):
    rows, hidden_s, hidden_t, vocab = _shape()
    hs, ws, bs, ht, wt, bt, y = _inputs(rows, hidden_s, hidden_t, vocab, dtype=dtype)
    require_backend("linear_kd_loss", "triton", hs)
    opts = _kd_options(_options(divergence="reverse_kl"), True)
    whole = kernels.linear_kd_loss(hs, ws, bs, ht, wt, bt, y, opts, None, 1.0, True)
    assert whole[2].dtype == torch.float32  # the test shape fits one slab by default
    block_v = kd_linear_stats.grad_launch_config(dtype, dtype)["BLOCK_V"]
    monkeypatch.setattr(kernels, "WEIGHT_GRAD_SLAB_BYTES", 4 * hidden_s * block_v)  # one column tile a slab
    spy = _Spy(kernels._linear_kd_grad_kernel)
    monkeypatch.setattr(kernels, "_linear_kd_grad_kernel", spy)
    loss, gh, gw, gb = kernels.linear_kd_loss(hs, ws, bs, ht, wt, bt, y, opts, None, 1.0, True)
    assert spy.launches == math.ceil(vocab / block_v)
    assert gw.dtype == dtype  # complete slabs are cast at once: no fp32 vocab x hidden buffer
    # The same sums in the same order (each weight-gradient column has one slab): the slab
    # version is the whole-vocabulary one cast to the weight's dtype.
    assert torch.equal(gw, whole[2].to(dtype))
    for a, b in zip((loss, gh, gb), (whole[0], whole[1], whole[3])):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    _, *ref_grads = _reference(
        hs, ws, bs, ht, wt, bt, y, _options(divergence="reverse_kl"), _row_weight(y, rows, "sum", torch.tensor(1.0))
    )
    assert_rel_close(gw, ref_grads[1], dtype, factor=2)


def test_ignored_rows_never_reach_the_kernels(kernels, monkeypatch):
    rows, hidden_s, hidden_t, vocab = _shape()
    hs, ws, bs, ht, wt, bt, y = _inputs(rows, hidden_s, hidden_t, vocab)
    require_backend("linear_kd_loss", "triton", hs)
    opts = _kd_options(_options(divergence="jsd"), True)
    row_scale = torch.rand(rows) + 0.5
    # The kernels mask ignored rows themselves: run them on every row as the reference.
    everything = kernels.linear_kd_grad(hs, ws, bs, ht, wt, bt, y, opts, row_scale, 0.5)
    seen = []
    stats = kernels.linear_kd_stats

    def spy(hs, *args, **kwargs):
        seen.append(hs.shape[0])
        return stats(hs, *args, **kwargs)

    monkeypatch.setattr(kernels, "linear_kd_stats", spy)
    kept = kernels.linear_kd_loss(hs, ws, bs, ht, wt, bt, y, opts, row_scale, 0.5, True)
    n_kept = int((y != -100).sum())
    assert 0 < n_kept < rows and seen == [n_kept]
    assert torch.equal(kept[1][y == -100], torch.zeros_like(kept[1][y == -100]))
    assert torch.equal(kept[0][y == -100], torch.zeros_like(kept[0][y == -100]))
    for a, b in zip(kept, everything):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # every row ignored: no kernel at all, zero loss and gradients
    seen.clear()
    all_ignored = kernels.linear_kd_loss(hs, ws, bs, ht, wt, bt, torch.full_like(y, -100), opts, None, 1.0, True)
    assert seen == [0]
    assert all(torch.equal(x, torch.zeros_like(x)) for x in all_ignored)


# -- on a GPU (compiled kernels, real atomics) ----------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize(
    "dtype, divergence, reduction",
    [(torch.float32, "jsd", "none"), (torch.bfloat16, "forward_kl", "mean"), (torch.bfloat16, "reverse_kl", "none")],
)
def test_gpu_fused_linear_gradients(dtype, divergence, reduction, monkeypatch):
    rows, hidden_s, hidden_t, vocab = 2048, 256, 384, 32003
    inputs = [x.cuda() if x is not None else None for x in _inputs(rows, hidden_s, hidden_t, vocab, dtype=dtype)]
    hs, ws, bs, ht, wt, bt, y = inputs
    monkeypatch.setattr(kd_op_tables, "linear_chunks", _forbid)
    opts = _options(divergence=divergence, reduction=reduction)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    loss, grads, upstream = _run(hs, ws, bs, ht, wt, bt, y, opts)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    # parameter copies, gradients and their fp32 accumulators; one fp32 rows x vocab tensor
    # alone would be twice this bound
    assert extra < rows * vocab * 4 // 2, f"{extra / 2**20:.1f} MiB above the inputs"
    ref_loss, *ref_grads = _reference(hs, ws, bs, ht, wt, bt, y, opts, _row_weight(y, rows, reduction, upstream))
    want = ref_loss if reduction == "none" else ref_loss.sum() / int((y != -100).sum())
    assert_rel_close(loss, want, torch.float32, factor=10)
    for grad, ref in zip(grads, ref_grads):
        assert_rel_close(grad, ref, dtype, factor=10 if dtype == torch.float32 else 2)
    # the atomics reorder the sums between runs: equal up to float32 rounding
    again = _run(hs, ws, bs, ht, wt, bt, y, opts, upstream)[1]
    for a, b in zip(grads, again):
        assert_rel_close(b, a, torch.float32, factor=10)
