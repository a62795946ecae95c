"""`memkern demo`: distil, share, prune and quantise a small language model end to end,
measuring the memory and quality of every stage. Needs the `demo` extra (tokenizers for the
tokenizer trained on the fly, matplotlib for the plot, rich for the table):
``pip install 'memkern[demo]'``."""

import importlib.util

from memkern.demo.pipeline import DemoConfig, DemoError, DemoResult, Stage, run_demo

REQUIRES = ("tokenizers", "matplotlib", "rich")


def missing_requirements() -> list[str]:
    """The demo's packages that are not installed (checked before any work starts)."""
    return [name for name in REQUIRES if importlib.util.find_spec(name) is None]


__all__ = ["DemoConfig", "DemoError", "DemoResult", "REQUIRES", "Stage", "missing_requirements", "run_demo"]
