"""kd_loss and linear_kd_loss against the composition users write: log_softmax of both
models' logits, kl_div, cross_entropy, a mask for ignored rows (each a rows x vocab tensor,
most of them kept for backward), and for the fused-linear form the lm_head matmuls before
it. Every case is forward + backward; the measured call returns the student gradients.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

import memkern
from memkern.benchmarks.harness import Case, Provider, Work, on_backend

ALPHA, TEMPERATURE, IGNORE = 0.5, 2.0, -100


def eager_kd_loss(s: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    log_q = F.log_softmax(s.float() / TEMPERATURE, dim=-1)
    log_p = F.log_softmax(t.float() / TEMPERATURE, dim=-1)
    kd = F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1) * TEMPERATURE**2
    ce = F.cross_entropy(s.float(), y, ignore_index=IGNORE, reduction="none")
    mask = y != IGNORE
    return ((ALPHA * ce + (1 - ALPHA) * kd) * mask).sum() / mask.sum().clamp(min=1)


def eager_linear_kd_loss(hs, ws, ht, wt, y) -> torch.Tensor:
    with torch.no_grad():
        t = ht @ wt.t()
    return eager_kd_loss(hs @ ws.t(), t, y)


def memkern_kd_loss(s, t, y):
    return memkern.ops.kd_loss(s, t, y, alpha=ALPHA, temperature=TEMPERATURE, ignore_index=IGNORE)


def memkern_linear_kd_loss(hs, ws, ht, wt, y):
    return memkern.ops.linear_kd_loss(hs, ws, ht, wt, y, alpha=ALPHA, temperature=TEMPERATURE, ignore_index=IGNORE)


def _fwd_bwd(loss_fn, inputs: dict, grad_names: tuple[str, ...]):
    """forward + backward; returns the student gradients (cleared from .grad, so that the
    measured call's peak includes them and no call accumulates into an old one)."""
    args = [inputs[k] for k in ("s", "t", "y")] if "s" in inputs else [inputs[k] for k in ("hs", "ws", "ht", "wt", "y")]

    def run():
        loss_fn(*args).backward()
        grads = []
        for name in grad_names:
            grads.append(inputs[name].grad)
            inputs[name].grad = None
        return grads

    return run


@functools.cache
def _compiled(fn):
    return torch.compile(fn)


def _providers(eager, fused, grad_names, *also: tuple[str, str]) -> tuple[Provider, ...]:
    """The eager baseline, torch.compile of it, memkern's default backend and, for each
    (label, backend) in ``also``, memkern forced onto that backend."""
    return (
        Provider("torch eager", lambda inp: _fwd_bwd(eager, inp, grad_names), baseline=True),
        Provider("torch.compile", lambda inp: _fwd_bwd(_compiled(eager), inp, grad_names)),
        Provider("memkern", lambda inp: _fwd_bwd(fused, inp, grad_names)),
        *(
            Provider(label, lambda inp, b=backend: _fwd_bwd(on_backend(b, fused), inp, grad_names))
            for label, backend in also
        ),
    )


def _labels(rows: int, vocab: int, device) -> torch.Tensor:
    y = torch.randint(0, vocab, (rows,), device=device)
    y[torch.rand(rows, device=device) < 0.1] = IGNORE  # some padding, as in real batches
    return y


def kd_cases(quick: bool) -> list[Case]:
    out = []
    # The GPU shape is the aim's, quick or not: it takes seconds on a GPU, and the GPU check
    # (bench/device_check.sh) runs the quick set.
    gpu = [(8192, 128256, torch.bfloat16, ("cuda",))]
    shapes = [(512, 8000, torch.float32, ("cpu",))] if quick else [(4096, 32000, torch.float32, ("cpu",))]
    shapes += gpu
    for rows, vocab, dtype, devices in shapes:

        def make_inputs(device, rows=rows, vocab=vocab, dtype=dtype):
            s = (torch.randn(rows, vocab, device=device) * 2).to(dtype).requires_grad_()
            t = (torch.randn(rows, vocab, device=device) * 2).to(dtype)
            return {"s": s, "t": t, "y": _labels(rows, vocab, device)}

        # student and teacher logits read, the student's gradient written
        work = Work(bytes=3 * rows * vocab * dtype.itemsize + 8 * rows)
        out.append(
            Case(
                "kd_loss",
                f"{rows}x{vocab}",
                dtype,
                make_inputs,
                _providers(eager_kd_loss, memkern_kd_loss, ("s",)),
                mode="fwd+bwd",
                devices=devices,
                work=work,
            )
        )
    return out


def linear_kd_cases(quick: bool) -> list[Case]:
    out = []
    # (rows, student hidden, teacher hidden, vocab, dtype, devices)
    shapes = (
        [(256, 256, 384, 4000, torch.float32, ("cpu",))]
        if quick
        else [(2048, 1024, 1024, 32000, torch.float32, ("cpu",))]
    )
    shapes += [(8192, 4096, 4096, 128256, torch.bfloat16, ("cuda",))]  # the aim's shape, quick or not
    for rows, hs_dim, ht_dim, vocab, dtype, devices in shapes:

        def make_inputs(device, rows=rows, hs_dim=hs_dim, ht_dim=ht_dim, vocab=vocab, dtype=dtype):
            def w(v, h):
                return (torch.randn(v, h, device=device) / h**0.5 * 2).to(dtype)

            return {
                "hs": torch.randn(rows, hs_dim, device=device).to(dtype).requires_grad_(),
                "ws": w(vocab, hs_dim).requires_grad_(),
                "ht": torch.randn(rows, ht_dim, device=device).to(dtype),
                "wt": w(vocab, ht_dim),
                "y": _labels(rows, vocab, device),
            }

        # On a GPU the default is the fused Triton kernels; the CUDA backend's chunked
        # matmuls are the other memkern path, faster or not is what the GPU run tells.
        also = (("memkern cuda chunks", "cuda"),) if devices == ("cuda",) else ()
        # The products eager must do: both models' logits, then d/dh and d/dW of the
        # student's; hidden states and weights read, their gradients written.
        work = Work(
            flops=2 * rows * vocab * (hs_dim + ht_dim) + 4 * rows * vocab * hs_dim,
            bytes=dtype.itemsize * (2 * (rows + vocab) * hs_dim + (rows + vocab) * ht_dim) + 8 * rows,
        )
        out.append(
            Case(
                "linear_kd_loss",
                f"{rows}x{hs_dim}x{vocab}",
                dtype,
                make_inputs,
                _providers(eager_linear_kd_loss, memkern_linear_kd_loss, ("hs", "ws"), *also),
                mode="fwd+bwd",
                devices=devices,
                work=work,
            )
        )
    return out
