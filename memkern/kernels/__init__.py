"""Triton kernels and their launchers (no autograd, no module code).

These modules import Triton at import time, so they are imported lazily by memkern/ops
only when the Triton backend is chosen; whether Triton interprets the kernels on the CPU
(``TRITON_INTERPRET=1``) is fixed when a kernel module is first imported.
"""
