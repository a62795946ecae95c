"""`memkern demo`: distil, share, prune and quantise a small language model end to end,
measuring the memory and quality of every stage."""
from memkern.demo.pipeline import DemoConfig, DemoError, DemoResult, Stage, run_demo

__all__ = ["DemoConfig", "DemoError", "DemoResult", "Stage", "run_demo"]
