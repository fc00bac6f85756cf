"""Benchmark: fused_softmax_ce against torch eager, torch.compile and Liger.

Writes one CSV row per (shape, dtype, provider, mode) under bench/results/,
prints a table, and draws a PNG from the CSV (bench/plot.py).

    python bench/bench.py            # quick default on this device
    python bench/bench.py --full     # the whole sweep
    python bench/bench.py --autocast # bf16 logits under torch.autocast: ours vs torch
    python bench/bench.py --options  # the LLM options' cost over the plain fused path (bf16)
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
from memory import PeakMemory

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


def autocast_providers(device):
    """Under autocast PyTorch copies the logits to float32 first; we read them as they are."""
    compiled = torch.compile(F.cross_entropy, dynamic=False)

    def amp(fn):
        def run(x, y):
            with torch.autocast(device, dtype=x.dtype):
                return fn(x, y)
        return run

    return {"fused_amp": amp(fce.cross_entropy), "fused_inplace_amp": amp(
        lambda x, y: fce.cross_entropy(x, y, inplace_backward=True)), "torch_amp": amp(F.cross_entropy),
        "torch_compile_amp": amp(compiled)}


def option_providers(device):
    """The LLM options, each alone, against the plain fused path (and Liger's on CUDA)."""
    options = {"": {}, "_zloss": dict(z_loss_scale=1e-4), "_stats": dict(return_stats=True),
               "_softcap": dict(softcap=30.0), "_scale": dict(logit_scale=0.5)}

    def run(kwargs, inplace):
        def fn(x, y):
            out = fce.cross_entropy(x, y, inplace_backward=inplace, **kwargs)
            return out.loss if kwargs.get("return_stats") else out
        return fn

    out = {}
    for inplace in (False, True):
        for name, kwargs in options.items():
            out[f"fused{'_inplace' if inplace else ''}{name}"] = run(kwargs, inplace)
    try:
        from liger_kernel.transformers import LigerCrossEntropyLoss
    except ImportError:
        return out
    if device == "cuda":
        out["liger"] = LigerCrossEntropyLoss()
        out["liger_zloss"] = LigerCrossEntropyLoss(lse_square_scale=1e-4)
        out["liger_softcap"] = LigerCrossEntropyLoss(softcap=30.0)
    return out


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
        # A non-leaf, as a model's logits are (the in-place mode refuses leaves).
        return base.clone().requires_grad_(True) * 1

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
    parser.add_argument("--autocast", action="store_true",
                        help="bf16 logits under torch.autocast (writes <csv>-autocast.csv)")
    parser.add_argument("--options", action="store_true",
                        help="the LLM options at bf16 (writes <csv>-options.csv)")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions per row")
    parser.add_argument("--out", default=None, help="CSV path (default: bench/results/<device>-<date>.csv)")
    args = parser.parse_args()
    device = args.device
    reps = args.reps or (20 if device == "cuda" else 7)
    name, date = device_name(device), datetime.date.today().isoformat()
    RESULTS.mkdir(parents=True, exist_ok=True)
    slug = "".join(ch if ch.isalnum() else "-" for ch in name.lower()).strip("-")[:40]
    suffix = ("-full" if args.full else "") + ("-autocast" if args.autocast else "") + (
        "-options" if args.options else "")
    out = pathlib.Path(args.out) if args.out else RESULTS / f"{device}-{slug}-{date}{suffix}.csv"

    impls = autocast_providers(device) if args.autocast else (
        option_providers(device) if args.options else providers(device))
    dtypes = ["bf16"] if args.autocast or args.options else list(DTYPES)
    sizes = [(4096, 32000)] if args.options and device == "cpu" else shapes(device, args.full)
    plan = [(n, c, dt) for n, c in sizes for dt in dtypes]
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
    write_csv(out, COLUMNS, rows)
    print_table(rows)
    print(f"\nCSV: {out}")
    from plot import plot

    print(f"plot: {plot(out)}")


def write_csv(path, columns, rows):
    """The benchmark rows as a CSV, header first."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def print_table(rows):
    print(f"\n{'dtype':5s} {'shape':>14s} {'provider':14s} {'mode':8s} {'ms':>9s} {'GB/s':>7s} {'peak MB':>9s}")
    for r in rows:
        shape = f"{r['n_rows']}x{r['n_classes']}"
        print(f"{r['dtype']:5s} {shape:>14s} {r['provider']:14s} {r['mode']:8s} {r['median_ms']:>9s} "
              f"{r['gbps']:>7s} {r['peak_mem_mb']:>9s}")


if __name__ == "__main__":
    main()
