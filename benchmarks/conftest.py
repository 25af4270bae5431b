"""pytest-benchmark suite setup (``pytest benchmarks/ --benchmark-only``).

The Triton interpreter goes on before anything imports triton: gem_kernels imports its kernel
modules on import even though this suite times only the CPU (non-Triton) paths.
"""
import os

os.environ["TRITON_INTERPRET"] = "1"
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
