"""Test setup: choose the test device, and switch the Triton interpreter on only for the CPU.

The device is CUDA when a GPU is available, else the CPU; ``GEM_TEST_DEVICE=cpu|cuda`` forces it
(tests/helpers.py ``select_device``). On the CPU the Triton kernels run in the interpreter, which
must be on before any kernel module is imported; on CUDA they are compiled, so the interpreter is
switched off explicitly (a module that only sets it by default, e.g. benchmarks.core_figures,
then leaves it off). An impossible choice (``cuda`` without a GPU) stops the run with a usage
error before anything is collected.
"""

import os

import pytest
import torch

try:
    from helpers import DEVICE as TEST_DEVICE  # noqa: E402 (helpers chooses the device on import)
    from helpers import DEVICE_VARIABLE
except (ValueError, RuntimeError) as exc:
    raise pytest.UsageError(str(exc)) from None
os.environ["TRITON_INTERPRET"] = "1" if TEST_DEVICE == "cpu" else "0"
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # silence triton 3.9's default-change warning


def pytest_report_header(config):
    interp = "Triton interpreter" if TEST_DEVICE == "cpu" else "compiled Triton kernels"
    name = torch.cuda.get_device_name() if TEST_DEVICE == "cuda" else "CPU"
    return f"gem-kernels test device: {TEST_DEVICE} ({name}, {interp}); set {DEVICE_VARIABLE}=cpu|cuda to force"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
