"""The suite's device choice (tests/helpers.py select_device, applied by tests/conftest.py): CUDA when
available, else the CPU with the Triton interpreter; GEM_TEST_DEVICE=cpu|cuda forces it, and an
impossible or unknown choice stops the run with a clear usage error instead of falling back."""

import os
import subprocess
import sys

import pytest
import torch
from helpers import DEVICE, DEVICE_VARIABLE, make_inputs, select_device

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize(
    "value,cuda,expected",
    [
        ("", False, "cpu"),
        ("", True, "cuda"),
        ("auto", False, "cpu"),
        ("auto", True, "cuda"),
        ("cpu", True, "cpu"),
        ("cpu", False, "cpu"),
        ("cuda", True, "cuda"),
        (" CUDA ", True, "cuda"),
    ],
)
def test_select_device(value, cuda, expected):
    assert select_device(value, cuda_available=cuda) == expected


def test_forcing_cuda_without_a_gpu_is_an_error():
    with pytest.raises(RuntimeError, match=r"GEM_TEST_DEVICE=cuda, but torch.cuda.is_available\(\) is False"):
        select_device("cuda", cuda_available=False)


def test_unknown_value_is_an_error():
    with pytest.raises(ValueError, match="GEM_TEST_DEVICE must be 'cpu', 'cuda' or 'auto'"):
        select_device("gpu", cuda_available=True)


def test_this_run_uses_the_chosen_device():
    """The factory's tensors are on the run's device, and the interpreter is on exactly for the CPU."""
    assert DEVICE == select_device()
    logits, labels = make_inputs(n=3, vocab=5)
    assert logits.device.type == labels.device.type == DEVICE
    assert os.environ["TRITON_INTERPRET"] == ("1" if DEVICE == "cpu" else "0")
    cpu_logits, _ = make_inputs(n=3, vocab=5, device="cpu")
    assert torch.equal(cpu_logits.detach(), logits.detach().cpu()), "a seed must give the same numbers everywhere"


def _pytest(value):
    """Collect one test in a fresh pytest process with GEM_TEST_DEVICE=value (a few seconds)."""
    env = {**os.environ, DEVICE_VARIABLE: value}
    env.pop("TRITON_INTERPRET", None)
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-p",
        "no:cacheprovider",
        "--co",
        "tests/test_test_device.py::test_unknown_value_is_an_error",
    ]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA (here CUDA is available)")
def test_pytest_run_forced_to_cuda_without_a_gpu_stops_with_a_usage_error():
    out = _pytest("cuda")
    assert out.returncode == pytest.ExitCode.USAGE_ERROR, out.stdout + out.stderr
    assert "GEM_TEST_DEVICE=cuda, but torch.cuda.is_available() is False" in out.stdout + out.stderr


def test_pytest_run_forced_to_cpu_reports_it_in_the_header():
    out = _pytest("cpu")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "gem-kernels test device: cpu (CPU, Triton interpreter)" in out.stdout
