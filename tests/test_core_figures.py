"""The core kernels' measured figures hold: forward + backward move at most 3.05 passes over the
logits, and allocate exactly one [N, V] tensor (none with inplace_backward). Not timed."""

import pytest
import torch
from helpers import only_on

from benchmarks.core_figures import TRAFFIC_BUDGET, measure

INTERPRETED = only_on("cpu", "counts traffic of the Triton kernels under the interpreter, which is off on a GPU")


@pytest.mark.parametrize("impl,n", [pytest.param("triton", 12, marks=INTERPRETED), ("torch", 128)])
def test_traffic_and_allocation_figures(impl, n):
    figures = measure(n=n, v=5003, dtype=torch.bfloat16, impls=(impl,))
    assert {f.inplace for f in figures} == {False, True}
    for f in figures:
        if impl == "triton":
            assert 3.0 <= f.passes <= TRAFFIC_BUDGET, f
        assert f.nv_allocs == (0 if f.inplace else 1), f
