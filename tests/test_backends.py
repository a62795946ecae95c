"""backends.py: the one dispatch point picks, forces and explains."""

from __future__ import annotations

import pytest
import torch

import memkern
from memkern import _library, backends


@pytest.fixture
def toy_op():
    """A private op table whose implementations record which one ran."""
    table = backends.OpTable("toy_op")
    for name in backends.BACKENDS:
        table.register(
            name,
            dtypes=(torch.float32,) if name != "torch" else None,
            check=(lambda x: "rows must be even" if x.shape[0] % 2 else None) if name == "cpp" else None,
        )(lambda x, name=name: name)
    return table


def test_default_on_cpu_prefers_cpp_then_torch(toy_op):
    expected = "cpp" if _library.has_cpp() else "torch"
    assert toy_op(torch.zeros(2, 2)) == expected


def test_dtype_and_shape_constraints_fall_through_to_torch(toy_op):
    assert toy_op(torch.zeros(2, 2, dtype=torch.float16)) == "torch"
    assert toy_op(torch.zeros(3, 2)) == "torch"


def test_forcing_a_backend_that_cannot_run_lists_every_reason(toy_op):
    with memkern.use_backend("cuda"), pytest.raises(backends.BackendUnavailable) as info:
        toy_op(torch.zeros(3, 2))
    message = str(info.value)
    assert "'cuda' was forced" in message
    for name in backends.BACKENDS:
        assert f"  {name}: " in message
    assert "CUDA tensors only" in message or "built" in message
    if _library.has_cpp():
        assert "cpp: rows must be even" in message
    assert "torch: available" in message


def test_context_manager_beats_environment_and_restores(toy_op, monkeypatch):
    monkeypatch.setenv("MEMKERN_BACKEND", "torch")
    assert toy_op(torch.zeros(2, 2)) == "torch"
    if _library.has_cpp():
        with memkern.use_backend("cpp"):
            assert toy_op(torch.zeros(2, 2)) == "cpp"
            with memkern.use_backend(None):
                assert toy_op(torch.zeros(2, 2)) == "torch"  # env applies again
    assert toy_op(torch.zeros(2, 2)) == "torch"


def test_unknown_backend_names_are_rejected(monkeypatch):
    with pytest.raises(ValueError, match="unknown backend 'cudnn'.*triton, cuda, cpp, torch"):
        with memkern.use_backend("cudnn"):
            pass
    monkeypatch.setenv("MEMKERN_BACKEND", "tpu")
    with pytest.raises(ValueError, match="MEMKERN_BACKEND: unknown backend 'tpu'"):
        memkern.ops.quantize_rowwise(torch.zeros(1, 1))


def test_triton_on_cpu_needs_the_interpreter(toy_op, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    reason = toy_op.reason("triton", torch.zeros(2, 2))
    assert reason is not None and ("TRITON_INTERPRET=1" in reason or "triton" in reason)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if _library.has_triton():
        assert toy_op.reason("triton", torch.zeros(2, 2)) is None
        with memkern.use_backend("triton"):
            assert toy_op(torch.zeros(2, 2)) == "triton"


def test_every_public_op_has_a_torch_fallback_and_a_table():
    assert "quantize_rowwise" in backends.OPS
    for name, table in backends.OPS.items():
        assert "torch" in table.impls, f"{name} has no reference fallback"
        assert table.default_backend("cpu") in ("cpp", "torch")


def test_explain_reports_per_backend():
    reasons = backends.explain("quantize_rowwise", torch.zeros(2, 2, dtype=torch.float64))
    assert set(reasons) == set(backends.BACKENDS)
    assert reasons["torch"] is None
    if _library.has_cpp():
        assert "float64" in reasons["cpp"]


@pytest.fixture
def dispatches(monkeypatch):
    """(op table, forced backend) of every backend choice made while the test runs."""
    seen = []
    select = backends.OpTable.select

    def spy(self, *args, **kwargs):
        seen.append((self.name, backends.forced_backend()))
        return select(self, *args, **kwargs)

    monkeypatch.setattr(backends.OpTable, "select", spy)
    return seen


def _int8_layer_loss():
    layer = memkern.nn.Int8Linear.from_linear(torch.nn.Linear(32, 16))
    x = torch.randn(5, 32, requires_grad=True)
    return layer(x).square().sum(), x


def _linear_kd_none_loss():
    hs = torch.randn(6, 8, requires_grad=True)
    loss = memkern.ops.linear_kd_loss(
        hs, torch.randn(40, 8), torch.randn(6, 4), torch.randn(40, 4), torch.randint(0, 40, (6,)), reduction="none"
    )
    return loss.sum(), hs


def _masked_matmul_loss():
    w = torch.randn(32, 32)
    weight = memkern.ops.BlockSparseWeight.from_dense(w, memkern.prune.masks(w, 0.5, "block", block=(16, 16)), (16, 16))
    x = torch.randn(8, 32, requires_grad=True)
    return memkern.ops.masked_matmul(x, weight).sum(), x


@pytest.mark.parametrize(
    "make, backward_op",
    [
        (_int8_layer_loss, "int8_weight_only_linear"),
        (_linear_kd_none_loss, "linear_kd_loss"),
        (_masked_matmul_loss, "block_sparse_matmul_backward"),
    ],
    ids=["int8_linear", "linear_kd_loss-none", "masked_matmul"],
)
def test_backward_runs_on_the_backend_its_forward_was_forced_onto(make, backward_op, dispatches):
    with memkern.use_backend("torch"):
        loss, leaf = make()
    forward = list(dispatches)
    assert forward and all(forced == "torch" for _, forced in forward)
    loss.backward()  # after the block, as training loops do
    backward = dispatches[len(forward) :]
    assert (backward_op, "torch") in backward, backward
    assert all(forced == "torch" for _, forced in backward), backward
    assert leaf.grad is not None and torch.isfinite(leaf.grad).all()
    assert backends.forced_backend() is None  # nothing leaks out of backward

    # not forced at forward time: backward chooses as usual
    dispatches.clear()
    loss, _ = make()
    loss.backward()
    assert dispatches and all(forced is None for _, forced in dispatches), dispatches


# -- backends.call: eager calls that autograd does not record skip the custom op ---------
def _custom_ops_entered(fn) -> set[str]:
    """The memkern custom ops (not kernels) that the dispatcher ran during fn()."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    public = {
        "memkern::int8_linear",
        "memkern::int8_linear_packed",
        "memkern::int8_weight_only_linear",
        "memkern::fp16_linear",
    }
    return {e.key for e in prof.key_averages()} & public


def _lowp_inputs(requires_grad: bool = False):
    x = torch.randn(3, 8, requires_grad=requires_grad)
    w_q, w_scale = memkern.ops.quantize_rowwise(torch.randn(4, 8))
    return x, w_q, w_scale, torch.randn(4)


def test_call_skips_the_custom_op_without_autograd():
    x, w_q, w_scale, bias = _lowp_inputs()
    ref = memkern.ops.lowp._int8_linear_op(x, w_q, w_scale, bias, None)
    assert _custom_ops_entered(lambda: memkern.ops.int8_linear(x, w_q, w_scale, bias)) == set()
    assert torch.equal(memkern.ops.int8_linear(x, w_q, w_scale, bias), ref)
    with torch.no_grad():
        layer = memkern.nn.Int8Linear.from_linear(torch.nn.Linear(8, 4))
        assert _custom_ops_entered(lambda: layer(x)) == set()


def test_call_goes_through_the_custom_op_when_autograd_records_it():
    x, w_q, w_scale, bias = _lowp_inputs(requires_grad=True)
    assert _custom_ops_entered(lambda: memkern.ops.int8_linear(x, w_q, w_scale, bias)) == {"memkern::int8_linear"}
    layer = memkern.nn.Int8Linear.from_linear(torch.nn.Linear(8, 4))  # bias: a parameter that requires grad
    expected = "memkern::int8_linear_packed" if layer.weight_packed else "memkern::int8_linear"
    assert _custom_ops_entered(lambda: layer(x.detach())) == {expected}
    with torch.no_grad():
        assert _custom_ops_entered(lambda: memkern.ops.fp16_linear(x, w_q.half(), bias)) == set()


def test_call_goes_through_the_custom_op_for_fake_tensors_and_modes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    x, w_q, w_scale, bias = _lowp_inputs()
    with FakeTensorMode() as mode:
        fx, fw, fs = mode.from_tensor(x), mode.from_tensor(w_q), mode.from_tensor(w_scale)
        out = memkern.ops.int8_linear(fx, fw, fs)  # no kernel can run on fake tensors: the op's fake does
        assert out.shape == (3, 4) and out.dtype == torch.float32
    with torch.device("cpu"):  # a torch function mode
        assert _custom_ops_entered(lambda: memkern.ops.int8_linear(x, w_q, w_scale, bias)) == {"memkern::int8_linear"}


def test_remembered_choices_respect_argument_checks_and_new_registrations(toy_op):
    if not _library.has_cpp():
        pytest.skip("needs the C++ build for the cpp choice")
    assert toy_op(torch.zeros(2, 2)) == "cpp"
    assert toy_op(torch.zeros(3, 2)) == "torch"  # cpp's check rejects odd rows: never remembered
    assert toy_op(torch.zeros(2, 2)) == "cpp"
    plain = backends.OpTable("plain_op")
    plain.register("torch")(lambda x: "torch")
    assert plain(torch.zeros(2)) == "torch"
    plain.register("cpp", dtypes=(torch.float32,))(lambda x: "cpp")  # a new implementation: chosen from now on
    assert plain(torch.zeros(2)) == "cpp"
    assert plain(torch.zeros(2, dtype=torch.float64)) == "torch"
    with memkern.use_backend("torch"):
        assert plain(torch.zeros(2)) == "torch"


def test_forced_backward_uses_the_default_for_inner_ops_lacking_that_backend():
    # The forward is forced onto "cpp"; its backward uses an inner op that has no cpp
    # implementation at all (as int8_linear's dx uses the weight-only op, which has no .cu
    # kernel). The backward must run, the inner op on its default; called directly under
    # the same forcing, the inner op still refuses.
    outer = backends.op_table("test_forced_outer")
    inner = backends.op_table("test_forced_inner")
    ran = []
    try:
        outer.register("torch")(lambda x: x * 3)
        outer.register("cpp")(lambda x: x * 3)
        inner.register("torch")(lambda g: (ran.append("inner torch"), g * 3)[1])

        @torch.library.custom_op("memkern_test::forced_outer", mutates_args=())
        def outer_op(x: torch.Tensor) -> torch.Tensor:
            return outer(x)

        outer_op.register_fake(lambda x: torch.empty_like(x))
        backends.register_autograd(outer_op, lambda ctx, g: inner(g), setup_context=lambda ctx, i, o: None)

        x = torch.randn(5, requires_grad=True)
        with memkern.use_backend("cpp"):
            y = outer_op(x)
            with pytest.raises(backends.BackendUnavailable, match="has no cpp implementation"):
                inner(x.detach())
        y.sum().backward()
        assert ran == ["inner torch"]
        torch.testing.assert_close(x.grad, torch.full_like(x, 3.0))
    finally:
        backends.OPS.pop("test_forced_outer", None)
        backends.OPS.pop("test_forced_inner", None)
