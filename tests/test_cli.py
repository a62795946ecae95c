"""`memkern info` and `memkern bench` answer truthfully; bad settings end in one line."""

from __future__ import annotations

import csv
import os
import subprocess
import sys

import pytest

import memkern.demo
from memkern import _library, cli
from memkern.benchmarks import harness


def _memkern(*args: str, module: str = "memkern.cli", env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        timeout=600,
        env=None if env is None else {**os.environ, **env},
    )


def test_info_lists_builds_and_backends():
    out = _memkern("info")
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "torch" in text and "triton" in text
    assert ("C++ ext   built" in text) == _library.has_cpp()
    assert "CUDA ext  not built" in text or _library.has_cuda_ext()
    row = next(line for line in text.splitlines() if line.startswith("quantize_rowwise"))
    assert row.split()[1] == ("cpp" if _library.has_cpp() else "torch")


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


def test_python_dash_m_memkern_is_the_memkern_command():
    out = _memkern("info", module="memkern")
    assert out.returncode == 0, out.stderr
    assert ("C++ ext   built" in out.stdout) == _library.has_cpp()
    assert next(line for line in out.stdout.splitlines() if line.startswith("quantize_rowwise"))
    usage = _memkern("--help", module="memkern")
    assert usage.returncode == 0 and usage.stdout.startswith("usage: memkern ")


def _one_line(text: str) -> str:
    assert "Traceback" not in text
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    return lines[0]


def test_an_unknown_memkern_backend_is_one_line():
    out = _memkern("info", env={"MEMKERN_BACKEND": "bogus"})
    assert out.returncode == 2 and out.stdout == ""
    line = _one_line(out.stderr)
    assert line.startswith("memkern info: error: MEMKERN_BACKEND") and "'bogus'" in line and "cpp" in line


def _unwritable_csv_paths(tmp_path) -> list[str]:
    paths = [str(tmp_path / "missing" / "x.csv"), str(tmp_path)]
    return paths + (["/proc/x.csv"] if os.path.isdir("/proc") else [])


def test_bench_checks_its_csv_before_running_anything(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(harness, "run", lambda *a, **k: pytest.fail("the benchmarks ran"))
    for path in _unwritable_csv_paths(tmp_path):
        assert cli.main(["bench", "--quick", "--ops", "quantize_rowwise", "--csv", path]) == 2
        line = _one_line(capsys.readouterr().err)
        assert line.startswith(f"memkern bench: --csv {path!r} cannot be written: ")
    assert sorted(os.listdir(tmp_path)) == []  # nothing was made
    out = _memkern("bench", "--quick", "--csv", _unwritable_csv_paths(tmp_path)[-1])
    assert out.returncode == 2 and "cannot be written" in _one_line(out.stderr)


def test_demo_checks_its_out_folder_before_running(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(memkern.demo, "run_demo", lambda *a, **k: pytest.fail("the demo ran"))
    existing = tmp_path / "results.txt"
    existing.write_text("keep me")
    for path, reason in ((existing, "it exists and is not a folder"), (existing / "sub", "is not a folder")):
        assert cli.main(["demo", "--quick", "--out", str(path)]) == 2
        line = _one_line(capsys.readouterr().err)
        assert line.startswith(f"memkern demo: error: --out {str(path)!r} cannot be written") and reason in line
    assert existing.read_text() == "keep me"
    out = _memkern("demo", "--quick", "--out", str(existing))
    assert out.returncode == 2 and "not a folder" in _one_line(out.stderr)
    assert "corpus" not in out.stdout  # the demo's first log line never came


def test_output_paths_that_will_do_pass_the_check_and_nothing_is_made(tmp_path):
    (tmp_path / "old.csv").write_text("a,b\n")
    assert cli._cannot_write(str(tmp_path / "old.csv"), "file") is None
    assert cli._cannot_write(str(tmp_path / "new.csv"), "file") is None
    assert cli._cannot_write(str(tmp_path), "folder") is None
    assert cli._cannot_write(str(tmp_path / "a" / "b"), "folder") is None  # made by the demo at the end
    assert sorted(os.listdir(tmp_path)) == ["old.csv"] and (tmp_path / "old.csv").read_text() == "a,b\n"


def test_demo_without_its_extra_stops_before_any_work(monkeypatch, capsys):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real_find_spec(name, *a)
    )
    monkeypatch.setattr(memkern.demo, "run_demo", lambda *a, **k: pytest.fail("the demo ran"))
    assert cli.main(["demo", "--quick"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs matplotlib" in err and "memkern[demo]" in err


def test_import_memkern_needs_none_of_the_demo_packages():
    # Every op imports and runs with the demo's packages blocked.
    code = (
        "import sys\n"
        "for name in ('rich', 'matplotlib', 'tokenizers'): sys.modules[name] = None\n"
        "import torch, memkern\n"
        "q, s = memkern.ops.quantize_rowwise(torch.randn(4, 8))\n"
        "print(q.dtype)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "torch.int8", out.stderr
