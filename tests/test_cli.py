"""`memkern info` and `memkern bench` answer truthfully."""
from __future__ import annotations

import csv
import subprocess
import sys

from memkern import _library


def _memkern(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "memkern.cli", *args], capture_output=True, text=True, timeout=600)


def test_info_lists_builds_and_backends():
    out = _memkern("info")
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "torch" in text and "triton" in text
    assert ("C++ ext   built" in text) == _library.has_cpp()
    assert "CUDA ext  not built" in text or _library.has_cuda_ext()
    line = next(l for l in text.splitlines() if l.startswith("quantize_rowwise"))
    assert line.split()[1] == ("cpp" if _library.has_cpp() else "torch")


def test_bench_quick_writes_rows_for_each_provider(tmp_path):
    path = tmp_path / "out.csv"
    out = _memkern("bench", "--quick", "--ops", "quantize_rowwise", "--csv", str(path))
    assert out.returncode == 0, out.stderr
    assert "speedup" in out.stdout and "memkern" in out.stdout
    rows = list(csv.DictReader(open(path)))
    assert {(r["provider"], r["metric"]) for r in rows} == {
        (p, m) for p in ("memkern", "torch eager") for m in ("time_ms", "peak_mib", "gb_per_s")
    }  # quantize_rowwise moves bytes and computes no products: a GB/s rate, no TFLOP/s
    assert all(float(r["median"]) > 0 for r in rows)


def test_bench_rejects_unknown_ops_and_missing_cuda():
    out = _memkern("bench", "--ops", "nope")
    assert out.returncode == 2 and "unknown op" in out.stderr
    import torch

    if not torch.cuda.is_available():
        out = _memkern("bench", "--device", "cuda")
        assert out.returncode == 2 and "no CUDA device" in out.stderr
