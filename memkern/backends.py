"""The one place that picks an implementation for each op call.

Every op owns an :class:`OpTable` of implementations, one per backend:

* ``triton``: Triton kernels (CUDA tensors; CPU tensors only under ``TRITON_INTERPRET=1``)
* ``cuda``:   the CUDA kernels in memkern._C (CUDA tensors, CUDA build only)
* ``cpp``:    the C++ CPU kernels in memkern._C (CPU tensors)
* ``torch``:  the plain-PyTorch reference (anything)

Each implementation can say why it cannot run on given inputs (not built, device, dtype,
shape). Unless a backend is forced, a call runs the first implementation in the op's
preference order for the input's device type that can run; ``torch`` always can, so a
call never fails for lack of a backend. A backend is forced with ``MEMKERN_BACKEND=name``
or ``with memkern.use_backend(name):`` (the context manager wins); forcing one that
cannot run raises :class:`BackendUnavailable` listing every backend's reasons.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from dataclasses import dataclass, field
from typing import Any
from collections.abc import Callable, Iterator, Sequence

import torch

from memkern import _autocast, _library
from memkern._validate import dtype_name

BACKENDS: tuple[str, ...] = ("triton", "cuda", "cpp", "torch")

# Default order per device type when an op does not give its own. On CUDA the hand-written
# CUDA kernel goes before Triton: both are bandwidth-bound for the simple ops, and the C++
# launch path costs a few microseconds where Triton's Python launch costs tens.
DEFAULT_PREFERENCE: dict[str, tuple[str, ...]] = {
    "cuda": ("cuda", "triton", "torch"),
    "cpu": ("cpp", "torch"),
}

# For ops whose Triton kernel is the better GPU path (each op's table says why).
TRITON_FIRST: dict[str, tuple[str, ...]] = {
    "cuda": ("triton", "cuda", "torch"),
    "cpu": ("cpp", "torch"),
}

ENV_VAR = "MEMKERN_BACKEND"

_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("memkern_backend", default=None)
# Inside a backward that register_autograd runs on its forward's forced backend: an op the
# backward uses internally that has no implementation at all on that backend (the int8
# ops' dx is the weight-only product, which has no .cu kernel) takes its default instead of
# failing, since the user forced the forward's backend, not the backward's building blocks.
_in_forced_backward: contextvars.ContextVar[bool] = contextvars.ContextVar("memkern_forced_backward", default=False)


class BackendUnavailable(RuntimeError):
    """A forced backend cannot run the given inputs."""


def _check_name(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source}: unknown backend {name!r}; expected one of {', '.join(BACKENDS)}")
    return name


def forced_backend() -> str | None:
    """The backend forced by ``use_backend`` or, failing that, by ``MEMKERN_BACKEND``."""
    name = _forced.get()
    if name is not None:
        return name
    env = os.environ.get(ENV_VAR, "").strip()
    return _check_name(env, ENV_VAR) if env else None


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Force every memkern op called inside the block onto backend ``name``, and the
    backward of every op called inside it too, even when ``loss.backward()`` runs after the
    block has ended (register_autograd).

    ``None`` lifts an enclosing ``use_backend`` inside the block (``MEMKERN_BACKEND``, if
    set, then applies again).
    """
    if name is not None:
        _check_name(name, "use_backend")
    token = _forced.set(name)
    try:
        yield
    finally:
        _forced.reset(token)


def register_autograd(op, backward: Callable[..., Any], *, setup_context: Callable[..., None]) -> None:
    """``op.register_autograd(backward, setup_context=...)``, with backward run on the
    backend ``use_backend`` forced when the forward ran. The usual pattern ends the block
    before ``loss.backward()``; without this, the backward's own dispatch (a recomputation,
    a product with the dequantised weight) would silently take the default backend."""

    def setup(ctx, inputs, output):
        ctx.memkern_backend = _forced.get()
        setup_context(ctx, inputs, output)

    def run_backward(ctx, *grads):
        if ctx.memkern_backend is None:
            return backward(ctx, *grads)
        token = _in_forced_backward.set(True)
        try:
            with use_backend(ctx.memkern_backend):
                return backward(ctx, *grads)
        finally:
            _in_forced_backward.reset(token)

    op.register_autograd(run_backward, setup_context=setup)


def call(op, table: OpTable, *args: Any) -> Any:
    """Run the custom op ``op`` on ``args`` or, in a plain eager call that autograd does not
    record, its implementation table directly: the same implementation either way. Every
    public op calls its operator through here (docs/architecture.md).

    The custom op's Python dispatch (autograd wrapper, redispatch, alias checks) costs
    ~10 us a call with warm caches and ~40 us with cold ones, which is how an inference
    call finds them after a 16 MiB int8 weight has streamed through (bench/NOTES.md: 5-6%
    of a 16 x 4096 x 4096 Int8Linear call). Everything the op exists for still goes
    through it: torch.compile and tracing, fake, subclass or functorch tensors, an active
    dispatch or function mode, autocast, and calls with an input that requires grad.
    """
    if _direct_call_ok(args):
        return table(*args)
    return op(*args)


_PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)


def _direct_call_ok(args: Sequence[Any]) -> bool:
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return False
    if torch._C._len_torch_dispatch_stack() or torch._C._is_torch_function_mode_enabled():
        return False
    if _autocast.enabled():  # the op's autocast rule (memkern/_autocast.py) must run
        return False
    grad = torch.is_grad_enabled()
    for a in args:
        if isinstance(a, torch.Tensor):
            if type(a) not in _PLAIN_TENSOR_TYPES or (grad and a.requires_grad):
                return False
            if torch._C._functorch.is_functorch_wrapped_tensor(a):
                return False
    return True


def _build_reason(backend: str) -> str | None:
    """Why a backend is absent from this installation, whatever the inputs."""
    if backend in ("cpp", "cuda") and not _library.has_cpp():
        return f"memkern._C is not built ({_library.cpp_error()})"
    if backend == "cuda" and not _library.has_cuda_ext():
        return "memkern._C was built without CUDA kernels"
    if backend == "triton" and not _library.has_triton():
        return _library.triton_error()
    return None


def _device_reason(backend: str, device_type: str) -> str | None:
    """Why a backend cannot run on tensors of ``device_type``."""
    if backend == "cpp" and device_type != "cpu":
        return f"runs on CPU tensors only, got {device_type}"
    if backend == "cuda" and device_type != "cuda":
        return f"runs on CUDA tensors only, got {device_type}"
    if backend == "triton":
        if device_type == "cpu" and not _library.triton_interpret():
            return "CPU tensors need TRITON_INTERPRET=1 (Triton's interpreter)"
        if device_type not in ("cpu", "cuda"):
            return f"runs on CUDA tensors, got {device_type}"
    return None


@dataclass(frozen=True)
class Implementation:
    backend: str
    fn: Callable[..., Any]
    dtypes: frozenset[torch.dtype] | None = None
    """Dtypes of the op's primary tensor that this implementation handles (None: any)."""
    check: Callable[..., str | None] | None = None
    """Extra constraint on the arguments: returns why it cannot run, or None."""


@dataclass
class OpTable:
    """The implementations of one op and the rule that picks among them."""

    name: str
    preference: dict[str, tuple[str, ...]] = field(default_factory=lambda: dict(DEFAULT_PREFERENCE))
    impls: dict[str, Implementation] = field(default_factory=dict)
    # Unforced choices that depend only on the primary tensor's device type and dtype (no
    # implementation consulted checks the arguments), remembered: the walk through the
    # preference order cost ~18 us a call with cold caches (bench/NOTES.md).
    _choices: dict[tuple[str, torch.dtype], Implementation] = field(default_factory=dict, repr=False)

    def register(
        self,
        backend: str,
        *,
        dtypes: Sequence[torch.dtype] | None = None,
        check: Callable[..., str | None] | None = None,
    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorator: ``fn`` implements this op on ``backend``."""
        _check_name(backend, f"{self.name}.register")

        def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
            self.impls[backend] = Implementation(backend, fn, frozenset(dtypes) if dtypes is not None else None, check)
            self._choices.clear()
            return fn

        return decorate

    # -- why / why not -------------------------------------------------------------
    def reason(self, backend: str, *args: Any, **kwargs: Any) -> str | None:
        """Why ``backend`` cannot run this op on these arguments (None: it can)."""
        impl = self.impls.get(backend)
        if impl is None:
            return f"{self.name} has no {backend} implementation"
        reason = _build_reason(backend)
        if reason is not None:
            return reason
        primary = _primary_tensor(args)
        if primary is not None:
            reason = _device_reason(backend, primary.device.type)
            if reason is not None:
                return reason
            if impl.dtypes is not None and primary.dtype not in impl.dtypes:
                names = ", ".join(sorted(dtype_name(d) for d in impl.dtypes))
                return f"dtype {dtype_name(primary.dtype)} not supported (supports {names})"
        if impl.check is not None:
            return impl.check(*args, **kwargs)
        return None

    def reasons(self, *args: Any, **kwargs: Any) -> dict[str, str | None]:
        return {b: self.reason(b, *args, **kwargs) for b in BACKENDS}

    def static_reason(self, backend: str, device_type: str) -> str | None:
        """Why ``backend`` cannot run this op on ``device_type`` whatever the inputs."""
        if backend not in self.impls:
            return f"{self.name} has no {backend} implementation"
        return _build_reason(backend) or _device_reason(backend, device_type)

    def default_backend(self, device_type: str) -> str:
        """The backend an unforced call on ``device_type`` tensors uses (inputs allowing)."""
        for backend in self.preference.get(device_type, ("torch",)):
            if self.static_reason(backend, device_type) is None:
                return backend
        return "torch"

    # -- choice --------------------------------------------------------------------
    def select(self, *args: Any, **kwargs: Any) -> Implementation:
        forced = forced_backend()
        if forced is not None and forced not in self.impls and _in_forced_backward.get():
            forced = None
        if forced is not None:
            reason = self.reason(forced, *args, **kwargs)
            if reason is not None:
                details = "\n".join(f"  {b}: {r or 'available'}" for b, r in self.reasons(*args, **kwargs).items())
                raise BackendUnavailable(
                    f"memkern.{self.name}: backend {forced!r} was forced but cannot run these "
                    f"inputs: {reason}\nbackends for these inputs:\n{details}"
                )
            return self.impls[forced]
        primary = _primary_tensor(args)
        device_type = primary.device.type if primary is not None else "cpu"
        key = (device_type, primary.dtype) if primary is not None else None
        chosen = self._choices.get(key)
        if chosen is not None:
            return chosen
        consulted = []
        chosen = self.impls["torch"]
        for backend in self.preference.get(device_type, ("torch",)):
            consulted.append(self.impls.get(backend))
            if self.reason(backend, *args, **kwargs) is None:
                chosen = self.impls[backend]
                break
        if key is not None and all(impl is None or impl.check is None for impl in consulted):
            self._choices[key] = chosen
        return chosen

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.select(*args, **kwargs).fn(*args, **kwargs)


def _primary_tensor(args: Sequence[Any]) -> torch.Tensor | None:
    for a in args:
        if isinstance(a, torch.Tensor):
            return a
    return None


OPS: dict[str, OpTable] = {}


def op_table(name: str, preference: dict[str, tuple[str, ...]] | None = None) -> OpTable:
    """Create and register the table of op ``name``."""
    if name in OPS:
        raise ValueError(f"op table {name!r} already exists")
    table = OpTable(name, dict(preference or DEFAULT_PREFERENCE))
    OPS[name] = table
    return table


def explain(op: str, *args: Any, **kwargs: Any) -> dict[str, str | None]:
    """Each backend's reason for not running ``op`` on these arguments (None: it can)."""
    return OPS[op].reasons(*args, **kwargs)
