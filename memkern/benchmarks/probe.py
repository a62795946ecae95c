"""Subprocess entry of the CPU peak-memory probe: one provider of one case in a fresh
process, so no other provider's memory can hide or inflate its peak.

    python -m memkern.benchmarks.probe CASE_ID PROVIDER QUICK(0|1)   -> {"peak_bytes": N}
"""

from __future__ import annotations

import json
import sys

import torch

from memkern import measure
from memkern.benchmarks import registry


def main(argv: list[str]) -> None:
    """Subprocess entry: print the peak memory of one provider of one case as JSON."""
    case_id, provider_name, quick = argv[0], argv[1], argv[2] == "1"
    measure.pin_malloc_thresholds()
    case = registry.find(case_id, quick=quick)
    torch.manual_seed(0)
    inputs = case.make_inputs(torch.device("cpu"))
    fn = case.provider(provider_name).build(inputs)
    print(json.dumps({"peak_bytes": measure.peak_rss_above_inputs(fn)}))


if __name__ == "__main__":
    main(sys.argv[1:])
