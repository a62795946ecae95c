"""Vocabulary-parallel distillation (memkern.distributed.vocab_parallel) on gloo ranks: the loss
and gradients of DTensor-sharded lm_heads / logits equal the one-process memkern result and a
float64 formula written here, for every option; argument errors are the same on every rank.

Each spawn costs seconds, so one spawned body runs many checks and returns its errors."""

from __future__ import annotations

import itertools
import os

import pytest
import torch

from tests.multirank import run_ranks

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
REDUCTIONS = ("mean", "sum", "none")
# (alpha, temperature, soft_loss_scale, bias): each divergence x reduction runs all of them.
SETTINGS = ((0.5, 1.0, "t2", True), (0.0, 2.5, "none", False), (1.0, 0.7, "t2", True), (0.25, 4.0, "t2", False))
RTOL = 1e-5


# -- the float64 formula ------------------------------------------------------------------------
def oracle_rows(s, t, labels, *, alpha, temperature, divergence, beta, ignore_index, soft_loss_scale):
    """l_i of memkern.ops.kd_loss in float64, written from the definition."""
    s, t = s.double(), t.double()
    log_q, log_p = torch.log_softmax(s / temperature, -1), torch.log_softmax(t / temperature, -1)
    q, p = log_q.exp(), log_p.exp()
    if divergence == "forward_kl":
        d = (p * (log_p - log_q)).sum(-1)
    elif divergence == "reverse_kl":
        d = (q * (log_q - log_p)).sum(-1)
    else:
        log_m = (beta * p + (1 - beta) * q).log()
        d = beta * (p * (log_p - log_m)).sum(-1) + (1 - beta) * (q * (log_q - log_m)).sum(-1)
    k = temperature**2 if soft_loss_scale == "t2" else 1.0
    rows = (1 - alpha) * k * d
    if labels is None:
        return rows
    counted = labels != ignore_index
    safe = torch.where(counted, labels, 0)
    rows = rows - alpha * torch.log_softmax(s, -1).gather(-1, safe[..., None]).squeeze(-1)
    return torch.where(counted, rows, 0.0)


def oracle_reduce(rows, labels, reduction, ignore_index, normalizer=None):
    if reduction == "none":
        return rows
    if normalizer is not None:
        return rows.sum() / normalizer
    n = rows.numel() if labels is None else int((labels != ignore_index).sum())
    return rows.sum() / max(n, 1) if reduction == "mean" else rows.sum()


def rel_err(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _check(errors, what, got, want, rtol=RTOL):
    err = rel_err(got, want)
    if not err <= rtol:  # NaN fails too
        errors.append(f"{what}: relative error {err:.3g}")


def _full(x):
    from torch.distributed.tensor import DTensor

    return x.full_tensor() if isinstance(x, DTensor) else x


# -- spawned bodies ------------------------------------------------------------------------------
def _setup(rank, backend):
    import memkern
    from torch.distributed.tensor import init_device_mesh

    if backend == "triton":
        os.environ["TRITON_INTERPRET"] = "1"
    torch.manual_seed(0)  # the same tensors on every rank
    return memkern, init_device_mesh("cpu", (torch.distributed.get_world_size(),))


def _grid_options(divergence, reduction, alpha, temperature, soft_loss_scale, *, beta):
    """The loss options of one point of the DIVERGENCES x REDUCTIONS x SETTINGS grid."""
    return dict(
        alpha=alpha,
        temperature=temperature,
        divergence=divergence,
        beta=beta,
        ignore_index=-100,
        reduction=reduction,
        soft_loss_scale=soft_loss_scale,
    )


def _linear_case(memkern, mesh, errors, tag, *, rows_shape, hidden, vocab, labels_fn, options, bias, normalizer=None):
    """One linear_kd_loss call: sharded vs one-process vs float64, loss and the three gradients."""
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    hs = torch.randn(*rows_shape, hidden)
    ws, wt = torch.randn(vocab, hidden) * 0.5, torch.randn(vocab, hidden + 2) * 0.5
    ht = torch.randn(*rows_shape, hidden + 2)
    bs, bt = (torch.randn(vocab), torch.randn(vocab)) if bias else (None, None)
    labels = labels_fn(rows_shape, vocab)
    upstream = torch.randn(rows_shape) if options["reduction"] == "none" else torch.tensor(0.75)

    def shard(x, grad):
        return None if x is None else distribute_tensor(x.clone(), mesh, [Shard(0)]).requires_grad_(grad)

    h_sharded = hs.clone().requires_grad_()
    dws, dbs, dwt, dbt = shard(ws, True), shard(bs, True), shard(wt, False), shard(bt, False)
    extra = {} if normalizer is None else {"normalizer": normalizer}
    if normalizer is None:
        loss = memkern.ops.linear_kd_loss(
            h_sharded, dws, ht, dwt, labels, student_bias=dbs, teacher_bias=dbt, **options
        )
    else:  # the public keyword is wired through separately; the sharded entry point takes it
        from memkern.distributed import vocab_parallel

        loss = vocab_parallel.linear_kd_loss(
            h_sharded, dws, ht, dwt, labels, student_bias=dbs, teacher_bias=dbt, **options, **extra
        )
    (loss * upstream).sum().backward()
    if not isinstance(dws.grad, DTensor) or tuple(dws.grad.placements) != (Shard(0),):
        errors.append(f"{tag}: student_weight.grad is {type(dws.grad).__name__} {getattr(dws.grad, 'placements', '')}")

    # float64 from the definition, through autograd
    h64, w64 = hs.double().requires_grad_(), ws.double().requires_grad_()
    b64 = bs.double().requires_grad_() if bias else None
    s64 = h64 @ w64.T + (b64 if bias else 0)
    t64 = ht.double() @ wt.double().T + (bt.double() if bias else 0)
    opt64 = {k: v for k, v in options.items() if k != "reduction"}
    want = oracle_reduce(
        oracle_rows(s64, t64, labels, **opt64), labels, options["reduction"], options["ignore_index"], normalizer
    )
    (want * upstream.double()).sum().backward()
    _check(errors, f"{tag} loss vs float64", loss, want)
    _check(errors, f"{tag} grad_hidden vs float64", h_sharded.grad, h64.grad)
    _check(errors, f"{tag} grad_weight vs float64", dws.grad.full_tensor(), w64.grad)
    if bias:
        _check(errors, f"{tag} grad_bias vs float64", dbs.grad.full_tensor(), b64.grad)

    if normalizer is None:  # the one-process memkern result
        h1, w1 = hs.clone().requires_grad_(), ws.clone().requires_grad_()
        b1 = bs.clone().requires_grad_() if bias else None
        with memkern.use_backend(_one_process_backend()):
            one = memkern.ops.linear_kd_loss(h1, w1, ht, wt, labels, student_bias=b1, teacher_bias=bt, **options)
            (one * upstream).sum().backward()
        _check(errors, f"{tag} loss vs one process", loss, one)
        _check(errors, f"{tag} grad_weight vs one process", dws.grad.full_tensor(), w1.grad)
        _check(errors, f"{tag} grad_hidden vs one process", h_sharded.grad, h1.grad)
    if not torch.equal(loss.detach(), _broadcast_from_zero(loss.detach())):
        errors.append(f"{tag}: the loss differs between ranks")


def _one_process_backend():
    """The forced backend, except under the Triton interpreter: there the one-process fused
    kernels (proven in tests/test_kd.py) would take minutes, so the one-process torch result
    stands in, and the float64 formula checks the sharded Triton kernels."""
    import memkern

    forced = memkern.backends.forced_backend()
    return "torch" if forced == "triton" else forced


def _light(backend) -> bool:
    return backend == "triton"


def _broadcast_from_zero(x):
    y = x.clone()
    torch.distributed.broadcast(y, 0)
    return y


def _random_labels(shape, vocab):
    labels = torch.randint(0, vocab, shape)
    labels.view(-1)[1] = -100
    return labels


def _parity_body(rank, world, backend):
    memkern, mesh = _setup(rank, backend)
    errors = []
    with memkern.use_backend(backend):
        for div, red, (alpha, temp, scale, bias) in itertools.product(
            DIVERGENCES, REDUCTIONS, SETTINGS[::2] if _light(backend) else SETTINGS
        ):
            options = _grid_options(div, red, alpha, temp, scale, beta=0.3)
            tag = f"{div}/{red}/{alpha}/{temp}/{scale}/bias={bias}"
            _linear_case(memkern, mesh, errors, tag, rows_shape=(9,), hidden=6, vocab=13, labels_fn=_random_labels,
                         options=options, bias=bias)  # fmt: skip
    return errors


def _edge_body(rank, world, backend):
    memkern, mesh = _setup(rank, backend)
    errors = []
    base = dict(
        alpha=0.5, temperature=2.0, divergence="jsd", beta=0.5, ignore_index=-1, reduction="mean", soft_loss_scale="t2"
    )
    cases = {
        # vocabulary smaller than the ranks: the last rank's shard is empty at 4 ranks
        "vocab 3": dict(rows_shape=(5,), vocab=3, labels_fn=lambda s, v: torch.randint(0, v, s)),
        # V = 10 over 4 ranks: shards of 3, 3, 3, 1; every label in the last rank's shard
        "labels on the last shard": dict(rows_shape=(6,), vocab=10, labels_fn=lambda s, v: torch.full(s, v - 1)),
        # every label on rank 0's shard, rows ignored in between, 3-D rows
        "labels on rank 0, 3-D": dict(
            rows_shape=(2, 4), vocab=11, labels_fn=lambda s, v: torch.tensor([[0, -1, 1, 0], [-1, 2, -1, 1]])
        ),
        "every row ignored": dict(rows_shape=(4,), vocab=9, labels_fn=lambda s, v: torch.full(s, -1)),
        "no labels": dict(rows_shape=(5,), vocab=9, labels_fn=lambda s, v: None),
    }
    with memkern.use_backend(backend):
        for tag, case in cases.items():
            for red in ("mean", "none") if _light(backend) else REDUCTIONS:
                options = dict(base, reduction=red, alpha=0.0 if tag == "no labels" else 0.5)
                _linear_case(memkern, mesh, errors, f"{tag}/{red}", hidden=5, options=options, bias=True, **case)
        for norm in (
            (7, torch.tensor(12)) if _light(backend) else (7, torch.tensor(7.0), torch.tensor(12))
        ):  # e.g. tokens over data-parallel ranks
            for red in ("mean", "sum"):
                _linear_case(memkern, mesh, errors, f"normalizer {norm!r}/{red}", rows_shape=(6,), hidden=4, vocab=10,
                             labels_fn=_random_labels, options=dict(base, reduction=red, ignore_index=-100),
                             bias=False, normalizer=norm)  # fmt: skip
        # every row ignored: a mean of 0 rows is 0 and every gradient is 0 (never NaN)
        from torch.distributed.tensor import Shard, distribute_tensor

        w = distribute_tensor(torch.randn(9, 4), mesh, [Shard(0)]).requires_grad_()
        h = torch.randn(3, 4, requires_grad=True)
        loss = memkern.ops.linear_kd_loss(h, w, h.detach(), w.detach(), torch.full((3,), -100))
        loss.backward()
        if loss.item() != 0 or w.grad.to_local().abs().sum() != 0 or h.grad.abs().sum() != 0:
            errors.append(f"every row ignored: loss {loss.item()}, gradients not 0")
        _replicated_hidden_and_2d_mesh(memkern, mesh, errors, rank, world)
    return errors


def _replicated_hidden_and_2d_mesh(memkern, mesh, errors, rank, world):
    """A Replicate DTensor hidden state gets a Replicate gradient; on a (dp, tp) mesh each
    data-parallel group computes the loss of its own rows over its tensor-parallel shards."""
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor, init_device_mesh

    w, wt, y = torch.randn(11, 5), torch.randn(11, 3), torch.tensor([4, 10, 0])
    h, ht = torch.randn(3, 5), torch.randn(3, 3)
    dh = distribute_tensor(h.clone(), mesh, [Replicate()]).requires_grad_()
    dw = distribute_tensor(w.clone(), mesh, [Shard(0)]).requires_grad_()
    loss = memkern.nn.LinearKDLoss(alpha=0.3, temperature=1.5)(dh, dw, ht, distribute_tensor(wt, mesh, [Shard(0)]), y)
    loss.backward()
    h1 = h.clone().requires_grad_()
    with memkern.use_backend(_one_process_backend()):
        one = memkern.ops.linear_kd_loss(h1, w, ht, wt, y, alpha=0.3, temperature=1.5)
        one.backward()
    _check(errors, "replicated hidden: loss", loss, one)
    if not isinstance(dh.grad, DTensor) or tuple(dh.grad.placements) != (Replicate(),):
        errors.append(f"replicated hidden: grad is {type(dh.grad).__name__} {getattr(dh.grad, 'placements', '')}")
    else:
        _check(errors, "replicated hidden: grad", dh.grad.to_local(), h1.grad)
    if world != 4:
        return
    mesh2 = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    dp = mesh2.get_local_rank("dp")
    torch.manual_seed(100 + dp)  # each data-parallel group its own rows
    h, ht, y = torch.randn(4, 5), torch.randn(4, 3), torch.randint(0, 11, (4,))
    if dp == 1:  # every row of this group ignored, while the other group's count
        y.fill_(-100)
    hs = h.clone().requires_grad_()
    dw = distribute_tensor(w.clone(), mesh2, [Replicate(), Shard(0)]).requires_grad_()
    dwt = distribute_tensor(wt, mesh2, [Replicate(), Shard(0)])
    loss = memkern.ops.linear_kd_loss(hs, dw, ht, dwt, y, divergence="reverse_kl", reduction="sum")
    loss.backward()
    h1, w1 = h.clone().requires_grad_(), w.clone().requires_grad_()
    with memkern.use_backend(_one_process_backend()):
        one = memkern.ops.linear_kd_loss(h1, w1, ht, wt, y, divergence="reverse_kl", reduction="sum")
        one.backward()
    _check(errors, f"2-D mesh dp {dp}: loss", loss, one)
    _check(errors, f"2-D mesh dp {dp}: grad_hidden", hs.grad, h1.grad)
    # the weight gradient of this dp group's rows (a data-parallel wrapper would average the groups)
    tp, per = mesh2.get_local_rank("tp"), 6  # ceil(11 / 2)
    _check(errors, f"2-D mesh dp {dp}: grad_weight", dw.grad.to_local(), w1.grad[tp * per : (tp + 1) * per])
    if dp == 1 and (loss.item() != 0 or hs.grad.abs().sum() != 0 or dw.grad.to_local().abs().sum() != 0):
        errors.append(f"2-D mesh: the all-ignored group got loss {loss.item()} or nonzero gradients")


def _logits_body(rank, world, backend):
    """kd_loss on logits sharded on the last dimension (a column-parallel lm_head's output)."""
    memkern, mesh = _setup(rank, backend)
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    errors = []
    with memkern.use_backend(backend):
        for div, red, (alpha, temp, scale, _), shape in itertools.product(
            DIVERGENCES, REDUCTIONS, SETTINGS[:1] if _light(backend) else SETTINGS[:3], ((7, 10), (2, 3, 9))
        ):
            options = _grid_options(div, red, alpha, temp, scale, beta=0.6)
            s, t = torch.randn(shape) * 2, torch.randn(shape) * 2
            labels = _random_labels(shape[:-1], shape[-1])
            dim = len(shape) - 1
            ds = distribute_tensor(s.clone(), mesh, [Shard(dim)]).requires_grad_()
            dt = distribute_tensor(t, mesh, [Shard(dim)])
            upstream = torch.randn(shape[:-1]) if red == "none" else torch.tensor(1.5)
            loss = memkern.ops.kd_loss(ds, dt, labels, **options)
            (loss * upstream).sum().backward()
            tag = f"kd_loss {div}/{red}/{alpha}/{shape}"
            if not isinstance(ds.grad, DTensor) or tuple(ds.grad.placements) != (Shard(dim),):
                errors.append(f"{tag}: grad is {type(ds.grad).__name__}")
            s1 = s.clone().requires_grad_()
            with memkern.use_backend(_one_process_backend()):
                one = memkern.ops.kd_loss(s1, t, labels, **options)
                (one * upstream).sum().backward()
            s64 = s.double().requires_grad_()
            opt64 = {k: v for k, v in options.items() if k != "reduction"}
            want = oracle_reduce(oracle_rows(s64, t, labels, **opt64), labels, red, -100)
            (want * upstream.double()).sum().backward()
            _check(errors, f"{tag} loss vs float64", loss, want)
            _check(errors, f"{tag} loss vs one process", loss, one)
            _check(errors, f"{tag} grad vs float64", ds.grad.full_tensor(), s64.grad)
            _check(errors, f"{tag} grad vs one process", ds.grad.full_tensor(), s1.grad)
        # the nn module routes DTensors the same way
        ds = distribute_tensor(torch.randn(4, 8), mesh, [Shard(1)])
        dt = distribute_tensor(torch.randn(4, 8), mesh, [Shard(1)])
        y = torch.tensor([0, 7, 3, -100])
        module = memkern.nn.KDLoss(alpha=0.2, temperature=3.0)
        _check(
            errors,
            "nn.KDLoss",
            module(ds, dt, y),
            memkern.ops.kd_loss(_full(ds), _full(dt), y, alpha=0.2, temperature=3.0),
        )
    return errors


def _error_body(rank, world):
    """Each bad call raises on every rank before any collective: the messages come back."""
    import memkern
    from torch.distributed.tensor import DeviceMesh, Replicate, Shard, distribute_tensor, init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(0)
    h, y = torch.randn(4, 6), torch.randint(0, 10, (4,))
    w = torch.randn(10, 6)
    ws = distribute_tensor(w, mesh, [Shard(0)])
    other_mesh = DeviceMesh("cpu", list(reversed(range(world))))  # same ranks, other order
    bad_teachers = {
        "replicated teacher": distribute_tensor(w, mesh, [Replicate()]),
        "hidden-sharded teacher": distribute_tensor(w, mesh, [Shard(1)]),
        "plain teacher": w,
        "other mesh": distribute_tensor(w, other_mesh, [Shard(0)]),
        "other vocabulary": distribute_tensor(torch.randn(12, 6), mesh, [Shard(0)]),
    }
    messages = {}
    for tag, wt in bad_teachers.items():
        try:
            memkern.ops.linear_kd_loss(h, ws, h, wt, y)
        except ValueError as e:
            messages[tag] = str(e)
    try:  # a vocabulary-sharded bias on a hidden-sharded weight
        memkern.ops.linear_kd_loss(
            h, distribute_tensor(w, mesh, [Shard(1)]), h, distribute_tensor(w, mesh, [Shard(1)]), y
        )
    except ValueError as e:
        messages["hidden-sharded weights"] = str(e)
    try:
        memkern.ops.linear_kd_loss(h, ws, h, ws, y, student_bias=torch.randn(10))
    except ValueError as e:
        messages["plain bias"] = str(e)
    try:
        logits = distribute_tensor(torch.randn(4, 10), mesh, [Shard(1)])
        memkern.ops.kd_loss(logits, distribute_tensor(torch.randn(4, 10), mesh, [Shard(0)]), y)
    except ValueError as e:
        messages["logits sharded differently"] = str(e)
    from memkern.distributed import vocab_parallel

    for tag, norm in (("normalizer 0", 0), ("normalizer none", "none")):
        try:
            reduction = "none" if norm == "none" else "mean"
            vocab_parallel.linear_kd_loss(
                h, ws, h, ws, y, normalizer=3 if norm == "none" else norm, reduction=reduction
            )
        except ValueError as e:
            messages[tag] = str(e)
    torch.distributed.barrier()  # every rank got here: nobody waits in a collective
    return messages


# -- tests -----------------------------------------------------------------------------------------
CPU_BACKENDS = ("cpp", "torch", "triton")


def _all_checks_body(rank, world, backend):
    return _parity_body(rank, world, backend) + _edge_body(rank, world, backend) + _logits_body(rank, world, backend)


# One spawn per row (spawning costs seconds): every option, the edge cases and the logits form.
# Triton runs under its interpreter; the cpp backend's per-shard steps are the torch ones, but
# its one-process reference is the C++ kernel. 4 ranks give an empty shard at vocabulary 3.
@pytest.mark.parametrize("world, backend", [(4, "cpp"), (2, "torch"), (2, "triton")])
def test_vocab_parallel_matches_one_process_and_float64(world, backend):
    errors = run_ranks(_all_checks_body, world, backend, timeout=300)
    assert errors == [[]] * world, "\n".join(errors[0][:20])


def test_bad_sharding_raises_the_same_error_on_every_rank():
    results = run_ranks(_error_body, 2)
    assert results[0] == results[1]
    m = results[0]
    assert set(m) == {
        "replicated teacher", "hidden-sharded teacher", "plain teacher", "other mesh", "other vocabulary",
        "hidden-sharded weights", "plain bias", "logits sharded differently", "normalizer 0", "normalizer none",
    }  # fmt: skip
    assert "teacher_weight and student_weight must be sharded the same way" in m["replicated teacher"]
    assert "Replicate()" in m["replicated teacher"]
    assert "Shard(dim=1)" in m["hidden-sharded teacher"]
    assert "student_weight is a DTensor sharded on the vocabulary but teacher_weight is a Tensor" in m["plain teacher"]
    assert "must be sharded the same way" in m["other mesh"] and "mesh of ranks [1, 0]" in m["other mesh"]
    assert "student vocabulary size 10 != teacher vocabulary size 12" in m["other vocabulary"]
    assert "student_weight must be sharded on the vocabulary (Shard(0))" in m["hidden-sharded weights"]
    assert "student_bias must be sharded like student_weight" in m["plain bias"]
    assert "teacher_logits and student_logits must be sharded the same way" in m["logits sharded differently"]
    assert "normalizer must be a finite number > 0, got 0" in m["normalizer 0"]
    assert "it needs reduction 'mean' or 'sum', got 'none'" in m["normalizer none"]


def _example_body(rank, world):
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).parents[1] / "examples" / "distill_tensor_parallel.py"
    spec = importlib.util.spec_from_file_location("distill_tensor_parallel", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    small = ["--steps", "3", "--vocab", "301", "--hidden", "16", "--teacher-hidden", "24", "--batch", "2", "--seq", "8"]
    return example.main(small), example.main([*small, "--no-tensor-parallel"])


def test_example_trains_the_same_with_vocabulary_parallel_lm_heads():
    """Three optimizer steps with the lm_heads sharded over 2 ranks follow the one-process run."""
    results = run_ranks(_example_body, 2)
    (sharded, whole), (sharded_1, _) = results
    assert sharded == sharded_1  # the same loss on every rank
    assert len(sharded) == 3 and sharded[-1] < sharded[0]
    for a, b in zip(sharded, whole):
        assert abs(a - b) <= 1e-5 * abs(b), (sharded, whole)
