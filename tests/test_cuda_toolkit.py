"""The CUDA toolkit setup.py builds against is found through a wrapper nvcc."""
from __future__ import annotations

import importlib.util
import os
import pathlib
import shutil

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("cuda_toolkit", ROOT / "tools" / "cuda_toolkit.py")
cuda_toolkit = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cuda_toolkit)

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
