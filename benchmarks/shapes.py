"""Benchmark shapes: real lm_head shapes on a GPU, the same shapes scaled down on a CPU.

A shape is (tokens T, vocabulary V, hidden H, softcap, share of ignored labels). Every provider
computes the loss of T tokens from hidden [T, H] and an lm_head weight [V, H] (see providers.py for
what each row includes); a masked shape sets round(ignore_frac * T) labels to -100, as SFT does for
prompt tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence


@dataclass(frozen=True)
class Model:
    name: str
    vocab: int
    hidden: int
    softcap: Optional[float] = None


@dataclass(frozen=True)
class Shape:
    model: str
    tokens: int
    vocab: int
    hidden: int
    softcap: Optional[float] = None
    ignore_frac: float = 0.0  # share of labels set to -100

    @property
    def ignored(self) -> int:
        return round(self.ignore_frac * self.tokens)

    @property
    def valid(self) -> int:
        return self.tokens - self.ignored

    @property
    def label(self) -> str:
        cap = f" softcap={self.softcap:g}" if self.softcap else ""
        masked = f" masked={self.ignore_frac:.0%}" if self.ignore_frac else ""
        return f"{self.model} T={self.tokens} V={self.vocab} H={self.hidden}{cap}{masked}"


# The models GEM's authors fine-tuned (Llama-3.1, Qwen2.5) and Gemma-2 for the softcap path.
MODELS = (
    Model("llama3", 128_256, 4_096),
    Model("qwen2.5", 151_936, 3_584),
    Model("gemma2", 256_000, 2_304, 30.0),
)
GPU_TOKENS = (4_096, 8_192, 16_384)
# The masked variant: half the labels ignored, as supervised fine-tuning masks prompt tokens.
MASKED_FRAC = 0.5

# On a CPU, Triton kernels run in the interpreter at a few tens of rows per second, so every
# dimension (tokens T, vocabulary V, hidden H) is divided by 128. A uniform scale keeps every ratio
# of the GPU shapes: the sizes of the logits [T, V], the weight gradient [V, H] and the hidden
# gradient [T, H] (which decide whose memory wins), and V / H, from which chunked fused kernels
# such as Liger's size their chunks. These numbers say nothing about GPU speed.
CPU_SCALE = 128
CPU_TOKENS = tuple(t // CPU_SCALE for t in GPU_TOKENS)


def scaled(model: Model, scale: int) -> Model:
    return Model(f"{model.name}/{scale}", model.vocab // scale, model.hidden // scale, model.softcap)


def grid(
    device: str,
    *,
    which: str = "default",
    models: Optional[Sequence[str]] = None,
    tokens: Optional[Sequence[int]] = None,
    masked: bool = True,
) -> List[Shape]:
    """The shapes to run.

    ``which="default"``: every model at the middle token count, plus a token sweep of the first
    model (the data of the memory-vs-vocabulary and memory-vs-tokens plots), plus the first model at
    the middle token count with half the labels ignored (``masked``). ``"all"``: every model at
    every token count, plus that masked shape. ``"quick"``: the first model at the smallest token
    count. ``models`` (names, e.g. ["llama3"]) and ``tokens`` filter / replace the defaults;
    ``masked=False`` drops the masked shape.
    """
    gpu = device == "cuda"
    token_list = list(tokens) if tokens else list(GPU_TOKENS if gpu else CPU_TOKENS)
    chosen = [m for m in MODELS if not models or m.name in models]
    if models:
        unknown = set(models) - {m.name for m in MODELS}
        if unknown:
            raise ValueError(f"unknown model(s) {sorted(unknown)}; choose from {[m.name for m in MODELS]}")
    chosen = [m if gpu else scaled(m, CPU_SCALE) for m in chosen]
    if which == "quick":
        return [Shape(chosen[0].name, min(token_list), chosen[0].vocab, chosen[0].hidden, chosen[0].softcap)]
    if which == "all" or tokens:
        pairs = [(m, t) for m in chosen for t in token_list]
    elif which == "default":
        mid = token_list[len(token_list) // 2]
        pairs = [(chosen[0], t) for t in token_list] + [(m, mid) for m in chosen[1:]]
    else:
        raise ValueError(f"grid must be 'default', 'all' or 'quick', got {which!r}")
    shapes = [Shape(m.name, t, m.vocab, m.hidden, m.softcap) for m, t in pairs]
    if masked:
        first, mid = chosen[0], token_list[len(token_list) // 2]
        shapes.append(Shape(first.name, mid, first.vocab, first.hidden, first.softcap, MASKED_FRAC))
    return shapes


def parse_shape(text: str) -> Shape:
    """'T,V,H', 'T,V,H,softcap' or 'T,V,H,softcap,ignore_frac' (softcap 0 = none) -> a custom Shape."""
    parts = [p.strip() for p in text.split(",")]
    if len(parts) not in (3, 4, 5):
        raise ValueError(f"--shape takes T,V,H[,softcap[,ignore_frac]], got {text!r}")
    t, v, h = (int(p) for p in parts[:3])
    cap = float(parts[3]) if len(parts) >= 4 and float(parts[3]) > 0 else None
    frac = float(parts[4]) if len(parts) == 5 else 0.0
    if not 0.0 <= frac < 1.0:
        raise ValueError(f"--shape: ignore_frac must be in [0, 1), got {frac}")
    return Shape("custom", t, v, h, cap, frac)
