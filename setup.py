"""Build memkern._C: the C++ CPU kernels always, the CUDA kernels when a CUDA build of
torch and nvcc are both present (MEMKERN_BUILD_CUDA=0|1 overrides the detection)."""

import glob
import os
import shutil

from setuptools import setup
from torch.utils import cpp_extension

HERE = os.path.dirname(os.path.abspath(__file__))


def _load_cuda_toolkit_finder():
    # By path: at build time the memkern package is not importable.
    import importlib.util

    spec = importlib.util.spec_from_file_location("cuda_toolkit", os.path.join(HERE, "tools", "cuda_toolkit.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cuda_toolkit() -> str | None:
    """The CUDA toolkit to build with, or None for a CPU-only build. Forced on
    (MEMKERN_BUILD_CUDA=1), a missing toolkit is an error; detected, a CUDA build of torch
    and a toolkit are both needed."""
    forced = os.environ.get("MEMKERN_BUILD_CUDA")
    if forced is not None and forced not in ("0", "1"):
        raise SystemExit(f"MEMKERN_BUILD_CUDA must be 0 or 1, got {forced!r}")
    if forced == "0":
        return None
    import torch

    if forced is None and (
        torch.version.cuda is None or shutil.which("nvcc") is None and not os.environ.get("CUDA_HOME")
    ):
        return None
    finder = _load_cuda_toolkit_finder()
    try:
        return finder.find()
    except finder.ToolkitNotFound as exc:
        if forced == "1":
            raise SystemExit(f"MEMKERN_BUILD_CUDA=1: {exc}") from None
        print(f"memkern: building without CUDA kernels: {exc}")
        return None


def _sources(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))


def _extension():
    # -march=native lets the compiler use the build machine's vector units (AVX-512 on
    # the CI machine); MEMKERN_MARCH="" turns it off for a portable wheel.
    march = os.environ.get("MEMKERN_MARCH", "native")
    cxx = ["-O3", "-std=c++17", "-fopenmp", "-fno-math-errno"]
    if march:
        cxx.append(f"-march={march}")
    sources = ["csrc/memkern.cpp", *_sources("csrc/cpu/*.cpp")]
    include_dirs = [os.path.join(HERE, "csrc")]
    toolkit = _cuda_toolkit()
    if toolkit is not None:
        # torch's own guess (the folder above the first nvcc on PATH) fails for a wrapper nvcc.
        os.environ["CUDA_HOME"] = toolkit
        cpp_extension.CUDA_HOME = toolkit
        print(f"memkern: CUDA toolkit {toolkit}")
        sources += _sources("csrc/cuda/*.cpp") + _sources("csrc/cuda/*.cu")
        archs = os.environ.get("MEMKERN_CUDA_ARCHS", "80;90")
        nvcc = ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo"]
        for arch in archs.split(";"):
            nvcc += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
        return cpp_extension.CUDAExtension(
            "memkern._C",
            sources,
            include_dirs=include_dirs,
            define_macros=[("MEMKERN_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            extra_link_args=["-fopenmp"],
        )
    return cpp_extension.CppExtension(
        "memkern._C",
        sources,
        include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx},
        extra_link_args=["-fopenmp"],
    )


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
