"""Benchmark of the fused linear + cross-entropy: time and peak memory of forward+backward.

Providers: fused_softmax_ce.linear_cross_entropy ("fused_linear"), and
torch.nn.functional.linear_cross_entropy's reference path (options=None,
"torch_linear") and chunked path (options=LinearCrossEntropyOptions(),
"torch_linear_chunked"). The gradients of input and linear_weight are taken
with torch.autograd.grad. Writes bench.py's CSV columns plus `hidden` under
bench/results/, and a PNG of peak memory against V.

Peak memory on the CPU: every measurement runs in a fresh subprocess in
which glibc hands each block over 64 KiB straight back to the kernel when it
is freed (MALLOC_MMAP_THRESHOLD_=65536), so the resident set follows the live
memory and no page freed earlier is silently reused. The peak is the
kernel's high-water mark VmHWM, reset (clear_refs) just before the call,
minus the resident set at that moment: what the call adds to the inputs,
the returned gradients included. On CUDA it is the caching allocator's peak.

    python bench/bench_linear.py            # (N, H, V) = (4096, 1024, 32000) and (2048, 1024, 128256)
    python bench/bench_linear.py --reps 1   # fewer calls per measurement
    python bench/bench_linear.py --shapes 2048,1024,128256 --dtypes bf16 --providers fused_linear --append
"""
import argparse
import csv
import datetime
import json
import os
import pathlib
import statistics
import subprocess
import sys

import torch
import torch.nn.functional as F

import fused_softmax_ce as fce
from bench import COLUMNS, DTYPES, RESULTS, PeakMemory, copy_gbps, device_name, timed, write_csv

SHAPES = [(4096, 1024, 32000), (2048, 1024, 128256)]
PROVIDERS = {
    "fused_linear": lambda x, w, y: fce.linear_cross_entropy(x, w, y),
    "torch_linear": lambda x, w, y: F.linear_cross_entropy(x, w, y, options=None),
    "torch_linear_chunked": lambda x, w, y: F.linear_cross_entropy(
        x, w, y, options=torch.nn.LinearCrossEntropyOptions()),
}
LINEAR_COLUMNS = COLUMNS + ["hidden"]


def inputs(n, h, v, dtype, device):
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(n, h, generator=gen, device=device, dtype=dtype).requires_grad_()
    w = (torch.randn(v, h, generator=gen, device=device, dtype=dtype) * h**-0.5).requires_grad_()
    y = torch.randint(0, v, (n,), generator=gen, device=device)
    return x, w, y


def measure_here(provider, n, h, v, dtype_name, device, reps):
    """Median ms and the first call's peak MB of `reps` forward+backward calls, in this process."""
    fn, dtype = PROVIDERS[provider], DTYPES[dtype_name]
    small = inputs(64, 32, 100, dtype, device)  # loads the kernels at a negligible size
    torch.autograd.grad(fn(*small), small[:2])
    x, w, y = inputs(n, h, v, dtype, device)
    times, peaks = [], []
    for _ in range(reps):
        with PeakMemory(device) as mem:
            grads = []
            times.append(timed(device, lambda: grads.extend(torch.autograd.grad(fn(x, w, y), (x, w)))))
        peaks.append(mem.mb)
        del grads
    return statistics.median(times), peaks[0], copy_gbps(device, w.detach(), 3)


def measure(provider, n, h, v, dtype_name, device, reps):
    if device != "cpu":
        return measure_here(provider, n, h, v, dtype_name, device, reps)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    cmd = [sys.executable, __file__, "--one", json.dumps([provider, n, h, v, dtype_name, reps])]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{provider} {n}x{h}x{v} {dtype_name} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def plot_memory(csv_path):
    """Peak memory against V, one line per provider and dtype."""
    from plot import plt, save_figure

    csv_path = pathlib.Path(csv_path)
    rows = list(csv.DictReader(open(csv_path)))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    # One colour and marker per provider, one line style per dtype; overlapping lines stay visible.
    for i, provider in enumerate(sorted({r["provider"] for r in rows})):
        for dtype, style in (("fp32", "-"), ("bf16", "--")):
            pts = sorted((int(r["n_classes"]), float(r["peak_mem_mb"])) for r in rows
                         if r["provider"] == provider and r["dtype"] == dtype)
            if pts:
                ax.plot(*zip(*pts), style, color=f"C{i}", marker="os^"[i % 3], markersize=9 - 2 * i,
                        label=f"{provider} {dtype}")
    ax.set_xlabel("V (classes); N = 4096 at V = 32000, 2048 at V = 128256; H = 1024")
    ax.set_ylabel("peak memory over the inputs (MB), lower is better")
    return save_figure(fig, ax, rows, csv_path)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--reps", type=int, default=2, help="forward+backward calls per measurement")
    parser.add_argument("--providers", default=",".join(PROVIDERS))
    parser.add_argument("--dtypes", default=",".join(DTYPES))
    parser.add_argument("--shapes", default=";".join(",".join(map(str, s)) for s in SHAPES), help="N,H,V;N,H,V")
    parser.add_argument("--append", action="store_true", help="keep the rows already in the CSV")
    parser.add_argument("--out", default=None, help="CSV path (default: bench/results/<device>-<name>-<date>-linear.csv)")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # a CPU subprocess's measurement
    args = parser.parse_args()
    if args.one:
        provider, n, h, v, dtype_name, reps = json.loads(args.one)
        print(json.dumps(measure_here(provider, n, h, v, dtype_name, "cpu", reps)))
        return

    device = args.device
    name, date = device_name(device), datetime.date.today().isoformat()
    RESULTS.mkdir(parents=True, exist_ok=True)
    slug = "".join(ch if ch.isalnum() else "-" for ch in name.lower()).strip("-")[:40]
    out = pathlib.Path(args.out) if args.out else RESULTS / f"{device}-{slug}-{date}-linear.csv"
    rows = list(csv.DictReader(open(out))) if args.append and out.exists() else []
    for n, h, v in (map(int, shape.split(",")) for shape in args.shapes.split(";")):
        for dtype_name in args.dtypes.split(","):
            elem = torch.empty((), dtype=DTYPES[dtype_name]).element_size()
            for provider in args.providers.split(","):
                ms, peak, copy = measure(provider, n, h, v, dtype_name, device, args.reps)
                moved = 2 * (n * h + v * h) * elem  # read input and weight, write their gradients
                rows.append(dict(device_name=name, torch_version=torch.__version__, date=date, dtype=dtype_name,
                                 n_rows=n, n_classes=v, provider=provider, mode="fwd+bwd",
                                 median_ms=f"{ms:.1f}", gbps=f"{moved / ms / 1e6:.2f}",
                                 peak_mem_mb=f"{peak:.1f}", copy_gbps=f"{copy:.1f}", hidden=h))
                print(f"{dtype_name} {n}x{h}x{v} {provider:21s} {ms:10.1f} ms  peak {peak:8.1f} MB",
                      file=sys.stderr, flush=True)
                write_csv(out, LINEAR_COLUMNS, rows)  # after each row: a partial run keeps its rows
    print(f"CSV: {out}\nplot: {plot_memory(out)}")


if __name__ == "__main__":
    main()
