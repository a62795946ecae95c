"""The development tools in tools/: the CUDA toolkit setup.py builds against is found
through a wrapper nvcc; the Triton ahead-of-time compiler refuses releases it was not
checked with."""

from __future__ import annotations

import os
import pathlib
import shutil

import pytest

from memkern import _library
from tools import cuda_toolkit

NVCC = shutil.which("nvcc")
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc is not installed")


@needs_nvcc
def test_a_wrapper_nvcc_leads_to_the_real_toolkit(tmp_path):
    # torch's own guess is the folder above the nvcc on PATH: here tmp_path, which holds no
    # toolkit. The finder must follow the wrapper to the toolkit nvcc runs from.
    real = cuda_toolkit.nvcc_top(NVCC)
    assert real and cuda_toolkit.is_toolkit(real)
    wrapper = tmp_path / "bin" / "nvcc"
    wrapper.parent.mkdir()
    wrapper.write_text(f'#!/bin/sh\nexec "{os.path.join(real, "bin", "nvcc")}" "$@"\n')
    wrapper.chmod(0o755)
    found = cuda_toolkit.find({"PATH": str(wrapper.parent)})
    assert found == real != str(tmp_path)
    assert (pathlib.Path(found) / "include" / "cuda_runtime.h").is_file()


def test_an_explicit_cuda_home_must_be_a_toolkit(tmp_path):
    with pytest.raises(cuda_toolkit.ToolkitNotFound, match=f"CUDA_HOME={tmp_path} is not a CUDA toolkit"):
        cuda_toolkit.find({"CUDA_HOME": str(tmp_path), "PATH": ""})


def test_no_nvcc_and_no_toolkit_says_what_was_tried(tmp_path, monkeypatch):
    monkeypatch.setattr(cuda_toolkit, "is_toolkit", lambda path: False)
    with pytest.raises(cuda_toolkit.ToolkitNotFound, match="set CUDA_HOME"):
        cuda_toolkit.find({"PATH": str(tmp_path)})


@pytest.mark.skipif(not _library.has_triton(), reason="Triton is not installed")
@pytest.mark.parametrize("version", ["3.5.1", "3.10.0", "4.0.0"])
def test_triton_aot_refuses_releases_outside_the_checked_range(version, monkeypatch):
    from tools import triton_aot

    monkeypatch.setattr(_library, "triton_version", lambda: version)
    reason = triton_aot.unavailable()
    assert reason is not None and f"Triton {version} is outside" in reason
