"""Every benchmark case, by op. A new op family adds its module's ``cases`` here."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from memkern.benchmarks import decode, int4, kd, lowp, quantize, sparse, sparse_int8
from memkern.benchmarks.harness import Case

FAMILIES: dict[str, Callable[[bool], list[Case]]] = {
    "quantize_rowwise": quantize.cases,
    "masked_matmul": sparse.cases,
    "kd_loss": kd.kd_cases,
    "linear_kd_loss": kd.linear_kd_cases,
    "int8_linear": lowp.int8_linear_cases,
    "int8_weight_only_linear": lowp.int8_weight_only_linear_cases,
    "fp16_linear": lowp.fp16_linear_cases,
    "int4_weight_only_linear": int4.cases,
    "sparse_int8_linear": sparse_int8.cases,
    "decode_linear": decode.cases,
}


def all_cases(*, quick: bool, ops: Iterable[str] | None = None, device: str | None = None) -> list[Case]:
    selected = list(FAMILIES) if ops is None else list(ops)
    unknown = [o for o in selected if o not in FAMILIES]
    if unknown:
        raise ValueError(f"unknown op(s) {', '.join(unknown)}; benchmarks exist for {', '.join(FAMILIES)}")
    cases = [c for op in selected for c in FAMILIES[op](quick)]
    return [c for c in cases if device is None or device in c.devices]


def find(case_id: str, *, quick: bool) -> Case:
    for case in all_cases(quick=quick):
        if case.id == case_id:
            return case
    raise KeyError(f"no benchmark case {case_id!r} (quick={quick})")
