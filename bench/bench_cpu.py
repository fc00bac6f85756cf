"""Issue 20's CPU benchmark: every goal of the issue, measured side by side.

Each section times its contenders interleaved (one call of each in turn, per
repetition, after one warm-up call each) and reports median, mean and p90;
each call starts from fresh non-leaf logits (or hidden states) and takes the
loss and its gradient with torch.autograd.grad, as in training. A row's
speed-ups are PyTorch's median over its own (eager; torch.compile in the
`ce` section). At the end it prints each goal, met or not, and writes the CSV
and a plot (bench/report_cpu.py) under bench/results/.

    python bench/bench_cpu.py                 # all sections (an estimated 10-15 min on 2 idle cores)
    python bench/bench_cpu.py --quick         # small shapes, 3 repetitions: a smoke run
    python bench/bench_cpu.py --sections ce,linear --reps 21
"""
import argparse
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
from bench import RESULTS, device_name, write_csv
from report_cpu import report

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
COLUMNS = ["section", "device_name", "isa_flags", "cpu_isa", "torch_version", "threads", "thp", "date",
           "dtype", "shape", "mode", "provider", "reps", "median_ms", "mean_ms", "p90_ms", "mean_over_median",
           "speedup_vs_eager", "speedup_vs_compile"]
ISA_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_bf16", "avx512_fp16", "amx_bf16")


def isa_flags():
    """The CPU's vector-ISA flags that matter to the kernels (from /proc/cpuinfo)."""
    try:
        line = next(ln for ln in open("/proc/cpuinfo") if ln.startswith("flags"))
    except (OSError, StopIteration):
        return platform.machine()
    have = set(line.split(":", 1)[1].split())
    return " ".join(f for f in ISA_FLAGS if f in have) or "none"


def thp():
    """The host's transparent-huge-page settings: they decide the tail latency (docs/benchmarks.md)."""
    def word(name):
        try:
            text = open(f"/sys/kernel/mm/transparent_hugepage/{name}").read()
            return text[text.index("[") + 1:text.index("]")]
        except (OSError, ValueError):
            return "?"
    return f"enabled={word('enabled')} defrag={word('defrag')} FSCE_HUGE_PAGES={os.environ.get('FSCE_HUGE_PAGES', 'auto')}"


# ---- contenders: each returns the tensors whose gradients a training step needs ----

def ce_case(shape, dtype):
    """Cross-entropy on fresh non-leaf logits of `shape` ((N, C) or (N, C, d1, ...))."""
    base = torch.randn(shape, dtype=dtype)
    target = torch.randint(0, shape[1], (shape[0],) + tuple(shape[2:]))

    def make(fn):
        def call(mode):
            x = base.clone().requires_grad_(True) * 1  # non-leaf, as a model's logits
            loss = fn(x, target)
            if mode == "fwd+bwd":
                torch.autograd.grad(loss, x)
        return call
    return make


def ce_providers(make, with_compile, inplace):
    out = {"eager": make(F.cross_entropy), "fused": make(fce.cross_entropy)}
    if with_compile:
        out["compile"] = make(torch.compile(F.cross_entropy, dynamic=False))
    if inplace:
        out["fused_inplace"] = make(lambda x, y: fce.cross_entropy(x, y, inplace_backward=True))
    return out


def linear_providers(n, h, v, dtype):
    """linear_cross_entropy against F.linear_cross_entropy's default (options=None, the reference path)."""
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, h, generator=gen, dtype=dtype)
    w = (torch.randn(v, h, generator=gen, dtype=dtype) * h**-0.5).requires_grad_()
    y = torch.randint(0, v, (n,), generator=gen)

    def make(fn):
        def call(mode):
            x = hidden.clone().requires_grad_(True) * 1  # the last layer's output: a non-leaf
            loss = fn(x, w, y)
            if mode == "fwd+bwd":
                torch.autograd.grad(loss, (x, w))
        return call
    return {"eager": make(F.linear_cross_entropy), "fused": make(fce.linear_cross_entropy)}


# ---- sections: (name, dtype, shape, modes, providers factory) ----

def plan(quick):
    ce_shapes = [(512, 4096), (256, 32000)] if quick else [(4096, 32000), (2048, 128256)]
    spatial = [(2, 21, 32, 32), (8, 2, 16, 16), (1, 512, 128)] if quick else [
        (8, 21, 128, 128), (64, 2, 32, 32), (1, 4096, 512)]
    fp16 = [(512, 4096)] if quick else [(512, 4096), (4096, 32000)]
    fp64 = [(256, 4096)] if quick else [(4096, 32000)]
    linear = [(512, 4, 4096), (256, 64, 2048)] if quick else [
        (512, 4, 4096), (512, 8, 4096), (1024, 1024, 32000)]
    items = []
    for shape in ce_shapes:
        for dt in ("fp32", "bf16"):
            items.append(("ce", dt, shape, ["fwd+bwd"], lambda s=shape, d=dt: ce_providers(
                ce_case(s, DTYPES[d]), True, True)))
    for shape in spatial:
        for dt in ("fp32", "bf16"):
            items.append(("spatial", dt, shape, ["fwd", "fwd+bwd"], lambda s=shape, d=dt: ce_providers(
                ce_case(s, DTYPES[d]), False, False)))
    for shape in fp16:
        items.append(("fp16", "fp16", shape, ["fwd", "fwd+bwd"], lambda s=shape: ce_providers(
            ce_case(s, torch.float16), False, False)))
    for shape in fp64:
        items.append(("fp64", "fp64", shape, ["fwd", "fwd+bwd"], lambda s=shape: ce_providers(
            ce_case(s, torch.float64), False, False)))
    for n, h, v in linear:
        # PyTorch's reference bf16 GEMMs are emulated on the CPU: minutes per call at the LLM-like shape.
        for dt in ("fp32", "bf16") if h < 64 or quick else ("fp32",):
            items.append(("linear", dt, (n, h, v), ["fwd+bwd"], lambda s=(n, h, v), d=dt: linear_providers(
                *s, DTYPES[d])))
    return items


def interleaved(providers, mode, reps):
    """Per provider, the times (ms) of `reps` calls, one call of each provider in turn."""
    for call in providers.values():
        call(mode)  # warm-up (and compilation)
    times = {name: [] for name in providers}
    for _ in range(reps):
        for name, call in providers.items():
            t0 = time.perf_counter()
            call(mode)
            times[name].append((time.perf_counter() - t0) * 1e3)
    return times


def summary(times):
    """median, mean, p90 (linear interpolation between order statistics)."""
    return (statistics.median(times), statistics.fmean(times),
            statistics.quantiles(times, n=10, method="inclusive")[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small shapes and 3 repetitions: a smoke run")
    parser.add_argument("--reps", type=int, default=None, help="timed calls per provider and row (default 15; 3 quick)")
    parser.add_argument("--sections", default="ce,spatial,fp16,fp64,linear")
    parser.add_argument("--out", default=None, help="CSV path (default: bench/results/cpu-<device>-<date>-issue20.csv)")
    args = parser.parse_args()
    reps = max(2, args.reps or (3 if args.quick else 15))
    sections = args.sections.split(",")
    unknown = set(sections) - {item[0] for item in plan(True)}
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from ce, spatial, fp16, fp64, linear")
    name, date = device_name("cpu"), datetime.date.today().isoformat()
    slug = "".join(ch if ch.isalnum() else "-" for ch in name.lower()).strip("-")[:40]
    out = pathlib.Path(args.out) if args.out else RESULTS / f"cpu-{slug}-{date}-issue20{'-quick' if args.quick else ''}.csv"
    RESULTS.mkdir(parents=True, exist_ok=True)
    common = dict(device_name=name, isa_flags=isa_flags(), cpu_isa=fce.cpu_isa(), torch_version=torch.__version__,
                  threads=torch.get_num_threads(), thp=thp(), date=date, reps=reps)
    print(", ".join(f"{k}={v}" for k, v in common.items()), file=sys.stderr)
    rows = []
    items = [item for item in plan(args.quick) if item[0] in sections]
    for i, (section, dt, shape, modes, factory) in enumerate(items, 1):
        providers = factory()
        for mode in modes:
            stats = {p: summary(t) for p, t in interleaved(providers, mode, reps).items()}
            for provider, (median, mean, p90) in stats.items():
                vs = {f"speedup_vs_{base}": f"{stats[base][0] / median:.2f}" if base in stats else ""
                      for base in ("eager", "compile")}
                rows.append(dict(common, section=section, dtype=dt, shape="x".join(map(str, shape)), mode=mode,
                                 provider=provider, median_ms=f"{median:.3f}", mean_ms=f"{mean:.3f}",
                                 p90_ms=f"{p90:.3f}", mean_over_median=f"{mean / median:.3f}", **vs))
                r = rows[-1]
                print(f"[{i}/{len(items)}] {section:8s} {dt} {r['shape']:>16s} {mode:8s} {provider:14s} "
                      f"median {median:9.2f}  mean {mean:9.2f}  p90 {p90:9.2f} ms  "
                      f"x{r['speedup_vs_eager'] or '-'} eager  x{r['speedup_vs_compile'] or '-'} compile",
                      file=sys.stderr, flush=True)
        del providers
        write_csv(out, COLUMNS, rows)  # after each item: a partial run keeps its rows
    print(report(out))


if __name__ == "__main__":
    main()
