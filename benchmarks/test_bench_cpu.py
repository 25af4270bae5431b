"""CPU timings of the PyTorch code paths with pytest-benchmark: ``pytest benchmarks/ --benchmark-only``.

Only providers that run no Triton kernel are timed (Triton kernels run in the interpreter on a
CPU, whose speed says nothing about the kernels). Shape: the largest Llama-3 shape of the CPU grid
(every dimension of the GPU shape divided by 128); the step is the one python -m benchmarks measures.
"""

import pytest
import torch

from benchmarks import providers, runner
from benchmarks.shapes import grid

SETTINGS = runner.Settings(device="cpu", dtype=torch.float32)
SHAPE = max(grid("cpu", models=["llama3"]), key=lambda s: s.tokens)
CPU_PATHS = [p.name for p in providers.PROVIDERS if not p.triton and not p.gpu_only]


def _setup(name):
    provider = providers.BY_NAME[name]
    note = provider.unavailable("cpu", SHAPE)
    if note:
        pytest.skip(f"{name}: {note}")
    step = provider.step(SHAPE)
    hidden, weight, labels = runner.make_inputs(SHAPE, SETTINGS)

    def reset():
        hidden.grad = weight.grad = None

    return step, (hidden, weight, labels), reset


@pytest.mark.parametrize("name", CPU_PATHS)
def test_forward(benchmark, name):
    step, args, reset = _setup(name)
    benchmark.extra_info["shape"] = SHAPE.label
    loss = benchmark.pedantic(step, args=args, setup=reset, rounds=10, warmup_rounds=1)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("name", CPU_PATHS)
def test_backward(benchmark, name):
    step, args, reset = _setup(name)
    benchmark.extra_info["shape"] = SHAPE.label

    def setup():  # the forward is untimed
        reset()
        return (step(*args),), {}

    benchmark.pedantic(lambda loss: loss.backward(), setup=setup, rounds=10, warmup_rounds=1)
    assert torch.isfinite(args[1].grad).all()


@pytest.mark.parametrize("name", CPU_PATHS)
def test_forward_backward(benchmark, name):
    step, args, reset = _setup(name)
    benchmark.extra_info["shape"] = SHAPE.label
    benchmark.pedantic(lambda: step(*args).backward(), setup=reset, rounds=10, warmup_rounds=1)
    assert torch.isfinite(args[0].grad).all()
