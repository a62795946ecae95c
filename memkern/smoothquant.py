"""SmoothQuant calibration: move activation outliers into the weights before W8A8.

For a linear layer ``y = x @ W.T`` and per-input-channel factors ``s``,
``y = (x / s) @ (W * s).T`` exactly; with ``s_j = max|X_j|^a / max|W_j|^(1 - a)`` (``a``:
the migration strength, 0.5 by default) the channels where activations have outliers are
divided down and the weight columns that meet them are scaled up, so per-token activation
quantisation loses much less (Xiao et al., SmoothQuant, 2023). ``max|X_j|`` comes from
calibration batches (forward pre-hooks on the linear layers, a running max of ``|x|`` per
input channel); ``max|W_j|`` is the largest weight of column ``j``.

Where ``1 / s`` goes, decided by tracing the first calibration batch:

* **Folded into the module that produced x**, when x is the output of a ``LayerNorm``
  (with an affine weight), an ``RMSNorm`` (``torch.nn.RMSNorm`` or any module whose class
  name ends in ``RMSNorm`` and holds a 1-D ``weight``: Hugging Face's) or an ``nn.Linear``,
  and that output reaches nothing but ``F.linear`` calls of ``nn.Linear`` layers (q, k
  and v sharing one norm: one ``s`` for all of them, from the largest of their weight
  columns). The norm's weight and bias (the linear layer's output rows and bias) are
  divided by ``s`` and every consumer's weight columns multiplied by it: the float model
  computes the same function, and converting it afterwards quantises the smoothed weights.
* **Kept in the converted layer** otherwise (x comes from an activation function, a
  residual sum, a view, the model's input, or the producer's output is also used
  elsewhere): the layer becomes :class:`memkern.nn.SmoothedInt8Linear`, which multiplies
  x by its ``input_scale = 1 / s`` before quantising it.

The trace watches every torch function call of the first batch (a ``TorchFunctionMode``)
and notes which calls take each norm or linear output as an argument; anything but a
linear layer's input, or a producer whose output the model returns, leaves that producer
alone. Producers and consumers whose parameters are shared with another module (tied
weights) are never folded into, since scaling them would change the other user.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any
from collections.abc import Iterable

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten


@dataclass
class SmoothReport:
    """What :func:`smooth` did."""

    alpha: float
    folded: dict[str, list[str]] = field(default_factory=dict)
    """Producer module name -> the linear layers whose smoothing was folded into it."""
    pending: dict[str, torch.Tensor] = field(default_factory=dict)
    """Linear layer name -> its factors ``s`` (``(in_features,)`` float32), to be applied
    by the converted layer (:class:`memkern.nn.SmoothedInt8Linear`)."""


def _is_rms_norm(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return isinstance(module, getattr(nn, "RMSNorm", ())) or (
        type(module).__name__.endswith("RMSNorm") and isinstance(weight, torch.Tensor) and weight.dim() == 1
    )


def _foldable_producer(module: nn.Module) -> bool:
    if isinstance(module, nn.LayerNorm):
        return module.weight is not None
    if isinstance(module, nn.Linear):
        return True
    return _is_rms_norm(module) and getattr(module, "weight", None) is not None


class _Trace(TorchFunctionMode):
    """Which calls consume each producer's output, and where each linear layer's input
    comes from, over one forward pass."""

    def __init__(self, producers: dict[nn.Module, str], linear_by_weight: dict[int, str]):
        super().__init__()
        self.producers = producers
        self.linear_by_weight = linear_by_weight
        self.outputs: dict[int, tuple[str, torch.Tensor]] = {}  # id -> (producer, tensor kept alive)
        self.consumers: dict[str, set[str | None]] = defaultdict(set)  # producer -> linears (None: other use)
        self.origins: dict[str, set[str | None]] = defaultdict(set)  # linear -> producers (None: other input)
        self.paused = False

    def producer_hook(self, module: nn.Module, inputs: Any, output: Any) -> None:
        if isinstance(output, torch.Tensor):
            self.outputs[id(output)] = (self.producers[module], output)

    def returned(self, result: Any) -> None:
        for t in tree_flatten(result)[0]:
            if isinstance(t, torch.Tensor) and id(t) in self.outputs:
                self.consumers[self.outputs[id(t)][0]].add(None)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.paused:
            linear = None
            if func is torch.nn.functional.linear and len(args) >= 2:
                linear = self.linear_by_weight.get(id(args[1]))
                if linear is not None:
                    source = self.outputs.get(id(args[0]))
                    self.origins[linear].add(source[0] if source else None)
            for i, t in enumerate(tree_flatten((args, kwargs))[0]):
                if isinstance(t, torch.Tensor) and id(t) in self.outputs:
                    as_input = linear is not None and i == 0
                    self.consumers[self.outputs[id(t)][0]].add(linear if as_input else None)
        return func(*args, **kwargs)


def _run(model: nn.Module, batch: Any) -> Any:
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def _shared_parameters(model: nn.Module) -> set[int]:
    """ids of parameters held by more than one module (tied weights)."""
    count: dict[int, int] = defaultdict(int)
    for _, p in model.named_parameters(remove_duplicate=False):
        count[id(p)] += 1
    return {k for k, v in count.items() if v > 1}


def _factors(x_max: torch.Tensor, w_max: torch.Tensor, alpha: float) -> torch.Tensor:
    s = x_max.clamp_min(0).pow(alpha) / w_max.pow(1 - alpha)
    # A channel never active in calibration (or a zero weight column): leave it alone.
    return torch.where((x_max > 0) & (w_max > 0) & torch.isfinite(s), s, torch.ones_like(s))


def _column_max(linears: Iterable[nn.Linear]) -> torch.Tensor:
    return torch.stack([m.weight.detach().float().abs().amax(dim=0) for m in linears]).amax(dim=0)


@torch.no_grad()
def _fold(producer: nn.Module, consumers: list[nn.Linear], s: torch.Tensor) -> None:
    if isinstance(producer, nn.Linear):
        producer.weight.div_(s.to(producer.weight.dtype)[:, None])
    else:
        producer.weight.div_(s.to(producer.weight.dtype))
    if getattr(producer, "bias", None) is not None:
        producer.bias.div_(s.to(producer.bias.dtype))
    for linear in consumers:
        linear.weight.mul_(s.to(linear.weight.dtype))


def smooth(
    model: nn.Module, calibration: Iterable[Any], alpha: float = 0.5, *, layers: dict[str, nn.Linear] | None = None
) -> SmoothReport:
    """SmoothQuant ``model`` in place from ``calibration`` batches (module docstring).

    Args:
        model: any module; it runs in eval mode under ``torch.no_grad()``.
        calibration: an iterable of batches, each passed as ``model(batch)`` (a tensor),
            ``model(*batch)`` (a tuple or list) or ``model(**batch)`` (a dict).
        alpha: migration strength in [0, 1] (0: nothing moves; 1: all of the activation
            range moves into the weights).
        layers: the linear layers to smooth, by name (default: every ``nn.Linear``);
            others are only scaled where they share a folded producer.

    Returns:
        A :class:`SmoothReport`: the folds made, and the factors of the layers whose
        smoothing must be applied at run time (their weights are left unchanged here).
    """
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"smooth: alpha (smooth=) must be a number in [0, 1], got {alpha!r}")
    named = dict(model.named_modules())
    linears = {n: m for n, m in named.items() if isinstance(m, nn.Linear)}
    chosen = dict(linears if layers is None else layers)
    producers = {m: n for n, m in named.items() if _foldable_producer(m)}
    trace = _Trace(producers, {id(m.weight): n for n, m in linears.items()})
    x_max: dict[str, torch.Tensor] = {}

    def record(name: str):
        def hook(module: nn.Module, inputs: tuple) -> None:
            trace.paused = True
            x = inputs[0].detach()
            seen = x.abs().reshape(-1, x.shape[-1]).amax(dim=0).float()
            x_max[name] = seen if name not in x_max else torch.maximum(x_max[name], seen)
            trace.paused = False

        return hook

    handles = [m.register_forward_pre_hook(record(n)) for n, m in linears.items()]
    was_training = model.training
    model.eval()
    batches = 0
    try:
        with torch.no_grad():
            for batch in calibration:
                if batches == 0:
                    first = [m.register_forward_hook(trace.producer_hook) for m in producers]
                    try:
                        with trace:
                            trace.returned(_run(model, batch))
                    finally:
                        for h in first:
                            h.remove()
                        trace.outputs.clear()
                else:
                    _run(model, batch)
                batches += 1
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if batches == 0:
        raise ValueError("smooth: calibration gave no batch; pass an iterable of model inputs")

    report = SmoothReport(alpha)
    shared = _shared_parameters(model)
    done: set[str] = set()
    for producer, pname in producers.items():
        users = trace.consumers.get(pname, set())
        if not users or None in users or not any(u in chosen for u in users):
            continue
        consumers = sorted(users)
        params = [p for p in producer.parameters(recurse=False)] + [linears[c].weight for c in consumers]
        if (
            any(trace.origins[c] != {pname} for c in consumers)
            or any(id(p) in shared for p in params)
            or any(c not in x_max for c in consumers)
        ):
            continue
        group = [linears[c] for c in consumers]
        xm = torch.stack([x_max[c] for c in consumers]).amax(dim=0)
        s = _factors(xm, _column_max(group).to(xm.device), alpha)
        _fold(producer, group, s)
        report.folded[pname] = consumers
        done.update(consumers)
    for name, linear in chosen.items():
        if name not in done and name in x_max:
            report.pending[name] = _factors(x_max[name], _column_max([linear]).to(x_max[name].device), alpha)
    return report
