"""Measuring one provider at one shape in one table: memory, time, global-memory traffic and FLOPs.

Tables (``TABLES``): "step" is the full lm_head step (hidden, weight -> loss -> d hidden, d weight);
"loss" is the loss on given logits (logits -> loss -> d logits). Per (provider, shape, table) the
forward is run once under every instrument (memory, traffic when the Triton interpreter is on,
FLOPs), then the backward of that loss once, and the forward+backward figures are derived from the
two (see ``combine``). Timings are separate repeated runs. In the loss table, in-place providers
(liger-ce in its forward, gem-triton-inplace and gem-torch-inplace in their backward) overwrite the
given logits, so their repeated timed calls run on overwritten values; no kernel's work depends on
the values.
"""

from __future__ import annotations

import gc
import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch

from .measure import count_flops, peak_memory, quiet_fd2
from .providers import Provider
from .roofline import BYTES_SOURCES, model_bytes
from .shapes import Shape
from .traffic import count_traffic, interpreter_active

PHASES = ("forward", "backward", "forward+backward")
TABLES = ("loss", "step")
QUANTILES = (0.2, 0.5, 0.8)


@dataclass(frozen=True)
class Settings:
    device: str  # "cpu" or "cuda"
    dtype: torch.dtype
    cpu_reps: int = 30  # at most this many timed repetitions on CPU ...
    cpu_budget_s: float = 1.0  # ... or fewer once this much time was spent (at least 3)
    seed: int = 0

    @property
    def interpreter(self) -> bool:
        return interpreter_active()


def make_inputs(shape: Shape, settings: Settings):
    """hidden [T, H] ~ N(0, 1), weight [V, H] ~ N(0, 4/H) (logits of std ~2), labels [T] uniform in [0, V)
    with exactly ``shape.ignored`` of them (at random positions) set to -100."""
    g = torch.Generator(device=settings.device).manual_seed(settings.seed)
    kw = dict(device=settings.device, generator=g)
    hidden = torch.randn(shape.tokens, shape.hidden, **kw).to(settings.dtype).requires_grad_()
    weight = torch.randn(shape.vocab, shape.hidden, **kw) * (2.0 / math.sqrt(shape.hidden))
    weight = weight.to(settings.dtype).requires_grad_()
    labels = torch.randint(0, shape.vocab, (shape.tokens,), **kw)
    if shape.ignored:
        labels[torch.randperm(shape.tokens, **kw)[: shape.ignored]] = -100
    return hidden, weight, labels


# Hidden size of the lm_head product behind the logits of measurements on given logits that take no
# model shape (T and V only: benchmarks.core_figures, design_traffic, metrics_cost, torch_path). It
# sets the logits' values only, which none of their figures depends on.
LOGITS_HIDDEN = 64


def make_logits(shape: Shape, settings: Settings):
    """The loss table's inputs: logits [T, V] = hidden @ weight.T of ``make_inputs`` (a leaf requiring
    grad, in the run's dtype) and the same labels."""
    hidden, weight, labels = make_inputs(shape, settings)
    with torch.no_grad():
        logits = hidden @ weight.t()
    return logits.requires_grad_(), labels


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:160]}" if text else type(exc).__name__


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _clean(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def instrumented(fn: Callable, settings: Settings, traffic: bool, flops: bool = True) -> Dict:
    """Run ``fn()`` once under the memory tracker (+ traffic counter, + FLOP counter when ``flops``).

    Returns peak/end/largest bytes, traffic bytes (or None), matmul FLOPs and fn's result.
    """
    box = {}

    def with_flops():
        def inner():
            box["result"] = fn()

        if flops:
            box["flops"] = count_flops(inner)
        else:
            inner()

    def with_traffic():
        if traffic:
            box["traffic"] = count_traffic(with_flops)
        else:
            with_flops()

    _clean(settings.device)
    with quiet_fd2():  # interpreter and profiler chatter on fd 2 stays out of the tables
        mem = peak_memory(with_traffic, device=settings.device)
    tr = box.get("traffic")
    return {
        "peak_bytes": mem.peak_bytes,
        "end_bytes": mem.end_bytes,
        "largest_alloc_bytes": mem.largest_alloc_bytes,
        "loaded_bytes": tr.loaded_bytes if tr else None,
        "stored_bytes": tr.stored_bytes if tr else None,
        "flops": box.get("flops"),
        "result": box.get("result"),
    }


def combine(fwd: Dict, bwd: Dict) -> Dict:
    """Forward+backward figures from the forward and the backward measured back to back.

    The backward's baseline is the state the forward left (its ``end_bytes``), so the peak of the
    two run as one call is max(peak_fwd, end_fwd + peak_bwd) exactly; bytes and FLOPs add up.
    (tests/test_benchmarks_smoke.py checks this against a direct measurement.)
    """

    def add(key):
        a, b = fwd[key], bwd[key]
        return None if a is None or b is None else a + b

    return {
        "peak_bytes": max(fwd["peak_bytes"], fwd["end_bytes"] + bwd["peak_bytes"]),
        "end_bytes": fwd["end_bytes"] + bwd["end_bytes"],
        "largest_alloc_bytes": max(fwd["largest_alloc_bytes"], bwd["largest_alloc_bytes"]),
        "loaded_bytes": add("loaded_bytes"),
        "stored_bytes": add("stored_bytes"),
        "flops": add("flops"),
    }


def _quantiles(samples_ms: List[float]):
    if len(samples_ms) == 1:
        return (samples_ms[0],) * 3
    qs = statistics.quantiles(samples_ms, n=10, method="inclusive")  # deciles: qs[1]=p20, qs[4]=p50, qs[7]=p80
    return qs[1], statistics.median(samples_ms), qs[7]


def time_calls(fn: Callable, settings: Settings, grads: List[torch.Tensor], setup: Optional[Callable] = None):
    """(p20, p50, p80) milliseconds of ``fn(setup())`` (setup untimed; grads reset before each call).

    GPU without setup: triton.testing.do_bench (which also flushes L2 between calls). Otherwise a
    loop: on CPU up to ``cpu_reps`` perf_counter timings within ``cpu_budget_s`` (at least 3);
    on GPU 20 CUDA-event timings after 3 warm-up calls.
    """

    def reset():
        for g in grads:
            g.grad = None

    if settings.device == "cuda" and setup is None:
        import triton.testing

        return tuple(triton.testing.do_bench(lambda: fn(None), quantiles=list(QUANTILES), grad_to_none=grads))
    samples = []
    if settings.device == "cuda":
        for i in range(23):
            reset()
            arg = None  # drop the previous call's graph before building the next
            arg = setup() if setup else None
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(arg)
            end.record()
            torch.cuda.synchronize()
            if i >= 3:
                samples.append(start.elapsed_time(end))
        return _quantiles(samples)
    reset()
    fn(setup() if setup else None)  # warm-up
    spent = 0.0
    while len(samples) < settings.cpu_reps and (len(samples) < 3 or spent < settings.cpu_budget_s):
        reset()
        arg = None
        arg = setup() if setup else None
        t0 = time.perf_counter()
        fn(arg)
        dt = time.perf_counter() - t0
        spent += dt
        samples.append(dt * 1e3)
    return _quantiles(samples)


def _separate_flops(step: Callable, args):
    """(forward, backward) matmul FLOPs of one extra step, or (None, None) if counting fails."""
    box = {}
    try:
        fwd = count_flops(lambda: box.__setitem__("loss", step(*args)))
        bwd = count_flops(lambda: box["loss"].backward())
        return fwd, bwd
    except Exception:
        return None, None
    finally:
        box.clear()
        for t in args:
            t.grad = None


def _base_record(provider: Provider, shape: Shape, settings: Settings, phase: str, table: str) -> Dict:
    return {
        "table": table,
        "provider": provider.name,
        "kind": provider.kind,
        "h": provider.h,
        "computes": provider.computes,
        "shape": shape.label,
        "model": shape.model,
        "tokens": shape.tokens,
        "valid_tokens": shape.valid,
        "ignore_frac": shape.ignore_frac,
        "vocab": shape.vocab,
        "hidden": shape.hidden,
        "softcap": shape.softcap or "",
        "dtype": str(settings.dtype).replace("torch.", ""),
        "device": settings.device,
        "phase": phase,
        "status": "ok",
        "note": "",
        "peak_bytes": None,
        "largest_alloc_bytes": None,
        "time_ms_p20": None,
        "time_ms_p50": None,
        "time_ms_p80": None,
        "time_note": "",
        "loaded_bytes": None,
        "stored_bytes": None,
        "traffic_bytes": None,
        "traffic_bytes_per_token": None,
        "logits_passes": None,
        "traffic_note": "",
        "matmul_flops": None,
        "loss": None,
        "model_bytes": None,
        "bytes_source": "",
        "achieved_bytes_per_s": None,
        "copy_fraction": None,
        "matmul_floor_ms": None,
        "floor_fraction": None,
        "x_fastest_ce": None,
        "fastest_ce": "",
        "ncu_dram_bytes": None,
    }


def run(provider: Provider, shape: Shape, settings: Settings, timing: bool = True, table: str = "step") -> List[Dict]:
    """The three phase records of one provider at one shape in one table ("step" or "loss"; status
    skipped/failed/oom with a note)."""
    if table not in TABLES:
        raise ValueError(f"table must be one of {TABLES}, got {table!r}")
    records = [_base_record(provider, shape, settings, p, table) for p in PHASES]

    def mark(status, note):
        for r in records:
            r["status"], r["note"] = status, note
        return records

    note = provider.unavailable(settings.device, shape)
    if note:
        return mark("skipped", note)
    interp = settings.interpreter
    if provider.triton and settings.device == "cpu" and not interp:
        return mark("skipped", "Triton on CPU needs TRITON_INTERPRET=1 before triton is imported")
    if table == "loss" and not provider.in_loss_table:
        return mark("skipped", "takes hidden states, not logits")
    try:
        if table == "step":
            step = provider.step(shape)
            args = make_inputs(shape, settings)
            leaves = list(args[:2])
        else:
            step = provider.loss(shape)
            args = make_logits(shape, settings)
            leaves = [args[0]]
        saved = args[0].detach().clone() if table == "loss" else None  # in-place providers overwrite logits

        def restore():
            for t in leaves:
                t.grad = None
            if saved is not None:
                with torch.no_grad():
                    args[0].copy_(saved)

        if settings.device == "cuda":  # compile / autotune outside every measurement
            step(*args).backward()
            restore()
            _sync(settings.device)
        traffic = provider.triton and interp
        # On CPU the FLOP counter rides along in the measured (interpreted, slow) run; on GPU it
        # gets its own run below, so a clash of its dispatch mode with a provider costs only FLOPs.
        nested_flops = provider.count_flops and settings.device != "cuda"
        fwd = instrumented(lambda: step(*args), settings, traffic, nested_flops)
        loss = fwd.pop("result")
        bwd = instrumented(loss.backward, settings, traffic, nested_flops)
        bwd.pop("result")
        loss_value = float(loss.detach().float())
        del loss
        restore()
        if provider.count_flops and not nested_flops:
            fwd["flops"], bwd["flops"] = _separate_flops(step, args)
            restore()
        phases = {"forward": fwd, "backward": bwd, "forward+backward": combine(fwd, bwd)}
    except Exception as exc:  # one provider failing must not end the run
        _clean(settings.device)
        return mark("oom" if _is_oom(exc) else "failed", _describe(exc))
    finally:
        _clean(settings.device)

    times, time_failure = {}, ""
    if timing and (settings.device == "cuda" or not provider.triton):
        grads = leaves
        try:  # a failure here (e.g. OOM from timing's repeated calls) keeps the memory figures
            times["forward"] = time_calls(lambda _: step(*args), settings, grads)
            times["backward"] = time_calls(lambda loss: loss.backward(), settings, grads, setup=lambda: step(*args))
            times["forward+backward"] = time_calls(lambda _: step(*args).backward(), settings, grads)
        except Exception as exc:
            time_failure = ("OOM while timing: " if _is_oom(exc) else "timing failed: ") + _describe(exc)
        finally:
            _clean(settings.device)

    element = args[0].element_size()
    logits_bytes = shape.tokens * shape.vocab * element
    modelled = model_bytes(provider.bytes_model, shape.tokens, shape.valid, shape.vocab, element)
    for r in records:
        m = phases[r["phase"]]
        r["peak_bytes"], r["largest_alloc_bytes"] = m["peak_bytes"], m["largest_alloc_bytes"]
        r["matmul_flops"], r["loss"] = m["flops"], loss_value
        if modelled:
            r["model_bytes"], r["bytes_source"] = modelled[r["phase"]], BYTES_SOURCES[provider.bytes_model]
        if m["loaded_bytes"] is not None:
            total = m["loaded_bytes"] + m["stored_bytes"]
            r.update(
                loaded_bytes=m["loaded_bytes"],
                stored_bytes=m["stored_bytes"],
                traffic_bytes=total,
                traffic_bytes_per_token=total / shape.tokens,
                logits_passes=total / logits_bytes,
            )
        elif provider.triton:
            r["traffic_note"] = "n/a (needs the interpreter: run with --device cpu)"
        else:
            r["traffic_note"] = "n/a (no Triton kernels)"
        if r["phase"] in times:
            r["time_ms_p20"], r["time_ms_p50"], r["time_ms_p80"] = times[r["phase"]]
        elif time_failure:
            r["time_note"] = time_failure
        elif not timing:
            r["time_note"] = "not timed (--no-timing)"
        else:
            r["time_note"] = "n/a (interpreter)"
    return records
