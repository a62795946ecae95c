"""Build memkern._C: the C++ CPU kernels always, the CUDA kernels when a CUDA build of
torch and nvcc are both present (MEMKERN_BUILD_CUDA=0|1 overrides the detection)."""
import glob
import os
import shutil

from setuptools import setup
from torch.utils import cpp_extension

HERE = os.path.dirname(os.path.abspath(__file__))


def _want_cuda() -> bool:
    forced = os.environ.get("MEMKERN_BUILD_CUDA")
    if forced is not None:
        if forced not in ("0", "1"):
            raise SystemExit(f"MEMKERN_BUILD_CUDA must be 0 or 1, got {forced!r}")
        return forced == "1"
    import torch

    nvcc = cpp_extension.CUDA_HOME is not None or shutil.which("nvcc") is not None
    return torch.version.cuda is not None and nvcc


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
    if _want_cuda():
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
