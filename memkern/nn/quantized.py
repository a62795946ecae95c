"""Drop-in replacements for ``nn.Linear`` with low-precision weights.

* :class:`Int8Linear`: int8 weights and int8 activations quantised per token on the fly
  (W8A8 dynamic), :func:`memkern.ops.int8_linear`.
* :class:`Int8WeightOnlyLinear`: int8 weights, activations kept in their dtype (W8A16),
  :func:`memkern.ops.int8_weight_only_linear`.
* :class:`Fp16Linear`: float16 (or bfloat16) weights, :func:`memkern.ops.fp16_linear`.

Weights (and the float32 per-output-channel scales) are buffers: they are saved in the
``state_dict`` and moved by ``.to()``, but they are not trained. The bias stays a parameter
in its original dtype, so it can still be trained; gradients flow to the input.

Module casts (``.half()``, ``.bfloat16()``, ``.float()``, ``.double()``, ``.to(dtype)``,
``.to(device, dtype)``, ``.type(dtype)``) move the quantised storage and its scales between
devices but never change their dtypes, as bitsandbytes' and torchao's layers do: rounding a
float32 scale to float16 would shift every output. What follows the cast is the bias, and
with it the dtype the caller feeds: the output has the input's dtype. float64 input (and a
float64 bias, from ``.double()`` or a float64 ``nn.Linear``) is computed in float32, the
kernels' accumulation dtype, and returned as float64.
"""

from __future__ import annotations

import torch
from torch import nn

from memkern import ops


def check_linear(cls_name: str, linear: object) -> nn.Linear:
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"{cls_name}.from_linear: linear must be a torch.nn.Linear, got {type(linear).__name__}")
    if not linear.weight.dtype.is_floating_point:
        raise TypeError(f"{cls_name}.from_linear: linear.weight must be floating point, got {linear.weight.dtype}")
    return linear


def _check_features(cls_name: str, name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{cls_name}: {name} must be an int, got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{cls_name}: {name} must be >= 0, got {value}")


class LowPrecisionLinear(nn.Module):
    """Shared by the three layers: shape attributes, the bias, dtype-keeping casts, the
    float64 entry, repr and dequantize. Each layer defines ``dequantized_weight()``: the
    ``(out_features, in_features)`` float32 weight it computes with, and ``_linear(x,
    bias)``: its op on x of a kernel dtype (float32, float16, bfloat16)."""

    scheme: str = ""
    # Buffers whose dtype is the storage format: module casts move them, never convert them.
    _storage_buffers: tuple[str, ...] = ("weight",)

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        device=None,
        bias_dtype: torch.dtype | None = None,
    ) -> None:
        _check_features(type(self).__name__, "in_features", in_features)
        _check_features(type(self).__name__, "out_features", out_features)
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=bias_dtype or torch.float32))
        else:
            self.register_parameter("bias", None)
        self._init_storage(device)

    def _init_storage(self, device) -> None:
        """Register the storage of a fresh layer on ``device``. Layers whose storage depends
        on constructor arguments of their own register it in their ``__init__`` instead."""

    @classmethod
    def _fresh_like(cls, linear: nn.Module, device, **options):
        """A fresh layer of ``linear``'s features, with a bias of its bias's dtype if it
        has one, on ``device``; ``options`` are the layer's own constructor arguments."""
        bias_dtype = linear.bias.dtype if linear.bias is not None else None
        return cls(
            linear.in_features,
            linear.out_features,
            linear.bias is not None,
            device=device,
            bias_dtype=bias_dtype,
            **options,
        )

    def _set_bias(self, linear: nn.Linear) -> None:
        if linear.bias is not None:
            self.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=linear.bias.requires_grad)

    def _apply(self, fn, recurse=True):
        # .half(), .to(dtype), ... reach every tensor through fn. For the storage buffers,
        # fn is tried on an empty tensor of theirs first: if it would change the dtype,
        # only its device move is made (to_empty and plain moves are applied as they are).
        storage = {id(self._buffers[name]) for name in self._storage_buffers if self._buffers.get(name) is not None}

        def keep_storage_dtype(t: torch.Tensor) -> torch.Tensor:
            if id(t) not in storage:
                return fn(t)
            probe = fn(t.new_empty(0))
            if probe.dtype == t.dtype:
                return fn(t)
            if probe.device == t.device:
                return t
            return torch.empty_like(t, device=probe.device) if t.is_meta else t.to(probe.device)

        return super()._apply(keep_storage_dtype, recurse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The kernels take float32, float16 and bfloat16; float64 (input or bias) runs in
        # float32, the dtype they accumulate in anyway, and the output keeps x's dtype.
        bias = self.bias
        if bias is not None and bias.dtype == torch.float64:
            bias = bias.float()
        if x.dtype == torch.float64:
            return self._linear(x.float(), bias).double()
        return self._linear(x, bias)

    def dequantize(self, dtype: torch.dtype | None = None) -> nn.Linear:
        """An ``nn.Linear`` with this layer's (dequantised) weight, in ``dtype`` (default:
        the bias's dtype, or float32 without a bias)."""
        if dtype is None:
            dtype = self.bias.dtype if self.bias is not None else torch.float32
        weight = self.dequantized_weight()
        linear = nn.Linear(
            self.in_features, self.out_features, bias=self.bias is not None, device=weight.device, dtype=dtype
        )
        with torch.no_grad():
            linear.weight.copy_(weight)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, scheme={self.scheme}"
        )


class _Int8WeightLinear(LowPrecisionLinear):
    _storage_buffers = ("weight", "weight_scale")

    def _init_storage(self, device) -> None:
        n, k = self.out_features, self.in_features
        self.register_buffer("weight", torch.zeros(n, k, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.ones(n, dtype=torch.float32, device=device))

    @classmethod
    def from_linear(cls, linear: nn.Linear):
        """Quantise ``linear``'s weight per output channel (symmetric absmax, as
        :func:`memkern.ops.quantize_rowwise`), keep its bias. Works on the meta device."""
        linear = check_linear(cls.__name__, linear)
        weight = linear.weight.detach()
        layer = cls._fresh_like(linear, weight.device)
        w = weight if weight.dtype in (torch.float32, torch.float16, torch.bfloat16) else weight.float()
        layer.weight, layer.weight_scale = ops.quantize_rowwise(w)
        layer._set_bias(linear)
        return layer

    def int8_weight(self) -> torch.Tensor:
        """The ``(out_features, in_features)`` int8 weight."""
        return self.weight

    def dequantized_weight(self) -> torch.Tensor:
        return self.int8_weight().float() * self.weight_scale[:, None]


class Int8Linear(_Int8WeightLinear):
    """W8A8 dynamic linear layer: ``y = int8_linear(x, weight, weight_scale, bias)``.

    Buffers: ``weight`` int8, ``weight_scale`` ``(out_features,)`` float32, both kept
    through module casts (the module docstring says what follows them). Input
    ``(..., in_features)`` float32/float16/bfloat16 (float64 runs in float32); output in
    the input's dtype.

    ``weight`` is kept in the layout its device's kernel reads best: on a CPU where
    :func:`memkern.ops.int8_packed_kernel_native` holds, packed by
    :func:`memkern.ops.pack_int8_weight` (same bytes, blocked for the VNNI kernel) and run
    by :func:`memkern.ops.int8_linear_packed`; elsewhere (GPUs, meta, CPUs without VNNI)
    the plain ``(out_features, in_features)`` layout. The layout follows the module through
    ``.to()``, and ``state_dict()`` always holds the plain layout, so checkpoints load on
    any machine. :meth:`int8_weight` gives the plain weight whatever the layout.
    """

    scheme = "int8 (W8A8 dynamic: per-token int8 activations, per-channel int8 weights)"

    def _init_storage(self, device) -> None:
        super()._init_storage(device)
        self.register_state_dict_post_hook(_plain_weight_in_state_dict)
        self.register_load_state_dict_pre_hook(_state_dict_weight_in_module_layout)
        self.register_load_state_dict_post_hook(_settle_layout_after_load)
        if ops.int8_packed_kernel_native(self.weight.device):  # the zero weight, packed without a pass over it
            self.weight = self.weight.new_zeros(ops.int8_packing.packed_shape(self.out_features, self.in_features))

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        layer = super().from_linear(linear)
        layer._settle_layout()
        return layer

    @property
    def weight_packed(self) -> bool:
        """Whether ``weight`` is in the packed layout."""
        return self.weight.dim() == 4

    def int8_weight(self) -> torch.Tensor:
        """The ``(out_features, in_features)`` int8 weight (a copy when it is packed)."""
        if self.weight_packed:
            return ops.unpack_int8_weight(self.weight, self.out_features, self.in_features)
        return self.weight

    def _settle_layout(self) -> None:
        """Put ``weight`` in the layout of its device (see the class docstring)."""
        packed = ops.int8_packed_kernel_native(self.weight.device)
        if packed and not self.weight_packed:
            self.weight = ops.pack_int8_weight(self.weight)
        elif not packed and self.weight_packed:
            self.weight = self.int8_weight()

    def _apply(self, fn, recurse=True):
        # .to(), .cuda(), .cpu(), to_empty(): the weight changes device, so maybe layout.
        module = super()._apply(fn, recurse)
        self._settle_layout()
        return module

    def _linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.weight_packed:
            return ops.int8_linear_packed(x, self.weight, self.weight_scale, bias)
        return ops.int8_linear(x, self.weight, self.weight_scale, bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + (", weight_layout=packed" if self.weight_packed else "")


def _plain_weight_in_state_dict(module: Int8Linear, state_dict, prefix: str, local_metadata) -> None:
    key = prefix + "weight"
    if key in state_dict and module.weight_packed:
        state_dict[key] = module.int8_weight()


def _settle_layout_after_load(module: Int8Linear, incompatible_keys) -> None:
    module._settle_layout()


def _state_dict_weight_in_module_layout(
    module: Int8Linear, state_dict, prefix: str, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
) -> None:
    # A checkpoint holds the plain (N, K) weight; a module holding the packed layout takes
    # it packed (load_state_dict copies into, or with assign=True replaces, the buffer).
    key = prefix + "weight"
    incoming = state_dict.get(key)
    if (
        module.weight_packed
        and isinstance(incoming, torch.Tensor)
        and incoming.dim() == 2
        and incoming.dtype == torch.int8
        and tuple(incoming.shape) == (module.out_features, module.in_features)
    ):
        state_dict[key] = ops.pack_int8_weight(incoming.to(module.weight.device))


class Int8WeightOnlyLinear(_Int8WeightLinear):
    """W8A16 linear layer: ``y = int8_weight_only_linear(x, weight, weight_scale, bias)``.

    Buffers as :class:`Int8Linear`; the input keeps its dtype through the product.
    """

    scheme = "int8_weight_only (W8A16: per-channel int8 weights, activations unquantised)"

    def _linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return ops.int8_weight_only_linear(x, self.weight, self.weight_scale, bias)


class Fp16Linear(LowPrecisionLinear):
    """Linear layer with half-precision weights: ``y = fp16_linear(x, weight, bias)``.

    Buffer ``weight`` ``(out_features, in_features)`` float16 (or bfloat16), kept in that
    dtype through module casts (``.float()`` too); float32 accumulation; output in the
    input's dtype (float64 input runs in float32).
    """

    scheme = "fp16 (half-precision weights, float32 accumulation)"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        device=None,
        bias_dtype: torch.dtype | None = None,
        weight_dtype: torch.dtype = torch.float16,
    ) -> None:
        if weight_dtype not in (torch.float16, torch.bfloat16):
            raise TypeError(f"Fp16Linear: weight_dtype must be float16 or bfloat16, got {weight_dtype}")
        super().__init__(in_features, out_features, bias, device=device, bias_dtype=bias_dtype)
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=weight_dtype, device=device))

    @classmethod
    def from_linear(cls, linear: nn.Linear, weight_dtype: torch.dtype = torch.float16) -> Fp16Linear:
        """Round ``linear``'s weight to ``weight_dtype`` (float16 or bfloat16), keep its bias."""
        linear = check_linear(cls.__name__, linear)
        weight = linear.weight.detach()
        layer = cls._fresh_like(linear, weight.device, weight_dtype=weight_dtype)
        layer.weight = weight.to(weight_dtype).contiguous()
        layer._set_bias(linear)
        return layer

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight.float()

    def _linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return ops.fp16_linear(x, self.weight, bias)


QUANTIZED_LINEAR_TYPES: tuple[type[nn.Module], ...] = (Int8Linear, Int8WeightOnlyLinear, Fp16Linear)
