"""Only the C extension: everything else about the package is in pyproject.toml.

The planner's hot loops in C (fabricd/planner/native.py). Optional: where no C compiler is
found the install still succeeds, and the planner runs its numpy definitions (the same plans,
bit for bit, more slowly). -ffp-contract=off: no fused multiply-adds, which round differently
from numpy's separate operations.
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("fabricd.planner._native", sources=["fabricd/planner/_native.c"], optional=True,
                             extra_compile_args=["-O3", "-ffp-contract=off", "-fno-fast-math"])])
