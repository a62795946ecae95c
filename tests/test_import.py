"""`import memkern` works without the compiled extension and without Triton, warns once,
and never initialises CUDA (checked in fresh interpreters)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

BLOCKER = textwrap.dedent(
    """
    import importlib.abc, sys
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name in BLOCKED or any(name.startswith(b + ".") for b in BLOCKED):
                raise ImportError(f"{name} blocked for this test")
            return None
    sys.meta_path.insert(0, Block())
    """
)


def _run(code: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_import_without_extension_or_triton_warns_once_and_falls_back():
    code = (
        "BLOCKED = ('memkern._C', 'triton')\n"
        + BLOCKER
        + textwrap.dedent(
            """
        import json, warnings
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import memkern
            import memkern.ops
        import torch
        from memkern import backends
        x = torch.randn(4, 9)
        q, s = memkern.ops.quantize_rowwise(x)
        ref_q, ref_s = memkern.reference.quantize_rowwise(x)
        print(json.dumps({
            "warnings": [str(w.message) for w in caught if "memkern" in str(w.message)],
            "backend": backends.OPS["quantize_rowwise"].select(x).backend,
            "same": bool(torch.equal(q, ref_q) and torch.equal(s, ref_s)),
            "triton_reason": backends.OPS["quantize_rowwise"].static_reason("triton", "cuda"),
            "cuda_initialized": torch.cuda.is_initialized(),
        }))
        """
        )
    )
    result = _run(code)
    assert len(result["warnings"]) == 1, result["warnings"]
    assert "memkern._C" in result["warnings"][0]
    assert result["backend"] == "torch"
    assert result["same"]
    assert "triton" in result["triton_reason"]
    assert result["cuda_initialized"] is False


def test_import_and_cpu_calls_never_initialise_cuda():
    code = textwrap.dedent(
        """
        import json, torch, memkern
        memkern.ops.quantize_rowwise(torch.randn(3, 5))
        print(json.dumps({"cuda_initialized": torch.cuda.is_initialized()}))
        """
    )
    assert _run(code) == {"cuda_initialized": False}
