"""Benchmark: fused_softmax_ce against torch eager, torch.compile and Liger.

Writes one CSV row per (shape, dtype, provider, mode) under bench/results/,
prints a table, and draws a PNG from the CSV (bench/plot.py).

    python bench/bench.py            # quick default on this device
    python bench/bench.py --full     # the whole sweep
"""
import argparse
import csv
import datetime
import os
import pathlib
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import fused_softmax_ce as fce

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
COLUMNS = ["device_name", "torch_version", "date", "dtype", "n_rows", "n_classes", "provider",
           "mode", "median_ms", "gbps", "peak_mem_mb", "copy_gbps"]
MODES = ["fwd", "bwd", "fwd+bwd"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def device_name(device):
    if device == "cuda":
        return torch.cuda.get_device_name()
    model = platform.processor() or "cpu"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model} ({os.cpu_count()} cores)"


def shapes(device, full):
    if device == "cuda":
        ns = [4096, 8192, 16384] if full else [4096, 16384]
        cs = [32000, 50257, 128256, 151936, 256000] if full else [32000, 128256, 256000]
        return [(n, c) for n in ns for c in cs]
    quick = [(4096, 32000), (2048, 128256)]
    return quick + [(8192, 50257)] if full else quick


class PeakMemory:
    """Peak memory of one measured call: CUDA's allocator, or the process's RSS high-water mark."""

    def __init__(self, device):
        self.device = device

    def __enter__(self):
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
            self.base = self._rss("VmRSS")
        return self

    def __exit__(self, *exc):
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.mb = (torch.cuda.max_memory_allocated() - self.base) / 2**20
        else:
            self.mb = (self._rss("VmHWM") - self.base) / 2**20

    @staticmethod
    def _rss(field):
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1]) * 1024
        return 0


def timed(device, fn):
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def providers(device):
    def liger():
        try:
            from liger_kernel.transformers import LigerCrossEntropyLoss
        except ImportError:
            return None
        return LigerCrossEntropyLoss()

    compiled = torch.compile(F.cross_entropy, dynamic=False)
    out = {
        "fused": lambda x, y: fce.cross_entropy(x, y),
        "fused_inplace": lambda x, y: fce.cross_entropy(x, y, inplace_backward=True),
        "torch": F.cross_entropy,
        "torch_compile": compiled,
    }
    liger_loss = liger() if device == "cuda" else None
    if liger_loss is not None:
        out["liger"] = liger_loss
    return out


def measure(device, fn, base, target, mode, reps):
    """Median time of one mode; every repetition starts from fresh logits.

    The gradient is taken with torch.autograd.grad, as a model's logits pass
    theirs on to the layer below: no .grad accumulation is timed.
    """
    times, peak = [], 0.0

    def fresh():
        return base.clone().requires_grad_(True)

    for i in range(reps + 1):
        x = fresh()
        with PeakMemory(device) as mem:
            if mode == "fwd":
                t = timed(device, lambda: fn(x, target))
            elif mode == "bwd":
                loss = fn(x, target)
                t = timed(device, lambda: torch.autograd.grad(loss, x))
            else:
                t = timed(device, lambda: torch.autograd.grad(fn(x, target), x))
        if i > 0:  # the first is warm-up (and compilation)
            times.append(t)
            peak = max(peak, mem.mb)
        del x
    return statistics.median(times), peak


def copy_gbps(device, base, reps):
    dst = torch.empty_like(base)
    ms = statistics.median(timed(device, lambda: dst.copy_(base)) for _ in range(reps + 1))
    return 2 * base.numel() * base.element_size() / ms / 1e6


def bytes_moved(provider, mode, n, c, elem):
    per_pass = n * c * elem
    if mode == "fwd":
        return per_pass
    if provider == "fused_inplace":
        return 2 * per_pass if mode == "fwd+bwd" else per_pass
    return 2 * per_pass if mode == "bwd" else 3 * per_pass


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="the whole sweep of shapes")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions per row")
    parser.add_argument("--out", default=None, help="CSV path (default: bench/results/<device>-<date>.csv)")
    args = parser.parse_args()
    device = args.device
    reps = args.reps or (20 if device == "cuda" else 7)
    name, date = device_name(device), datetime.date.today().isoformat()
    RESULTS.mkdir(parents=True, exist_ok=True)
    slug = "".join(ch if ch.isalnum() else "-" for ch in name.lower()).strip("-")[:40]
    out = pathlib.Path(args.out) if args.out else RESULTS / f"{device}-{slug}-{date}.csv"

    impls = providers(device)
    plan = [(n, c, dt) for n, c in shapes(device, args.full) for dt in DTYPES]
    total = len(plan) * len(impls) * len(MODES)
    rows, done = [], 0
    print(f"{name}, torch {torch.__version__}, {total} measurements", file=sys.stderr)
    for n, c, dt_name in plan:
        dtype = DTYPES[dt_name]
        try:
            base = torch.randn(n, c, device=device, dtype=dtype)
            target = torch.randint(0, c, (n,), device=device)
            copy = copy_gbps(device, base, reps)
        except torch.OutOfMemoryError:
            print(f"skip {n}x{c} {dt_name}: out of memory", file=sys.stderr)
            continue
        for provider, fn in impls.items():
            for mode in MODES:
                done += 1
                try:
                    ms, peak = measure(device, fn, base, target, mode, reps)
                except torch.OutOfMemoryError:
                    print(f"[{done}/{total}] {provider} {mode} {n}x{c} {dt_name}: out of memory", file=sys.stderr)
                    continue
                gbps = bytes_moved(provider, mode, n, c, base.element_size()) / ms / 1e6
                row = dict(device_name=name, torch_version=torch.__version__, date=date, dtype=dt_name,
                           n_rows=n, n_classes=c, provider=provider, mode=mode, median_ms=f"{ms:.3f}",
                           gbps=f"{gbps:.1f}", peak_mem_mb=f"{peak:.1f}", copy_gbps=f"{copy:.1f}")
                rows.append(row)
                print(f"[{done}/{total}] {dt_name} {n}x{c} {provider:14s} {mode:8s} {ms:9.2f} ms "
                      f"{gbps:7.1f} GB/s  peak {peak:8.1f} MB", file=sys.stderr, flush=True)
        del base, target
    with open(out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    print_table(rows)
    print(f"\nCSV: {out}")
    from plot import plot

    print(f"plot: {plot(out)}")


def print_table(rows):
    print(f"\n{'dtype':5s} {'shape':>14s} {'provider':14s} {'mode':8s} {'ms':>9s} {'GB/s':>7s} {'peak MB':>9s}")
    for r in rows:
        shape = f"{r['n_rows']}x{r['n_classes']}"
        print(f"{r['dtype']:5s} {shape:>14s} {r['provider']:14s} {r['mode']:8s} {r['median_ms']:>9s} "
              f"{r['gbps']:>7s} {r['peak_mem_mb']:>9s}")


if __name__ == "__main__":
    main()
