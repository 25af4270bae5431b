"""The loss implementations being compared ("providers").

What every row measures: the same training step for all providers,

    hidden [T, H], weight [V, H] (the lm_head), labels [T]  ->  scalar mean loss  -> (backward)
    d hidden, d weight

so rows compare directly. A *logits* provider runs ``logits = hidden @ weight.T`` (in the input
dtype, as the model's lm_head would) and then its loss on the logits: its memory and time include
that matmul, the [T, V] logits and their gradient. A *fused* provider gets hidden and weight
itself and may never materialise [T, V]. Inputs exist before the call and are never counted.

GEM rows use beta = 0.7, h = "linear" (the authors' setting); cross-entropy rows compute plain CE.
A shape's softcap is applied by every provider (Gemma-2 style ``c * tanh(z / c)``).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

from .shapes import Shape

BETA = 0.7


@dataclass(frozen=True)
class Provider:
    name: str
    description: str
    kind: str  # "logits" or "fused"
    triton: bool  # runs Triton kernels: interpreted on CPU (never timed there), traffic countable
    build: Callable[[Shape], Callable]  # shape -> step(hidden, weight, labels) -> scalar loss
    requires: tuple = ()  # "module" or "module:attribute" that must import
    gpu_only: Optional[str] = None  # reason it cannot run on CPU, if so
    softcap_needs_gpu: bool = False
    computes: str = "ce"  # the loss it computes: "gem" or "ce" (the smoke test checks the value)
    count_flops: bool = True  # False where a FLOP-counting dispatch mode could disturb the code path

    def unavailable(self, device: str, shape: Optional[Shape] = None) -> Optional[str]:
        """None when the provider can run on ``device`` (at ``shape``), else a one-line reason."""
        if self.gpu_only and device != "cuda":
            return f"GPU only: {self.gpu_only}"
        if device != "cuda" and shape is not None and shape.softcap and self.softcap_needs_gpu:
            return "softcap needs a GPU: its kernel calls libdevice tanh, which the Triton interpreter lacks"
        for req in self.requires:
            mod, _, attr = req.partition(":")
            try:
                obj = importlib.import_module(mod)
                if attr:
                    getattr(obj, attr)
            except Exception as exc:  # ImportError, or a package broken on this machine
                first = str(exc).splitlines()[0][:120] if str(exc) else ""
                return f"not importable: {req.replace(':', '.')} ({type(exc).__name__}: {first})"
        return None

    def step(self, shape: Shape) -> Callable:
        inner = self.build(shape)
        if self.kind == "fused":
            return inner

        def logits_step(hidden, weight, labels):
            return inner(hidden @ weight.t(), labels)

        return logits_step


def _softcap_torch(z: torch.Tensor, cap: Optional[float]) -> torch.Tensor:
    return z if cap is None else cap * torch.tanh(z / cap)


def _gem(impl: str, inplace: bool = False):
    def build(shape: Shape):
        from gem_kernels import gem_loss

        return lambda logits, labels: gem_loss(logits, labels, beta=BETA, softcap=shape.softcap, impl=impl,
                                               inplace_backward=inplace)
    return build


def _gem_reference(shape: Shape):
    from gem_kernels.reference import gem_loss_reference

    return lambda logits, labels: gem_loss_reference(logits, labels, beta=BETA, softcap=shape.softcap)


def _gem_fused(impl: str, **extra):
    def build(shape: Shape):
        from gem_kernels import fused_linear_gem_loss

        return lambda hidden, weight, labels: fused_linear_gem_loss(hidden, weight, labels, beta=BETA,
                                                                    softcap=shape.softcap, impl=impl, **extra)
    return build


# The chunk-size sweep of the fused path (issue 10's table: time against chunk rows on a GPU). The
# default policy (gem_kernels.chunk_policy.fused_chunk_rows) is the gem-fused row.
FUSED_CHUNK_SWEEP = (512, 1024, 2048, 4096, 8192)


def _torch_ce(shape: Shape):
    # Upcast like Hugging Face's causal-LM loss does (logits.float()); a no-op for fp32 inputs.
    return lambda logits, labels: F.cross_entropy(_softcap_torch(logits.float(), shape.softcap), labels)


def _torch_ce_compiled(shape: Shape):
    cap = shape.softcap

    # The whole step is compiled (matmul + upcast + softcap + CE) so inductor may fuse what it can.
    def step(hidden, weight, labels):
        return F.cross_entropy(_softcap_torch((hidden @ weight.t()).float(), cap), labels)

    return torch.compile(step)


def _liger_ce(shape: Shape):
    from liger_kernel.transformers.functional import liger_cross_entropy

    # Liger writes the gradient into the logits during the forward; here they are a fresh matmul output.
    return lambda logits, labels: liger_cross_entropy(logits, labels, softcap=shape.softcap)


def _liger_flce(shape: Shape):
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    return lambda hidden, weight, labels: liger_fused_linear_cross_entropy(hidden, weight, labels,
                                                                           softcap=shape.softcap)


def _cce(shape: Shape):
    from cut_cross_entropy import linear_cross_entropy

    return lambda hidden, weight, labels: linear_cross_entropy(hidden, weight, labels, softcap=shape.softcap)


PROVIDERS: List[Provider] = [
    Provider("gem-triton", "GEM, gem_kernels Triton kernels (gem_loss impl='triton')", "logits", True,
             _gem("triton"), ("gem_kernels", "triton"), computes="gem"),
    Provider("gem-triton-inplace", "GEM, Triton, gradient written over the logits (inplace_backward=True)",
             "logits", True, _gem("triton", inplace=True), ("gem_kernels", "triton"), computes="gem"),
    Provider("gem-torch", "GEM, gem_kernels chunked PyTorch path (impl='torch')", "logits", False,
             _gem("torch"), ("gem_kernels",), computes="gem"),
    Provider("gem-fused", "GEM fused with the lm_head (fused_linear_gem_loss impl='triton')", "fused", True,
             _gem_fused("triton"), ("gem_kernels:fused_linear_gem_loss", "triton"), computes="gem"),
    Provider("gem-fused-torch", "GEM fused with the lm_head, PyTorch path (impl='torch')", "fused", False,
             _gem_fused("torch"), ("gem_kernels:fused_linear_gem_loss",), computes="gem"),
    Provider("gem-fused-lowmem", "GEM fused, low_memory=True: d weight per vocabulary slice (8 x T x H x V "
             "FLOPs, no [V, H] buffer besides the gradient)", "fused", True, _gem_fused("triton", low_memory=True),
             ("gem_kernels:fused_linear_gem_loss", "triton"), computes="gem"),
    *[Provider(f"gem-fused-chunk{c}", f"GEM fused (impl='triton') with chunk_size={c}", "fused", True,
               _gem_fused("triton", chunk_size=c), ("gem_kernels:fused_linear_gem_loss", "triton"),
               gpu_only="a chunk-size sweep: a GPU timing question", computes="gem")
      for c in FUSED_CHUNK_SWEEP],
    Provider("gem-reference", "GEM, the authors' formula fully materialised (gem_loss_reference)", "logits",
             False, _gem_reference, ("gem_kernels.reference",), computes="gem"),
    Provider("torch-ce", "CE, torch F.cross_entropy on logits.float(), eager", "logits", False, _torch_ce),
    # kind "fused" only because the compiled function takes hidden and weight (matmul inside).
    Provider("torch-ce-compile", "CE, the torch-ce step (matmul included) under torch.compile", "fused", False,
             _torch_ce_compiled, count_flops=False,
             gpu_only="torch.compile's CPU build time would dominate this run"),
    Provider("liger-ce", "CE, Liger-Kernel cross_entropy (Triton)", "logits", True, _liger_ce,
             ("liger_kernel.transformers.functional", "triton"), softcap_needs_gpu=True),
    Provider("liger-flce", "CE fused with the lm_head, Liger-Kernel fused_linear_cross_entropy", "fused", True,
             _liger_flce, ("liger_kernel.transformers.functional", "triton"), softcap_needs_gpu=True),
    Provider("cce", "CE fused with the lm_head, Cut Cross-Entropy linear_cross_entropy (Triton)", "fused", True,
             _cce, ("cut_cross_entropy", "triton"),
             gpu_only="its Triton kernels fail under the Triton interpreter (InterpreterError)"),
]
BY_NAME: Dict[str, Provider] = {p.name: p for p in PROVIDERS}


def select(names: Optional[List[str]], device: str) -> List[Provider]:
    if names:
        unknown = [n for n in names if n not in BY_NAME]
        if unknown:
            raise ValueError(f"unknown provider(s) {unknown}; choose from {list(BY_NAME)}")
        return [BY_NAME[n] for n in names]
    return list(PROVIDERS)
