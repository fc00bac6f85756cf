"""Benchmark of the generalized JSD (distillation) on the CPU: time and peak memory of forward+backward.

Providers, for student/teacher logits (N, V):
  fused     fused_softmax_ce.generalized_jsd
  eager     TRL's generalized_jsd_loss formula in PyTorch (tests/jsd_reference.trl_jsd)
  compiled  the same under torch.compile
and for the linear form, hidden states (N, H_s), (N, H_t) and heads (V, H):
  fused_linear     fused_softmax_ce.linear_generalized_jsd (chunked: no N x V logits)
  eager_linear     two F.linear, then trl_jsd
  compiled_linear  the same under torch.compile
The gradient is the student's (logits; or input and weight). beta = 0.5, T = 2.

Time: every provider is timed in one process, the providers interleaved
round by round (this machine is shared: the medians of interleaved rounds
see the same load); the 1-minute load average is recorded per row. Peak
memory: each provider in a fresh subprocess whose glibc returns every block
over 64 KiB to the kernel when freed (MALLOC_MMAP_THRESHOLD_), so that the
resident set follows live memory: the kernel's high-water mark VmHWM, reset
(clear_refs) just before one forward+backward, minus the resident set then,
after a warm-up call (compilation included).

    python bench/bench_jsd.py                 # the default shapes, fp32 and bf16
    python bench/bench_jsd.py --rounds 3 --dtypes fp32
"""
import argparse
import datetime
import json
import os
import pathlib
import statistics
import subprocess
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "tests"))
import fused_softmax_ce as fce  # noqa: E402
from bench import DTYPES, RESULTS, device_name, timed, write_csv  # noqa: E402
from jsd_reference import trl_jsd  # noqa: E402

BETA, T = 0.5, 2.0
LOGIT_SHAPES = [(1024, 32000), (256, 128256)]  # (N, V)
LINEAR_SHAPES = [(1024, 512, 1024, 32000)]  # (N, H_s, H_t, V)
COLUMNS = ["device_name", "isa", "torch_version", "date", "dtype", "form", "n_rows", "n_classes", "hidden",
           "provider", "mode", "median_ms", "min_ms", "rounds", "peak_mem_mb", "load_1min"]

_compiled = {}


def _compiled_trl():
    if "trl" not in _compiled:
        _compiled["trl"] = torch.compile(trl_jsd)
    return _compiled["trl"]


def _linear_trl(fn):
    return lambda xs, ws, xt, wt, y: fn(F.linear(xs, ws), F.linear(xt, wt), y, beta=BETA, temperature=T)


PROVIDERS = {
    "fused": lambda s, t, y: fce.generalized_jsd(s, t, y, beta=BETA, temperature=T),
    "eager": lambda s, t, y: trl_jsd(s, t, y, beta=BETA, temperature=T),
    "compiled": lambda s, t, y: _compiled_trl()(s, t, y, beta=BETA, temperature=T),
    "fused_linear": lambda xs, ws, xt, wt, y: fce.linear_generalized_jsd(xs, ws, xt, wt, y, beta=BETA,
                                                                         temperature=T),
    "eager_linear": lambda *a: _linear_trl(trl_jsd)(*a),
    "compiled_linear": lambda *a: _linear_trl(_compiled_trl())(*a),
}
FORMS = {"logits": ("fused", "eager", "compiled"), "linear": ("fused_linear", "eager_linear", "compiled_linear")}


def inputs(form, shape, dtype):
    """(args, the tensors to differentiate) with a fixed seed; a quarter of the labels ignored."""
    g = torch.Generator().manual_seed(0)
    n = shape[0]
    y = torch.randint(0, 100, (n,), generator=g)
    y[::4] = -100
    if form == "logits":
        _, v = shape
        s = (torch.randn(n, v, generator=g) * 3).to(dtype).requires_grad_()
        t = (torch.randn(n, v, generator=g) * 3).to(dtype)
        return (s, t, y), (s,)
    _, hs, ht, v = shape
    xs = torch.randn(n, hs, generator=g).to(dtype).requires_grad_()
    ws = (torch.randn(v, hs, generator=g) * hs ** -0.5 * 3).to(dtype).requires_grad_()
    xt = torch.randn(n, ht, generator=g).to(dtype)
    wt = (torch.randn(v, ht, generator=g) * ht ** -0.5 * 3).to(dtype)
    return (xs, ws, xt, wt, y), (xs, ws)


def step(provider, args, wrt):
    return torch.autograd.grad(PROVIDERS[provider](*args), wrt)


def times(form, shape, dtype_name, rounds):
    """{provider: [ms per round]}: the providers interleaved round by round, after a warm-up each."""
    args, wrt = inputs(form, shape, DTYPES[dtype_name])
    out = {p: [] for p in FORMS[form]}
    for p in out:
        step(p, args, wrt)
    for _ in range(rounds):
        for p in out:
            out[p].append(timed("cpu", lambda: step(p, args, wrt)))
    return out


def _status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB -> MB
    raise RuntimeError(f"no {field} in /proc/self/status")


def peak_here(provider, form, shape, dtype_name):
    args, wrt = inputs(form, shape, DTYPES[dtype_name])
    step(provider, args, wrt)  # warm-up (and compilation)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident set
    base = _status("VmRSS")
    grads = step(provider, args, wrt)
    peak = _status("VmHWM") - base
    del grads
    return peak


def peak(provider, form, shape, dtype_name):
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    cmd = [sys.executable, __file__, "--one", json.dumps([provider, form, shape, dtype_name])]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{provider} {shape} {dtype_name} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def isa():
    flags = next((line for line in open("/proc/cpuinfo") if line.startswith("flags")), "")
    return "AVX-512" if " avx512f" in flags else ("AVX2" if " avx2" in flags else "baseline")


def plot(csv_rows, path):
    from plot import plt, save_figure

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.5))
    groups = sorted({(r["form"], r["dtype"], r["n_rows"], r["n_classes"]) for r in csv_rows})
    labels = [f"{f} {d}\n{n}x{v}" for f, d, n, v in groups]
    for k, (metric, ax, unit) in enumerate((("median_ms", ax_t, "fwd+bwd median time (ms)"),
                                            ("peak_mem_mb", ax_m, "peak memory over the inputs (MB)"))):
        for i, role in enumerate(("fused", "eager", "compiled")):
            vals = [next((float(r[metric]) for r in csv_rows if (r["form"], r["dtype"], r["n_rows"], r["n_classes"])
                          == g and r["provider"].split("_")[0] == role), 0.0) for g in groups]
            ax.bar([j + i * 0.27 for j in range(len(groups))], vals, 0.27, label=role, color=f"C{i}")
        ax.set_xticks([j + 0.27 for j in range(len(groups))])
        ax.set_xticklabels(labels, fontsize=7)
        ax.set_ylabel(unit + ", lower is better")
        if k == 0:
            save_ax = ax
    ax_m.legend(fontsize=8)
    return save_figure(fig, save_ax, csv_rows, path)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--forms", default="logits,linear")
    parser.add_argument("--logit-shapes", default=";".join(",".join(map(str, x)) for x in LOGIT_SHAPES),
                        help="N,V;N,V")
    parser.add_argument("--linear-shapes", default=";".join(",".join(map(str, x)) for x in LINEAR_SHAPES),
                        help="N,H_s,H_t,V;...")
    parser.add_argument("--out", default=None)
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # a peak-memory subprocess
    args = parser.parse_args()
    if args.one:
        provider, form, shape, dtype_name = json.loads(args.one)
        print(json.dumps(peak_here(provider, form, tuple(shape), dtype_name)))
        return
    torch.manual_seed(0)
    name, date = device_name("cpu"), datetime.date.today().isoformat()
    out = pathlib.Path(args.out) if args.out else RESULTS / f"jsd-cpu-{date}.csv"
    rows = []
    for form in args.forms.split(","):
        spec = args.logit_shapes if form == "logits" else args.linear_shapes
        for shape in (tuple(map(int, x.split(","))) for x in spec.split(";")):
            for dtype_name in args.dtypes.split(","):
                load = os.getloadavg()[0]
                ms = times(form, shape, dtype_name, args.rounds)
                for provider, samples in ms.items():
                    mb = peak(provider, form, shape, dtype_name)
                    rows.append(dict(device_name=name, isa=isa(), torch_version=torch.__version__, date=date,
                                     dtype=dtype_name, form=form, n_rows=shape[0], n_classes=shape[-1],
                                     hidden="" if form == "logits" else f"{shape[1]}/{shape[2]}", provider=provider,
                                     mode="fwd+bwd", median_ms=f"{statistics.median(samples):.1f}",
                                     min_ms=f"{min(samples):.1f}", rounds=len(samples), peak_mem_mb=f"{mb:.1f}",
                                     load_1min=f"{load:.2f}"))
                    print(f"{form} {dtype_name} {shape} {provider:16s} {statistics.median(samples):9.1f} ms "
                          f"peak {mb:8.1f} MB (load {load:.2f})", file=sys.stderr, flush=True)
                    write_csv(out, COLUMNS, rows)  # after each row: a partial run keeps its rows
    print(f"CSV: {out}\nplot: {plot(rows, out)}")


if __name__ == "__main__":
    main()
