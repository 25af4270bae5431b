"""Outputs of a benchmark run: Markdown tables (stdout), a CSV with the machine, and PNG plots."""
from __future__ import annotations

import csv
import datetime
import os
import platform
import sys
from importlib import metadata
from typing import Dict, List, Sequence

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


def _mib(b) -> str:
    if b is None:
        return ""
    v = b / MIB
    return f"{v:.1f}" if abs(v) >= 10 else f"{v:.2f}"


def _time(r: Dict) -> str:
    if r["time_ms_p50"] is None:
        return r["time_note"]
    return f"{r['time_ms_p50']:.2f} ({r['time_ms_p20']:.2f}-{r['time_ms_p80']:.2f})"


def _shape_key(r: Dict):
    return (r["model"], r["tokens"], r["vocab"], r["hidden"], r["softcap"])


def markdown(records: Sequence[Dict], meta: Dict[str, str]) -> str:
    """One table per shape: a row per provider, columns per phase."""
    hw = meta["gpu"] if meta["device"] == "cuda" else (f"{meta['cpu']} ({meta['cpu_cores']} cores, "
                                                        f"{meta.get('torch_threads', '?')} torch thread(s))")
    lines = [f"# GEM / cross-entropy benchmark ({meta['date_utc']} UTC)", "",
             f"{hw}; torch {meta['torch']}, triton {meta['triton']}, gem_kernels {meta['gem_kernels']}, "
             f"liger-kernel {meta['liger_kernel']}, cut-cross-entropy {meta['cut_cross_entropy']}"
             + ("; Triton kernels in the interpreter (TRITON_INTERPRET=1): not timed" if meta["triton_interpret"]
                not in ("", "0") else ""),
             f"Command: `{meta['command']}`", "",
             "Peak = MiB allocated during the call above what existed before it (inputs not counted). "
             "Time = ms p50 (p20-p80). Traffic = global-memory bytes of the Triton kernels, as passes over "
             "the logits (bytes / (T*V*element size)) and bytes per token. GFLOP = matmul FLOPs seen by "
             "PyTorch (not those inside Triton kernels).", ""]
    shapes = []
    for r in records:
        if _shape_key(r) not in shapes:
            shapes.append(_shape_key(r))
    for key in shapes:
        rows = [r for r in records if _shape_key(r) == key]
        first = rows[0]
        cap = f", softcap {first['softcap']}" if first["softcap"] != "" else ""
        logits_mib = first["tokens"] * first["vocab"] * torch.empty((), dtype=getattr(torch, first["dtype"])).element_size() / MIB
        lines += [f"## {first['model']}: T={first['tokens']}, V={first['vocab']}, H={first['hidden']}{cap}, "
                  f"{first['dtype']} (logits [T, V] = {logits_mib:.1f} MiB)", "",
                  "| provider | peak fwd MiB | peak bwd MiB | peak fwd+bwd MiB | fwd ms | bwd ms | fwd+bwd ms "
                  "| traffic fwd+bwd (passes) | traffic B/token | GFLOP fwd+bwd |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        notes = []
        for name in dict.fromkeys(r["provider"] for r in rows):
            by_phase = {r["phase"]: r for r in rows if r["provider"] == name}
            f, b, fb = by_phase["forward"], by_phase["backward"], by_phase["forward+backward"]
            if fb["status"] == "skipped":
                notes.append(f"- {name}: skipped ({fb['note']})")
                continue
            if fb["status"] != "ok":
                lines.append(f"| {name} | {fb['status'].upper()} | | | | | | | | |")
                notes.append(f"- {name}: {fb['status']} ({fb['note']})")
                continue
            passes = f"{fb['logits_passes']:.3f}" if fb["logits_passes"] is not None else fb["traffic_note"]
            bpt = f"{fb['traffic_bytes_per_token']:,.0f}" if fb["traffic_bytes_per_token"] is not None else ""
            gflop = f"{fb['matmul_flops'] / 1e9:.3f}" if fb["matmul_flops"] is not None else ""
            lines.append(f"| {name} | {_mib(f['peak_bytes'])} | {_mib(b['peak_bytes'])} | {_mib(fb['peak_bytes'])} "
                         f"| {_time(f)} | {_time(b)} | {_time(fb)} | {passes} | {bpt} | {gflop} |")
        lines += [""] + notes + ([""] if notes else [])
    return "\n".join(lines)


def _series(records: Sequence[Dict], vary: str, fixed: str):
    """{provider: [(x, peak MiB)]} of forward+backward peaks over the largest group of shapes that
    share ``fixed`` and differ in ``vary`` (e.g. vary vocab at one token count)."""
    ok = [r for r in records if r["phase"] == "forward+backward" and r["status"] == "ok"]
    groups: Dict = {}
    for r in ok:
        groups.setdefault(r[fixed], set()).add(r[vary])
    if not groups:
        return None, {}
    best = max(groups, key=lambda k: (len(groups[k]), k))
    series: Dict[str, List] = {}
    for r in ok:
        if r[fixed] == best:
            series.setdefault(r["provider"], []).append((r[vary], r["peak_bytes"] / MIB))
    return best, {k: sorted(v) for k, v in series.items()}


def plots(records: Sequence[Dict], meta: Dict[str, str], outdir: str) -> List[str]:
    """memory_vs_vocab.png and memory_vs_tokens.png: forward+backward peak, one line per provider."""
    try:
        import matplotlib
    except ImportError:
        print("plots skipped: matplotlib is not installed (pip install matplotlib)", file=sys.stderr)
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    hw = meta["gpu"] if meta["device"] == "cuda" else f"CPU ({meta['cpu_cores']} cores)"
    for vary, fixed, fname, xlabel in (("vocab", "tokens", "memory_vs_vocab.png", "vocabulary size V"),
                                       ("tokens", "vocab", "memory_vs_tokens.png", "tokens T")):
        best, series = _series(records, vary, fixed)
        if not series:
            continue
        fig, ax = plt.subplots(figsize=(7, 4.5))
        kinds = {r["provider"]: r["kind"] for r in records}
        markers = "osD^vPX*<>"
        for i, (name, pts) in enumerate(series.items()):
            xs, ys = zip(*pts)
            # fused providers dashed; distinct markers so coinciding lines stay visible
            ax.plot(xs, ys, marker=markers[i % len(markers)], linestyle="--" if kinds[name] == "fused" else "-",
                    label=name, alpha=0.85)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("peak memory, forward+backward (MiB)")
        ax.set_title(f"Peak memory vs {xlabel} ({fixed} = {best}; {hw}, {records[0]['dtype']})", fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
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
