"""What the ops' backward passes share: the context setup and dense gradients of the sparse
matmuls, and the refusal of double backward where an op's gradient was computed by a
kernel, not by differentiable tensor operations.

Such a gradient is a plain tensor to autograd. Under ``create_graph=True`` it would come
back with no graph behind it, so a penalty on it (``loss + g.pow(2).sum()``) would silently
contribute nothing to the next backward. Instead, the gradient comes back attached to a node
that raises a clear error if anything differentiates through it; first-order use under
``create_graph=True`` (where nothing does) still works.
"""

from __future__ import annotations


import torch


def save_matmul_inputs(ctx, inputs, output) -> None:
    """setup_context of a sparse matmul op whose inputs are ``(x, *weight storage, bias)``:
    saves the tensors before the bias (its gradient needs only the upstream gradient; sizes
    passed as ints are not saved) and whether a bias was given."""
    *operands, bias = inputs
    ctx.save_for_backward(*(t for t in operands if isinstance(t, torch.Tensor)))
    ctx.has_bias = bias is not None


def dense_matmul_grads(grad: torch.Tensor, x: torch.Tensor, w: torch.Tensor, has_bias: bool):
    """Gradients of ``x @ w.T + bias`` with ``w`` the decompressed sparse weight, accumulated
    in float32 (float64 stays float64): dx in x's dtype, the dense dW in the accumulation
    dtype (each storage keeps only its stored positions of it) and db (None without a bias)."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    g = grad.to(acc)
    dx = (g @ w.to(acc)).to(x.dtype)
    db = g.sum(0).to(grad.dtype) if has_bias else None
    return dx, g.t() @ x.to(acc), db


class _NoDoubleBackward(torch.autograd.Function):
    """Identity on the gradients; differentiating them raises."""

    @staticmethod
    def forward(ctx, op: str, reason: str, anchor: torch.Tensor, *grads: torch.Tensor):
        ctx.op, ctx.reason = op, reason
        return tuple(g.view_as(g) for g in grads)  # views: no copy of a gradient-sized buffer

    @staticmethod
    def backward(ctx, *_grads_of_grads):
        raise RuntimeError(
            f"{ctx.op}: double backward is not supported ({ctx.reason}). The gradient from "
            f"autograd.grad(..., create_graph=True) / backward(create_graph=True) is correct, "
            f"but it cannot be differentiated again; compute a gradient penalty on this loss "
            f"with the plain PyTorch reference (memkern.reference) instead."
        )


def refuse_double_backward(op: str, reason: str, *grads: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """``grads`` as they are, or, when backward builds a graph (create_graph=True, which
    runs backward with grad mode on), attached to a node that raises if differentiated."""
    if not torch.is_grad_enabled():
        return grads
    present = [g for g in grads if g is not None]
    if not present:
        return grads
    # A fresh leaf that requires grad gives the outputs a grad_fn (the raising node); it
    # carries no value and is connected to nothing else.
    anchor = torch.zeros((), device=present[0].device, requires_grad=True)
    attached = iter(_NoDoubleBackward.apply(op, reason, anchor, *present))
    return tuple(next(attached) if g is not None else None for g in grads)
