"""Find the CUDA toolkit that memkern's CUDA kernels build against.

torch.utils.cpp_extension takes CUDA_HOME, else the folder above the first `nvcc` on PATH.
Where that `nvcc` is a wrapper script (e.g. /usr/local/bin/nvcc running
/usr/local/cuda-13.0/bin/nvcc), it guesses /usr/local, and the host files then fail with
"cuda_runtime.h: No such file or directory". Here the toolkit is the folder nvcc itself
reports as TOP in `nvcc --dryrun`, which follows any wrapper. Loaded by path from setup.py
(no package import at build time) and imported by the tests.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess


class ToolkitNotFound(RuntimeError):
    pass


def is_toolkit(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "include", "cuda_runtime.h")) and os.access(
        os.path.join(path, "bin", "nvcc"), os.X_OK
    )


def nvcc_top(nvcc: str) -> str | None:
    """The toolkit folder an nvcc executable (or a wrapper of one) compiles with."""
    try:
        out = subprocess.run(
            [nvcc, "--dryrun", "-c", "-x", "cu", os.devnull], capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(r"^#\$ TOP=(.+?)\s*$", out.stdout + out.stderr, re.MULTILINE)
    return os.path.realpath(match.group(1)) if match else None


def find(environ: dict[str, str] | None = None) -> str:
    """The toolkit's root folder (holding bin/nvcc and include/cuda_runtime.h).

    An explicit CUDA_HOME (or CUDA_PATH) is taken as it is and must be a toolkit; otherwise
    the nvcc on PATH is asked, then /usr/local/cuda is tried."""
    env = os.environ if environ is None else environ
    for var in ("CUDA_HOME", "CUDA_PATH"):
        given = env.get(var)
        if given:
            if not is_toolkit(given):
                raise ToolkitNotFound(
                    f"{var}={given} is not a CUDA toolkit: it needs bin/nvcc and include/cuda_runtime.h"
                )
            return os.path.realpath(given)
    nvcc = shutil.which("nvcc", path=env.get("PATH"))
    tried = []
    if nvcc:
        top = nvcc_top(nvcc)
        tried.append(f"{nvcc} reports {top}" if top else f"{nvcc} reports no TOP in --dryrun")
        if top and is_toolkit(top):
            return top
    if is_toolkit("/usr/local/cuda"):
        return os.path.realpath("/usr/local/cuda")
    tried.append("/usr/local/cuda is not a toolkit")
    raise ToolkitNotFound("no CUDA toolkit found (" + "; ".join(tried) + "); set CUDA_HOME to the toolkit's folder")
