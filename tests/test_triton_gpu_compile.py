"""Every Triton kernel memkern launches compiles for sm_80 and sm_90, with no GPU.

The interpreter tests (TRITON_INTERPRET=1) prove the kernels' arithmetic but never compile
them. Here each launcher runs on fake CUDA tensors with its kernels replaced by recorders,
so it picks its GPU tiles, flags and launch options; every distinct launch is compiled
ahead of time with Triton's NVIDIA backend and its bundled ptxas
(tools/triton_aot.py), and must fit the target's shared memory and not spill
registers. No GPU is used or needed; the compiler runs in a separate process with the
interpreter off, so the file also runs under the suite's TRITON_INTERPRET=1.
"""

from __future__ import annotations

import importlib

import pytest

from memkern import _library

if not _library.has_triton():
    pytest.skip(f"Triton is not available: {_library.triton_error()}", allow_module_level=True)

from tools import triton_aot as _aot  # noqa: E402  (imports Triton)

_reason = _aot.unavailable()
if _reason is not None:
    pytest.skip(f"cannot compile for NVIDIA targets here: {_reason}", allow_module_level=True)

VARIANTS = _aot.capture()

# Register spills ptxas reported at the launchers' GPU configurations (Triton 3.9.0, ptxas
# 12.9 for sm_80 and 13.4 for sm_90): the most spill stores / loads, in bytes per thread, a
# launch may have. Each is a kernel whose tiles, warps or fp32 products want retuning on
# that target; the fp32 products (input_precision="ieee") run on the FMA units, whose
# operand tiles live in registers. A budget, not an expected failure: Triton releases
# allocate registers differently (Triton 3.6 spilled less in some of these and more in the
# bf16 128 x 128 weight-gradient kernel), so each budget is the most any release from
# tools/triton_aot.py's SUPPORTED_TRITON spilled; every other launch must not spill at all.
SPILLS = {
    # the masked-logit rules (0 log 0 = 0, +inf divergences) took 12 and 8 bytes more
    (80, "_linear_kd_grad_kernel(linear_kd_grad-fp16-rkl-bias)"): (80, 80),
    (80, "_linear_kd_grad_kernel(linear_kd_grad-bf16-jsd-row_scale)"): (124, 124),
    (80, "_block_sparse_fwd_kernel(block_sparse-fp32-64x64)"): (164, 164),
    (80, "_block_sparse_dx_kernel(block_sparse-fp32-64x64)"): (6348, 8176),
    (80, "_block_sparse_dw_kernel(block_sparse-bf16-128x128)"): (24, 12),  # Triton 3.9: 8/4; 3.6: 24/12
    # The int4 GEMM's float32 path (64 x 64 x 32 tiles, dequantised on the FMA units), as
    # Triton 3.9.0 compiled it (the only release measured for it); its halves run on
    # tensor cores with no spill.
    (80, "_int4_gemm_kernel(int4_linear-fp32-M64-g128-bias)"): (4112, 5372),
    (90, "_int4_gemm_kernel(int4_linear-fp32-M64-g128-bias)"): (452, 408),
    # The bitmask product's float32 path (64 x 64 outputs, 32-column steps on the FMA units),
    # as Triton 3.9.0 compiled it (the only release measured for it): 255 registers and 4
    # bytes of spill on sm_80, none on sm_90; its halves run on tensor cores with no spill.
    (80, "_bitmask_matmul_kernel(bitmask-fp32)"): (4, 4),
}


# The launches whose products should run on Hopper's wgmma (sm_90): every bf16/fp16 and
# int8 tensor-core product at its GPU tiles. fp32 products ("ieee") and the mixed-half GEMM
# (bf16 x, fp16 weight, widened to fp32) run on the FMA units; the row kernels have no
# product. A kernel that falls back to mma.sync on sm_90 is on Hopper's slower path.
WGMMA_ON_SM90 = {
    "_int8_gemm_kernel(int8_linear-fp32-M64)",
    "_int8_gemm_kernel(int8_linear-fp16-M1)",
    "_int8_gemm_kernel(int8_linear-bf16-M64-bias)",
    "_int8_gemm_kernel(int8_linear-fp16-M64-longK)",
    "_scaled_gemm_kernel(scaled_linear-xfp16-wint8-M64-bias)",
    "_scaled_gemm_kernel(scaled_linear-xbf16-wint8-M64)",
    "_scaled_gemm_kernel(scaled_linear-xbf16-wbf16-M64)",
    "_linear_kd_stats_kernel(linear_kd_grad-fp16-rkl-bias)",
    "_linear_kd_grad_kernel(linear_kd_grad-fp16-rkl-bias)",
    "_linear_kd_stats_kernel(linear_kd_grad-bf16-jsd-row_scale)",
    "_linear_kd_grad_kernel(linear_kd_grad-bf16-jsd-row_scale)",
    "_linear_kd_stats_kernel(linear_kd_stats-bf16-fkl-forward)",
    "_block_sparse_fwd_kernel(block_sparse-fp16-64x64-bias)",
    "_block_sparse_dx_kernel(block_sparse-fp16-64x64-bias)",
    "_block_sparse_dw_kernel(block_sparse-fp16-64x64-bias)",
    "_block_sparse_fwd_kernel(block_sparse-bf16-128x128)",
    "_block_sparse_dx_kernel(block_sparse-bf16-128x128)",
    "_block_sparse_dw_kernel(block_sparse-bf16-128x128)",
    "_sparse24_fwd_kernel(sparse24-fp16)",
    "_sparse24_fwd_kernel(sparse24-bf16-bias)",
    "_int4_gemm_kernel(int4_linear-fp16-M64-g128)",
    "_int4_gemm_kernel(int4_linear-bf16-M64-g32)",
    "_bitmask_matmul_kernel(bitmask-fp16-bias)",
    "_bitmask_matmul_kernel(bitmask-bf16)",
}


def _cases() -> list:
    return [
        pytest.param(capability, v.id, id=f"sm_{capability}-{v.id}")
        for v in VARIANTS
        for capability in _aot.CAPABILITIES
    ]


@pytest.fixture(scope="module")
def compiled() -> dict:
    """(capability, variant id) -> the compile result (one process compiles them all)."""
    return {(r["capability"], r["id"]): r for r in _aot.compile_isolated(VARIANTS)}


def _result(compiled, capability, variant_id) -> dict:
    r = compiled[capability, variant_id]
    assert "error" not in r, f"{variant_id} does not compile for sm_{capability}:\n{r['error']}"
    return r


def test_every_kernel_is_captured():
    launched = {(v.module, v.kernel) for v in VARIANTS}
    defined = {(m, name) for m in _aot.KERNEL_MODULES for name in _aot.kernel_names(importlib.import_module(m))}
    assert defined - launched == set(), "kernels that no launcher call in tools/triton_aot.py launches"


def test_spill_marks_name_captured_variants():
    ids = {v.id for v in VARIANTS}
    assert {variant_id for _, variant_id in SPILLS} - ids == set(), "SPILLS names variants that are not captured"
    assert WGMMA_ON_SM90 - ids == set(), "WGMMA_ON_SM90 names variants that are not captured"


@pytest.mark.parametrize("variant_id", [v.id for v in VARIANTS])
def test_tensor_core_products_use_wgmma_on_sm90(compiled, variant_id):
    r = _result(compiled, 90, variant_id)
    want = "wgmma" if variant_id in WGMMA_ON_SM90 else ""
    assert r["matrix_instruction"] == want, (
        f"{variant_id} on sm_90: {r['matrix_instruction'] or 'no matrix instruction'}"
    )


def test_capture_restores_the_kernels():
    from memkern.kernels import kd

    before = kd._kd_rows_kernel, _library.triton_interpret
    _aot.capture([_aot.cases()[0][0]])
    assert (kd._kd_rows_kernel, _library.triton_interpret) == before


@pytest.mark.parametrize(("capability", "variant_id"), _cases())
def test_compiles_within_shared_memory(compiled, capability, variant_id):
    r = _result(compiled, capability, variant_id)
    limit = _aot.SHARED_LIMIT[capability]
    assert r["shared"] <= limit, f"{r['shared']} bytes of shared memory > {limit} on sm_{capability}"


@pytest.mark.parametrize(("capability", "variant_id"), _cases())
def test_no_register_spills_beyond_the_recorded_budget(compiled, capability, variant_id):
    r = _result(compiled, capability, variant_id)
    stores, loads = SPILLS.get((capability, variant_id), (0, 0))
    assert r["spill_stores"] <= stores and r["spill_loads"] <= loads, (
        f"sm_{capability}: {r['registers']} registers, {r['spill_stores']}/{r['spill_loads']} bytes of spill "
        f"stores/loads per thread; at most {stores}/{loads} allowed"
    )
