"""pytest-benchmark suite setup (``pytest benchmarks/ --benchmark-only``).

The Triton interpreter goes on before anything imports triton: gem_kernels imports its kernel
modules on import even though this suite times only the CPU (non-Triton) paths.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import torch  # noqa: E402

# One intra-op thread, as python -m benchmarks uses on CPU: on a shared machine, more threads than
# free cores turn every parallel op's barrier into scheduler noise.
torch.set_num_threads(1)
