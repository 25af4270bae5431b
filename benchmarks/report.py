"""Outputs of a benchmark run: Markdown tables (stdout), a CSV with the machine, and PNG plots."""

from __future__ import annotations

import csv
import datetime
import os
import platform
import sys
from importlib import metadata
from typing import Dict, List, Optional, Sequence

import torch

MIB = 2**20


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: str, command: str) -> Dict[str, str]:
    """What produced the numbers: hardware, versions, date (UTC) and the command line."""
    import gem_kernels

    info = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "device": device,
        "gpu": torch.cuda.get_device_name() if device == "cuda" else "",
        "cpu": _cpu_name(),
        "cpu_cores": str(os.cpu_count()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "gem_kernels": getattr(gem_kernels, "__version__", _version("gem-kernels")),
        "liger_kernel": _version("liger-kernel"),
        "cut_cross_entropy": _version("cut-cross-entropy"),
        "trl": _version("trl"),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", ""),
        "command": command,
    }
    return info


def write_csv(records: Sequence[Dict], meta: Dict[str, str], path: str) -> None:
    """One row per (provider, shape, phase); every row also carries the machine/version columns."""
    if not records:
        return
    fields = list(records[0]) + [k for k in meta if k not in records[0]]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in records:
            w.writerow({**meta, **{k: ("" if v is None else v) for k, v in r.items()}})


def read_csv(path: str):
    """(records, meta) of a benchmark.csv written by ``write_csv`` (numbers parsed back), e.g. to
    redraw its plots with ``python -m benchmarks --plots-from CSV``."""
    ints = ("tokens", "vocab", "hidden", "valid_tokens")
    floats = ("ignore_frac", "peak_bytes", "largest_alloc_bytes", "time_ms_p20", "time_ms_p50", "time_ms_p80")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for k in ints:
            r[k] = int(r[k])
        for k in floats:
            r[k] = float(r[k]) if r.get(k) not in (None, "") else None
    meta = {k: rows[0][k] for k in ("device", "gpu", "cpu", "cpu_cores", "date_utc", "command")} if rows else {}
    return rows, meta


def _mib(b) -> str:
    if b is None:
        return ""
    v = b / MIB
    return f"{v:.1f}" if abs(v) >= 10 else f"{v:.2f}"


def _bytes(b, logits_bytes) -> str:
    """Bytes with their size in passes over the logits, e.g. '6.01 GiB (3.00 passes)'."""
    if b is None:
        return ""
    size = f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / MIB:.2f} MiB"
    return f"{size} ({b / logits_bytes:.2f} passes)"


def _time(r: Dict) -> str:
    if r["time_ms_p50"] is None:
        return r["time_note"]
    return f"{r['time_ms_p50']:.2f} ({r['time_ms_p20']:.2f}-{r['time_ms_p80']:.2f})"


def _pct(x) -> str:
    return "" if x is None else f"{100 * x:.0f}%" if x >= 0.1 else f"{100 * x:.1f}%"


def _x(r: Dict) -> str:
    return "" if r["x_fastest_ce"] is None else f"{r['x_fastest_ce']:.2f}"


def _shape_key(r: Dict):
    return r["shape"]


def _counted(r: Dict, device: str, logits_bytes: int) -> str:
    if r.get("ncu_dram_bytes") is not None:
        return _bytes(r["ncu_dram_bytes"], logits_bytes) + " ncu DRAM"
    if r["traffic_bytes"] is not None:
        return _bytes(r["traffic_bytes"], logits_bytes)
    return (
        "n/a (no Triton kernels)"
        if r["traffic_note"] == "n/a (no Triton kernels)"
        else ("n/a (interpreter off; --ncu reads DRAM bytes)" if device == "cuda" else "n/a")
    )


LOSS_HEAD = (
    "| provider | h | peak fwd+bwd MiB | fwd ms | bwd ms | fwd+bwd ms | fwd+bwd x fastest CE "
    "| logical bytes fwd+bwd | counted bytes fwd+bwd | GB/s | of copy bandwidth |"
)
STEP_HEAD = (
    "| provider | kind | h | peak fwd MiB | peak bwd MiB | peak fwd+bwd MiB | fwd ms | bwd ms | fwd+bwd ms "
    "| fwd+bwd x fastest CE | of matmul floor | GFLOP fwd+bwd | Triton logical bytes fwd+bwd "
    "| counted bytes fwd+bwd |"
)


def _row(table: str, name: str, f: Dict, b: Dict, fb: Dict, device: str, logits_bytes: int) -> str:
    counted = _counted(fb, device, logits_bytes)
    if table == "loss":
        gbps = "" if fb["achieved_bytes_per_s"] is None else f"{fb['achieved_bytes_per_s'] / 1e9:.0f}"
        return (
            f"| {name} | {fb['h'] or '-'} | {_mib(fb['peak_bytes'])} | {_time(f)} | {_time(b)} | {_time(fb)} "
            f"| {_x(fb)} | {_bytes(fb['model_bytes'], logits_bytes)} | {counted} | {gbps} "
            f"| {_pct(fb['copy_fraction'])} |"
        )
    gflop = f"{fb['matmul_flops'] / 1e9:.3f}" if fb["matmul_flops"] is not None else ""
    return (
        f"| {name} | {fb['kind']} | {fb['h'] or '-'} | {_mib(f['peak_bytes'])} | {_mib(b['peak_bytes'])} "
        f"| {_mib(fb['peak_bytes'])} | {_time(f)} | {_time(b)} | {_time(fb)} | {_x(fb)} "
        f"| {_pct(fb['floor_fraction'])} | {gflop} | {_bytes(fb['model_bytes'], logits_bytes)} | {counted} |"
    )


def header(meta: Dict[str, str], calib_text: str = "") -> List[str]:
    hw = (
        meta["gpu"]
        if meta["device"] == "cuda"
        else (f"{meta['cpu']} ({meta['cpu_cores']} cores, {meta.get('torch_threads', '?')} torch thread(s))")
    )
    interp = meta["triton_interpret"] not in ("", "0")
    lines = [
        f"# GEM / cross-entropy benchmark ({meta['date_utc']} UTC)",
        "",
        f"{hw}; torch {meta['torch']}, triton {meta['triton']}, gem_kernels {meta['gem_kernels']}, "
        f"liger-kernel {meta['liger_kernel']}, cut-cross-entropy {meta['cut_cross_entropy']}, "
        f"trl {meta.get('trl', '?')}"
        + ("; Triton kernels in the interpreter (TRITON_INTERPRET=1): not timed" if interp else ""),
        f"Command: `{meta['command']}`",
        "",
    ]
    if calib_text:
        lines += [f"Measured in this run: {calib_text}.", ""]
    lines += [
        "Two tables per shape. *Loss on given logits*: logits [T, V] -> mean loss -> d logits (the loss kernels "
        "alone). *lm_head step*: hidden [T, H], weight [V, H] -> mean loss -> d hidden, d weight (logits "
        "providers include the lm_head matmul; fused providers never hold [T, V]).",
        "Peak = MiB allocated during the call above what existed before it (inputs not counted). "
        "Time = ms p50 (p20-p80). x fastest CE = fwd+bwd time / that of the fastest cross-entropy provider "
        "of the same table. Logical bytes = global-memory bytes of the Triton kernels from their design "
        "(benchmarks/roofline.py; per-token terms of labels and statistics left out); counted bytes = what "
        "the Triton interpreter counts (CPU) or Nsight Compute reads from DRAM (--ncu, GPU). GB/s = logical "
        "bytes / time; of copy bandwidth = that over the copy bandwidth above. Of matmul floor = the time "
        "of 6 x valid tokens x H x V FLOPs at this shape's matmul rate above, over the time. GFLOP = matmul "
        "FLOPs seen by PyTorch (not those inside Triton kernels).",
        "",
    ]
    return lines


def markdown(
    records: Sequence[Dict], meta: Dict[str, str], calib_text: str = "", rates: Optional[Dict[str, float]] = None
) -> str:
    """Per shape: the loss-on-logits table, then the lm_head step table; a row per provider."""
    lines = header(meta, calib_text)
    shapes = list(dict.fromkeys(_shape_key(r) for r in records))
    titles = {"loss": "loss on given logits", "step": "lm_head step"}
    for key in shapes:
        rows = [r for r in records if _shape_key(r) == key]
        first = rows[0]
        cap = f", softcap {first['softcap']}" if first["softcap"] != "" else ""
        masked = (
            f", {first['tokens'] - first['valid_tokens']} of {first['tokens']} labels ignored"
            if first["valid_tokens"] != first["tokens"]
            else ""
        )
        element = torch.empty((), dtype=getattr(torch, first["dtype"])).element_size()
        logits_bytes = first["tokens"] * first["vocab"] * element
        lines += [
            f"## {first['model']}: T={first['tokens']}, V={first['vocab']}, H={first['hidden']}{cap}{masked}, "
            f"{first['dtype']} (logits [T, V] = {logits_bytes / MIB:.1f} MiB)",
            "",
        ]
        if rates and key in rates:
            lines += [f"Matmul rate of this shape's lm_head product: {rates[key] / 1e12:.1f} TFLOP/s.", ""]
        for table in ("loss", "step"):
            trows = [r for r in rows if r.get("table", "step") == table]
            if not trows:
                continue
            lines += [
                f"### {titles[table]}",
                "",
                LOSS_HEAD if table == "loss" else STEP_HEAD,
                "|" + "---|" + "---:|" * ((LOSS_HEAD if table == "loss" else STEP_HEAD).count("|") - 2),
            ]
            notes = []
            for name in dict.fromkeys(r["provider"] for r in trows):
                by_phase = {r["phase"]: r for r in trows if r["provider"] == name}
                f, b, fb = by_phase["forward"], by_phase["backward"], by_phase["forward+backward"]
                if fb["status"] == "skipped":
                    if fb["note"] != "takes hidden states, not logits":
                        notes.append(f"- {name}: skipped ({fb['note']})")
                    continue
                if fb["status"] != "ok":
                    cells = (LOSS_HEAD if table == "loss" else STEP_HEAD).count("|") - 3
                    lines.append(f"| {name} | {fb['status'].upper()} |" + " |" * cells)
                    notes.append(f"- {name}: {fb['status']} ({fb['note']})")
                    continue
                lines.append(_row(table, name, f, b, fb, meta["device"], logits_bytes))
            lines += [""] + notes + ([""] if notes else [])
    return "\n".join(lines)


def _series(records: Sequence[Dict], vary: str, fixed: str):
    """Forward+backward peaks of the step table over the largest group of unmasked shapes that share
    ``fixed`` and differ in ``vary`` (e.g. vary vocab at one token count).

    Returns (the fixed value, {provider: [(x, MiB)]}, {provider: [(x, why missing)]}, {x: model name})."""
    rows = [
        r
        for r in records
        if r["phase"] == "forward+backward" and r.get("table", "step") == "step" and not r.get("ignore_frac")
    ]
    groups: Dict = {}
    for r in rows:
        groups.setdefault(r[fixed], set()).add(r[vary])
    if not groups:
        return None, {}, {}, {}
    best = max(groups, key=lambda k: (len(groups[k]), k))
    series: Dict[str, List] = {}
    missing: Dict[str, List] = {}
    models = {}
    for r in rows:
        if r[fixed] != best:
            continue
        models[r[vary]] = r["model"]
        if r["status"] == "ok":
            series.setdefault(r["provider"], []).append((r[vary], r["peak_bytes"] / MIB))
        else:
            missing.setdefault(r["provider"], []).append((r[vary], f"{r['status']}: {r['note']}"))
    return best, {k: sorted(v) for k, v in series.items()}, missing, models


def _same(a, b, rel: float = 0.03) -> bool:
    """Series ``a`` would be drawn on top of ``b``: every x of ``a`` is in ``b`` with a y within ``rel``."""
    other = dict(b)
    return all(x in other and abs(y - other[x]) <= rel * max(abs(y), abs(other[x]), 1e-12) for x, y in a)


def plots(records: Sequence[Dict], meta: Dict[str, str], outdir: str) -> List[str]:
    """memory_vs_vocab.png and memory_vs_tokens.png: forward+backward peak of the lm_head step, one
    line per provider (GEM with h="linear"; the logsigmoid rows are in the tables), log scale. A
    plot needs at least two x values (it is skipped, with a message, otherwise); providers missing
    at a shape are marked x on the axis and listed under the plot; a line that coincides with
    another is drawn wider beneath it and named in the legend; on the vocabulary plot every point is
    labelled with its model, since H and the softcap change with it."""
    try:
        import matplotlib
    except ImportError:
        print("plots skipped: matplotlib is not installed (pip install matplotlib)", file=sys.stderr)
        return []
    matplotlib.use("Agg")
    import textwrap

    import matplotlib.pyplot as plt

    written = []
    hw = meta["gpu"] if meta["device"] == "cuda" else f"CPU ({meta['cpu_cores']} cores)"
    dtype = records[0]["dtype"] if records else ""
    records = [r for r in records if not r["provider"].endswith("-logsigmoid")]
    for vary, fixed, fname, xlabel in (
        ("vocab", "tokens", "memory_vs_vocab.png", "vocabulary size V"),
        ("tokens", "vocab", "memory_vs_tokens.png", "tokens T"),
    ):
        best, series, missing, models = _series(records, vary, fixed)
        xs_all = sorted(models)
        if len(xs_all) < 2:
            print(
                f"{fname} skipped: the run has a single {xlabel} (run the default grid for the sweep)", file=sys.stderr
            )
            continue
        fig, ax = plt.subplots(figsize=(10, 5.6))
        kinds = {r["provider"]: r["kind"] for r in records}
        markers = "osD^vPX*<>hp"
        drawn = []
        for i, (name, pts) in enumerate(series.items()):
            have = dict(pts)  # a missing x breaks the line (NaN) instead of bridging it
            ys = [have.get(x, float("nan")) for x in xs_all]
            twin = next((n for n, p in drawn if _same(pts, p)), None)
            style = dict(
                marker=markers[i % len(markers)],
                linestyle="--" if kinds[name] == "fused" else "-",
                label=name + (f" (same as {twin})" if twin else ""),
                alpha=0.9,
            )
            if twin:  # drawn wider and hollow beneath the line it coincides with
                style.update(linewidth=5, markersize=12, markerfacecolor="none", alpha=0.45, zorder=1)
            ax.plot(xs_all, ys, **style)
            drawn.append((name, pts))
        ax.set_yscale("log")
        foot = []
        axis_y = ax.get_xaxis_transform()  # x in data, y in axes fractions: marks sit on the x axis
        for name, gaps in missing.items():
            ax.plot(
                [x for x, _ in gaps],
                [0.0] * len(gaps),
                marker="x",
                color="red",
                markersize=8,
                linestyle="none",
                transform=axis_y,
                clip_on=False,
            )
            where = ", ".join(str(x) for x, _ in gaps)
            foot.append(f"{name} at {vary} = {where} ({gaps[0][1][:110]})")
        if vary == "vocab":
            for x in xs_all:
                ax.annotate(
                    models[x],
                    (x, 1.0),
                    xycoords=axis_y,
                    textcoords="offset points",
                    xytext=(0, 3),
                    ha="center",
                    fontsize=7,
                    color="dimgray",
                )
        ax.set_xlabel(xlabel)
        ax.set_ylabel("peak memory, forward+backward (MiB, log scale)")
        what = (
            f"models at T = {best}: H and softcap change with the model"
            if vary == "vocab"
            else f"{models[xs_all[0]]}, V = {best}"
        )
        ax.set_title(
            f"Peak memory of the lm_head step vs {xlabel}; GEM rows h=linear\n({what}; {hw}, {dtype})",
            fontsize=9,
            pad=14,
        )
        ax.grid(True, alpha=0.3, which="both")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
        wrapped = []
        if foot:
            for line in ["x = not measured:"] + foot:
                wrapped += textwrap.wrap(line, 170)
            fig.text(0.01, 0.01, "\n".join(wrapped), fontsize=6, va="bottom")
        fig.tight_layout(rect=(0, 0.02 + 0.02 * len(wrapped), 1, 1))
        path = os.path.join(outdir, fname)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def progress(total: int):
    """tqdm on stderr when installed, else a plain counter on stderr."""
    try:
        from tqdm import tqdm

        return tqdm(total=total, file=sys.stderr, unit="run", dynamic_ncols=True)
    except ImportError:
        return _PlainProgress(total)


class _PlainProgress:
    def __init__(self, total: int):
        self.total, self.n = total, 0

    def set_description(self, text: str) -> None:
        print(f"[{self.n + 1}/{self.total}] {text}", file=sys.stderr, flush=True)

    def update(self, k: int = 1) -> None:
        self.n += k

    def close(self) -> None:
        pass
