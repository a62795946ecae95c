"""bench/device_check.sh keeps to its one deadline and brings back few files.

On this CPU-only machine its GPU stages skip themselves; the deadline logic is what is
checked: with too little time left every stage is skipped, none is started."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "device_check.sh"


def _run(tmp_path, deadline_s: int) -> tuple[subprocess.CompletedProcess, float]:
    env = {**os.environ, "OUT": str(tmp_path), "DEADLINE_S": str(deadline_s), "PYTHON": sys.executable}
    start = time.monotonic()
    proc = subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    return proc, time.monotonic() - start


def test_no_stage_starts_past_the_deadline(tmp_path):
    proc, took = _run(tmp_path, deadline_s=1)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = (tmp_path / "summary.txt").read_text()
    for stage in (
        "build",
        "linear_kd_loss 8192x4096x128256",
        "int8_linear vs cuBLAS fp16",
        "gpu tests",
        "kd_loss and quantize_rowwise",
    ):
        assert f"{stage}: skipped" in summary, summary
    assert "gpu tests: ok" not in summary
    assert took < 60
    # at most 8 result files come back from the GPU machine, no folders
    files = list(tmp_path.iterdir())
    assert len(files) <= 8 and all(f.is_file() for f in files)
