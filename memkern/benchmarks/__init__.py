"""Benchmark cases and the harness that measures them.

Cases live in the package (one module per op family, collected in ``registry``) so that
``memkern bench`` and ``pytest bench/ --benchmark-only`` run the very same definitions.
"""
