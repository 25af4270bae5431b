"""Command line of ``python -m benchmarks``.

Runs providers x shapes x {forward, backward, forward+backward} in two tables per shape, the loss
on given logits and the full lm_head step, sized for the machine: real Llama-3 / Qwen2.5 / Gemma-2
lm_head shapes on a GPU (plus Llama-3 with half the labels ignored), the same shapes divided by
{scale} on a CPU (where Triton kernels run in the interpreter, so they get memory and traffic
figures but no timings). Each run measures its own copy bandwidth and matmul rates for the
roofline columns. Prints Markdown tables and writes a CSV and two PNG plots to --out.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def _csv(text: str):
    return [t.strip() for t in text.split(",") if t.strip()]


def parse_args(argv=None):
    from .shapes import CPU_SCALE

    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=__doc__.replace("{scale}", str(CPU_SCALE)),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="auto: cuda when available, else cpu with the Triton interpreter",
    )
    p.add_argument(
        "--providers",
        type=_csv,
        default=None,
        help="comma-separated provider names (default: all on GPU, the CPU set on CPU; see --list)",
    )
    p.add_argument("--models", type=_csv, default=None, help="comma-separated: llama3,qwen2.5,gemma2")
    p.add_argument(
        "--tokens",
        type=lambda s: [int(t) for t in _csv(s)],
        default=None,
        help="comma-separated token counts (every chosen model at each)",
    )
    p.add_argument(
        "--grid",
        choices=("default", "all"),
        default="default",
        help="default: each model at the middle token count + a token sweep of the first; all: every pair",
    )
    p.add_argument(
        "--shape",
        action="append",
        default=None,
        metavar="T,V,H[,softcap]",
        help="a custom shape (repeatable); replaces the model grid",
    )
    p.add_argument(
        "--quick", action="store_true", help="one small shape and fewer timing repetitions (well under a minute on CPU)"
    )
    p.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        default=None,
        help="default: bfloat16 on GPU, float32 on CPU",
    )
    p.add_argument("--no-timing", action="store_true", help="memory, traffic and FLOPs only")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads for a CPU run (default 1: repeatable timings on a shared machine)",
    )
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})")
    p.add_argument(
        "--tables",
        type=_csv,
        default=["loss", "step"],
        help="comma-separated: loss (loss on given logits), step (lm_head step); default both",
    )
    p.add_argument("--no-masked", action="store_true", help="leave out the shape with half the labels ignored")
    p.add_argument(
        "--ncu",
        action="store_true",
        help="also read DRAM bytes per kernel with Nsight Compute (GPU, ncu on PATH; minutes per provider and shape)",
    )
    p.add_argument(
        "--plots-from",
        metavar="CSV",
        default=None,
        help="only redraw the plots of an earlier run's benchmark.csv into --out, then exit",
    )
    p.add_argument("--list", action="store_true", help="list the providers and exit")
    return p.parse_args(argv)


def choose_device(requested: str) -> str:
    """Decide the device and, for CPU, switch the Triton interpreter on before triton is imported.

    Importing torch does not import triton, so this is still early enough as long as no kernel
    module (gem_kernels, liger_kernel, cut_cross_entropy) was imported yet.
    """
    import torch

    device = requested
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    if device == "cpu":
        already = [m for m in ("gem_kernels.ops", "liger_kernel.ops", "cut_cross_entropy") if m in sys.modules]
        if already and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
            print(
                f"warning: {already} imported before the interpreter was switched on; "
                f"their Triton providers will be skipped",
                file=sys.stderr,
            )
        os.environ["TRITON_INTERPRET"] = "1"
        os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # silences triton 3.9's default-change warning
    return device


def _ncu(records, shape_list, args, device) -> list:
    """Fill ncu_dram_bytes of each ok forward+backward record; return Markdown lines per kernel."""
    from . import ncu

    if device != "cuda":
        print("--ncu: skipped (Nsight Compute profiles GPU kernels; this run is on the CPU)", file=sys.stderr)
        return []
    if ncu.ncu_path() is None:
        print("--ncu: skipped (ncu not found on PATH; it ships with the CUDA toolkit)", file=sys.stderr)
        return ["\nNsight Compute: not run (ncu not found on PATH).\n"]
    by_label = {s.label: s for s in shape_list}
    lines = ["\n## Nsight Compute: DRAM bytes (read + write) per kernel, one forward + backward\n"]
    for r in records:
        if r["phase"] != "forward+backward" or r["status"] != "ok":
            continue
        total, note, kernels = ncu.measure(r["provider"], by_label[r["shape"]], r["table"], r["dtype"])
        r["ncu_dram_bytes"] = total
        lines.append(
            f"\n{r['shape']} | {r['table']} | {r['provider']}: "
            + (f"{total:,} bytes" if total is not None else note)
            + "\n"
        )
        lines += [f"- {name[:100]}: {b:,}\n" for name, b in kernels]
    return lines


def main(argv=None) -> int:
    args = parse_args(argv)
    device = choose_device(args.device)

    import torch

    from . import providers as prov
    from . import report, roofline, runner, shapes

    if args.plots_from:
        records, meta = report.read_csv(args.plots_from)
        os.makedirs(args.out, exist_ok=True)
        print("wrote " + ", ".join(report.plots(records, meta, args.out)), file=sys.stderr)
        return 0
    if args.list:
        for p in prov.PROVIDERS:
            note = p.unavailable(device)
            print(f"{p.name:20s} {p.kind:6s} {p.description}" + (f"  [{note}]" if note else ""))
        return 0
    chosen = prov.select(args.providers, device)
    if args.shape:
        shape_list = [shapes.parse_shape(s) for s in args.shape]
    else:
        shape_list = shapes.grid(
            device,
            which="quick" if args.quick else args.grid,
            models=args.models,
            tokens=args.tokens,
            masked=not args.no_masked,
        )
    tables = [t for t in runner.TABLES if t in args.tables]
    if not tables or set(args.tables) - set(runner.TABLES):
        raise ValueError(f"--tables takes {runner.TABLES}, got {args.tables}")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device == "cuda" else torch.float32)
    if device == "cpu":
        torch.set_num_threads(args.threads)
    settings = runner.Settings(
        device=device, dtype=dtype, cpu_reps=10 if args.quick else 20, cpu_budget_s=0.1 if args.quick else 0.25
    )
    command = "python -m benchmarks" + "".join(
        " " + shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])
    )
    meta = report.machine_info(device, command)
    meta["torch_threads"] = str(torch.get_num_threads()) if device == "cpu" else ""

    start = time.perf_counter()
    calib = None
    if not args.no_timing:
        calib = roofline.copy_bandwidth(device)
        roofline.matmul_rate(calib, shape_list, dtype)
    records = []
    work = [(s, t, p) for s in shape_list for t in tables for p in chosen if t == "step" or p.in_loss_table]
    bar = report.progress(len(work))
    for shape, table, p in work:
        bar.set_description(f"{shape.label} | {table} | {p.name}")
        records += runner.run(p, shape, settings, timing=not args.no_timing, table=table)
        bar.update(1)
    bar.close()
    kernels = _ncu(records, shape_list, args, device) if args.ncu else []
    ce_names = [p.name for p in prov.PROVIDERS if p.computes == "ce"]
    roofline.derive(records, calib, ce_names)
    elapsed = time.perf_counter() - start

    os.makedirs(args.out, exist_ok=True)
    meta["wall_time_s"] = f"{elapsed:.0f}"
    if calib is not None:
        meta["copy_bytes_per_s"] = f"{calib.copy_bytes_per_s:.4g}"
    text = report.markdown(
        records, meta, calib.describe() if calib else "", calib.matmul_flops_per_s if calib else None
    )
    text += "".join(kernels) + f"\nWall time of the run: {elapsed:.0f} s.\n"
    print(text)
    with open(os.path.join(args.out, "benchmark.md"), "w") as f:
        f.write(text)
    report.write_csv(records, meta, os.path.join(args.out, "benchmark.csv"))
    written = [os.path.join(args.out, n) for n in ("benchmark.md", "benchmark.csv")]
    if not args.no_plots:
        written += report.plots(records, meta, args.out)
    print("wrote " + ", ".join(written), file=sys.stderr)
    return 0
