"""The loss implementations being compared ("providers").

Two tables are measured per shape (runner.TABLES):

* ``step``, the full lm_head training step, the same for all providers::

      hidden [T, H], weight [V, H] (the lm_head), labels [T]  ->  scalar mean loss  -> (backward)
      d hidden, d weight

  A *logits* provider runs ``logits = hidden @ weight.T`` (in the input dtype, as the model's
  lm_head would) and then its loss on the logits: its memory and time include that matmul, the
  [T, V] logits and their gradient. A *fused* provider gets hidden and weight itself and may never
  materialise [T, V].
* ``loss``, the loss on given logits: ``logits [T, V] (a leaf), labels [T] -> mean loss -> d logits``.
  Only providers that take logits (and ``torch-ce-compile``, compiled on the logits alone) run it;
  here the loss kernels are told apart without the matmul that dominates the step.

Inputs exist before the call and are never counted. GEM rows use beta = 0.7 and come in both
weightings: ``h="linear"`` (the only one the authors' Triton kernel supports) and
``h="logsigmoid"`` (``-logsigmoid`` suffix: what the authors' training scripts run, with beta 0.7).
Cross-entropy rows compute plain CE. A shape's softcap is applied by every provider
(Gemma-2 style ``c * tanh(z / c)``); labels equal to -100 are ignored by every provider.

``bytes_model`` gives each Triton provider's global-memory bytes per phase as a function of the
shape (see roofline.py, where each figure comes from); it is what a GPU run reports as logical bytes.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

from .shapes import Shape

BETA = 0.7
CE_TRL_CHUNK = None  # TRL's own vocabulary chunk (trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE) when None


@dataclass(frozen=True)
class Provider:
    name: str
    description: str
    kind: str  # "logits" or "fused"
    triton: bool  # runs Triton kernels: interpreted on CPU (never timed there), traffic countable
    build: Callable[[Shape], Callable]  # logits: (logits, labels) -> loss; fused: (hidden, weight, labels) -> loss
    requires: tuple = ()  # "module" or "module:attribute" that must import
    gpu_only: Optional[str] = None  # reason it cannot run on CPU, if so
    softcap_needs_gpu: bool = False
    computes: str = "ce"  # the loss it computes: "gem" or "ce" (the smoke test checks the value)
    h: str = ""  # GEM weighting ("linear" / "logsigmoid"); "" for CE
    count_flops: bool = True  # False where a FLOP-counting dispatch mode could disturb the code path
    build_loss: Optional[Callable[[Shape], Callable]] = None  # loss-on-logits form when not ``build`` itself
    bytes_model: Optional[str] = None  # key of roofline.BYTES_MODELS: Triton bytes per phase
    cpu_note: str = ""  # how the CPU run differs from the GPU one, if it does

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

    @property
    def in_loss_table(self) -> bool:
        return self.kind == "logits" or self.build_loss is not None

    def step(self, shape: Shape) -> Callable:
        """The lm_head step: (hidden, weight, labels) -> loss."""
        inner = self.build(shape)
        if self.kind == "fused":
            return inner

        def logits_step(hidden, weight, labels):
            return inner(hidden @ weight.t(), labels)

        return logits_step

    def loss(self, shape: Shape) -> Callable:
        """The loss on given logits: (logits, labels) -> loss."""
        if not self.in_loss_table:
            raise ValueError(f"{self.name} takes hidden states, not logits: it has no loss-on-logits form")
        return (self.build_loss or self.build)(shape)


def _softcap_torch(z: torch.Tensor, cap: Optional[float]) -> torch.Tensor:
    return z if cap is None else cap * torch.tanh(z / cap)


def _gem(impl: str, inplace: bool = False, h: str = "linear"):
    def build(shape: Shape):
        from gem_kernels import gem_loss

        return lambda logits, labels: gem_loss(
            logits, labels, beta=BETA, h=h, softcap=shape.softcap, impl=impl, inplace_backward=inplace
        )

    return build


def _gem_reference(h: str = "linear"):
    def build(shape: Shape):
        from gem_kernels.reference import gem_loss_reference

        return lambda logits, labels: gem_loss_reference(logits, labels, beta=BETA, h=h, softcap=shape.softcap)

    return build


def _gem_fused(impl: str, h: str = "linear", **extra):
    def build(shape: Shape):
        from gem_kernels import fused_linear_gem_loss

        return lambda hidden, weight, labels: fused_linear_gem_loss(
            hidden, weight, labels, beta=BETA, h=h, softcap=shape.softcap, impl=impl, **extra
        )

    return build


# The chunk-size sweep of the fused path: its time against chunk rows on a GPU, the table of
# docs/fused_linear.md ("GPU measurement"). The default policy
# (gem_kernels.chunk_policy.fused_chunk_rows) is the gem-fused row.
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


def _torch_ce_compiled_loss(shape: Shape):
    cap = shape.softcap

    def loss(logits, labels):  # the loss on given logits only: upcast + softcap + CE, fused by inductor
        return F.cross_entropy(_softcap_torch(logits.float(), cap), labels)

    return torch.compile(loss)


def _liger_ce(shape: Shape):
    from liger_kernel.transformers.functional import liger_cross_entropy

    # Liger writes the gradient into the logits during the forward; here they are a fresh matmul output.
    return lambda logits, labels: liger_cross_entropy(logits, labels, softcap=shape.softcap)


def _liger_flce(accum_dtype: Optional[torch.dtype] = None):
    def build(shape: Shape):
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        return lambda hidden, weight, labels: liger_fused_linear_cross_entropy(
            hidden, weight, labels, softcap=shape.softcap, accum_dtype=accum_dtype
        )

    return build


def _cce(shape: Shape):
    from cut_cross_entropy import linear_cross_entropy

    return lambda hidden, weight, labels: linear_cross_entropy(hidden, weight, labels, softcap=shape.softcap)


def _trl(shape: Shape):
    """TRL's fused LM head as ``add_fused_lm_head`` runs it in SFTTrainer (trl/trainer/utils.py):
    the valid positions only, ``ChunkedLogProbFunction`` (trl/kernels/chunked_logprob.py: cuBLAS on
    [4096, 32768] tiles, a Triton kernel folding each tile into online-logsumexp statistics, the
    backward recomputing each tile and accumulating the gradient GEMMs in fp32), then the mean of
    -log p(label). Only log-probabilities are requested (its default ``outputs``)."""
    from trl.kernels import ChunkedLogProbFunction
    from trl.trainer import utils as trl_utils

    chunk = CE_TRL_CHUNK or trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE

    def step(hidden, weight, labels):
        mask = labels != -100
        log_probs = ChunkedLogProbFunction.apply(
            hidden[mask], weight, None, labels[mask], 1.0, chunk, shape.softcap, 1.0, ("log_probs",)
        )[0]
        return -log_probs.sum() / mask.sum().clamp(min=1)

    return step


def _gem_providers(h: str) -> List[Provider]:
    suffix, what = ("", "GEM h=linear") if h == "linear" else ("-logsigmoid", "GEM h=logsigmoid")
    req = ("gem_kernels", "triton")
    return [
        Provider(
            f"gem-triton{suffix}",
            f"{what}, gem_kernels Triton kernels (gem_loss impl='triton')",
            "logits",
            True,
            _gem("triton", h=h),
            req,
            computes="gem",
            h=h,
            bytes_model="gem-triton",
        ),
        Provider(
            f"gem-torch{suffix}",
            f"{what}, gem_kernels chunked PyTorch path (impl='torch')",
            "logits",
            False,
            _gem("torch", h=h),
            ("gem_kernels",),
            computes="gem",
            h=h,
        ),
        Provider(
            f"gem-fused{suffix}",
            f"{what} fused with the lm_head (fused_linear_gem_loss impl='triton')",
            "fused",
            True,
            _gem_fused("triton", h=h),
            ("gem_kernels:fused_linear_gem_loss", "triton"),
            computes="gem",
            h=h,
            bytes_model="gem-fused",
        ),
        Provider(
            f"gem-fused-torch{suffix}",
            f"{what} fused with the lm_head, PyTorch path (impl='torch')",
            "fused",
            False,
            _gem_fused("torch", h=h),
            ("gem_kernels:fused_linear_gem_loss",),
            computes="gem",
            h=h,
        ),
        Provider(
            f"gem-reference{suffix}",
            f"{what}, the authors' formula fully materialised (gem_loss_reference)",
            "logits",
            False,
            _gem_reference(h),
            ("gem_kernels.reference",),
            computes="gem",
            h=h,
        ),
    ]


_LINEAR, _LOGSIGMOID = _gem_providers("linear"), _gem_providers("logsigmoid")

PROVIDERS: List[Provider] = [
    _LINEAR[0],
    Provider(
        "gem-triton-inplace",
        "GEM h=linear, Triton, gradient written over the logits (inplace_backward=True)",
        "logits",
        True,
        _gem("triton", inplace=True),
        ("gem_kernels", "triton"),
        computes="gem",
        h="linear",
        bytes_model="gem-triton",
    ),
    _LINEAR[1],
    Provider(
        "gem-torch-inplace",
        "GEM h=linear, chunked PyTorch path, inplace_backward=True (the gradient is "
        "recomputed per row block in backward, over the logits)",
        "logits",
        False,
        _gem("torch", inplace=True),
        ("gem_kernels",),
        computes="gem",
        h="linear",
    ),
    *_LINEAR[2:],
    Provider(
        "gem-fused-lowmem",
        "GEM h=linear fused, low_memory=True: d weight per vocabulary slice "
        "(8 x T x H x V FLOPs, no [V, H] buffer besides the gradient)",
        "fused",
        True,
        _gem_fused("triton", low_memory=True),
        ("gem_kernels:fused_linear_gem_loss", "triton"),
        computes="gem",
        h="linear",
    ),
    Provider(
        "gem-fused-torch-lowmem",
        "GEM h=linear fused, PyTorch path (impl='torch'), low_memory=True",
        "fused",
        False,
        _gem_fused("torch", low_memory=True),
        ("gem_kernels:fused_linear_gem_loss",),
        computes="gem",
        h="linear",
    ),
    *[
        Provider(
            f"gem-fused-chunk{c}",
            f"GEM h=linear fused (impl='triton') with chunk_size={c}",
            "fused",
            True,
            _gem_fused("triton", chunk_size=c),
            ("gem_kernels:fused_linear_gem_loss", "triton"),
            gpu_only="a chunk-size sweep: a GPU timing question",
            computes="gem",
            h="linear",
            bytes_model="gem-fused",
        )
        for c in FUSED_CHUNK_SWEEP
    ],
    *_LOGSIGMOID,
    Provider("torch-ce", "CE, torch F.cross_entropy on logits.float(), eager", "logits", False, _torch_ce),
    # kind "fused" only because the compiled step takes hidden and weight (matmul inside); in the
    # loss table it is the CE on given logits, compiled on its own.
    Provider(
        "torch-ce-compile",
        "CE, the torch-ce step (matmul included) under torch.compile",
        "fused",
        False,
        _torch_ce_compiled,
        count_flops=False,
        build_loss=_torch_ce_compiled_loss,
        gpu_only="torch.compile's CPU build time would dominate this run",
    ),
    Provider(
        "liger-ce",
        "CE, Liger-Kernel cross_entropy (Triton)",
        "logits",
        True,
        _liger_ce,
        ("liger_kernel.transformers.functional", "triton"),
        softcap_needs_gpu=True,
        bytes_model="liger-ce",
    ),
    Provider(
        "liger-flce",
        "CE fused with the lm_head, Liger-Kernel fused_linear_cross_entropy",
        "fused",
        True,
        _liger_flce(),
        ("liger_kernel.transformers.functional", "triton"),
        softcap_needs_gpu=True,
        bytes_model="liger-ce",
    ),
    Provider(
        "liger-flce-fp32-accum",
        "liger-flce with accum_dtype=float32 (d weight accumulated in fp32, as "
        "gem-fused does; the default accumulates in the input dtype)",
        "fused",
        True,
        _liger_flce(torch.float32),
        ("liger_kernel.transformers.functional", "triton"),
        softcap_needs_gpu=True,
        bytes_model="liger-ce",
    ),
    Provider(
        "cce",
        "CE fused with the lm_head, Cut Cross-Entropy linear_cross_entropy (Triton)",
        "fused",
        True,
        _cce,
        ("cut_cross_entropy", "triton"),
        gpu_only="its Triton kernels fail under the Triton interpreter (InterpreterError)",
    ),
    Provider(
        "trl-fused",
        "CE fused with the lm_head, TRL's fused LM head (SFTTrainer's default loss; "
        "trl.kernels.ChunkedLogProbFunction)",
        "fused",
        False,
        _trl,
        ("trl.kernels:ChunkedLogProbFunction",),
        bytes_model="trl-fused",
        cpu_note="on a CPU TRL folds its tiles with torch ops instead of its Triton kernel (as TRL itself does)",
    ),
]
BY_NAME: Dict[str, Provider] = {p.name: p for p in PROVIDERS}


def select(names: Optional[List[str]], device: str) -> List[Provider]:
    if names:
        unknown = [n for n in names if n not in BY_NAME]
        if unknown:
            raise ValueError(f"unknown provider(s) {unknown}; choose from {list(BY_NAME)}")
        return [BY_NAME[n] for n in names]
    return list(PROVIDERS)
