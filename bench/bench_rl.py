"""Benchmark of the policy-gradient loss on the CPU: time of forward+backward.

The loss of examples/grpo.py, mean of advantage * (-log p(token)) minus an
entropy bonus, at a temperature, with the gradient taken for non-leaf logits
(as in training). Providers:
  fused_plain  fused_softmax_ce.cross_entropy alone (no weights, no entropy): the floor
  fused        the same call with token_weight, logit_scale and return_stats (entropy bonus)
  eager        the PyTorch composition (log_softmax, gather, weighted mean, entropy)
  compiled     the same under torch.compile
Providers are interleaved round by round; the CSV row holds the median, mean
and p90 over rounds, the CPU, its ISA path and the 1-minute load.

    python bench/bench_rl.py                # 4096 x 32000, fp32 and bf16
    python bench/bench_rl.py --rounds 3 --shapes 1024x32000
"""
import argparse
import datetime
import os
import re
import statistics

import torch

import fused_softmax_ce as fce
from bench import DTYPES, RESULTS, device_name, timed, write_csv

TEMPERATURE, BONUS = 0.8, 1e-2
COLUMNS = ["device_name", "isa", "torch_version", "date", "dtype", "n_rows", "n_classes", "provider",
           "median_ms", "mean_ms", "p90_ms", "rounds", "load_1min"]


def fused_plain(x, y, tw):
    return fce.cross_entropy(x, y)


def fused(x, y, tw):
    stats = fce.cross_entropy(x, y, token_weight=tw, logit_scale=1 / TEMPERATURE, return_stats=True)
    return stats.loss - BONUS * stats.entropy.mean()


def eager(x, y, tw):
    logp = (x.float() / TEMPERATURE).log_softmax(-1)
    pg = -(tw * logp.gather(1, y[:, None])[:, 0]).mean()
    entropy = -(logp.exp() * logp).sum(-1)
    return pg - BONUS * entropy.mean()


PROVIDERS = {"fused_plain": fused_plain, "fused": fused, "eager": eager, "compiled": torch.compile(eager)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="4096x32000")
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    isa = fce.cpu_isa()
    rows, date = [], datetime.date.today().isoformat()
    for shape in args.shapes.split(","):
        n, c = map(int, shape.split("x"))
        for dtype_name in args.dtypes.split(","):
            base = (torch.randn(n, c) * 3).to(DTYPES[dtype_name]).requires_grad_()
            y, tw = torch.randint(0, c, (n,)), torch.randn(n)
            times = {p: [] for p in PROVIDERS}
            for r in range(args.rounds + 1):  # round 0 warms up (and compiles)
                for name, fn in PROVIDERS.items():
                    t = timed("cpu", lambda: fn(base * 1, y, tw).backward())
                    if r:
                        times[name].append(t)
            for name, ts in times.items():
                ts = sorted(ts)
                rows.append(dict(device_name=device_name("cpu"), isa=isa, torch_version=torch.__version__, date=date,
                                 dtype=dtype_name, n_rows=n, n_classes=c, provider=name,
                                 median_ms=round(statistics.median(ts), 2), mean_ms=round(statistics.mean(ts), 2),
                                 p90_ms=round(ts[min(len(ts) - 1, int(0.9 * len(ts)))], 2), rounds=len(ts),
                                 load_1min=os.getloadavg()[0]))
                print(f"{dtype_name} {n}x{c} {name:12s} median {rows[-1]['median_ms']:8.1f} ms")
    slug = re.sub(r"[^a-z0-9]+", "-", device_name("cpu").lower()).strip("-")
    write_csv(RESULTS / f"rl-{slug}-{date}.csv", COLUMNS, rows)


if __name__ == "__main__":
    main()
