"""Vocab-parallel cross-entropy on the CPU (gloo, spawned ranks on loopback):
ours (process_group=...) against a Megatron-style baseline written with torch
ops (max all-reduce, sum-exp all-reduce, target-logit all-reduce).

With --hidden H, the same from hidden states (N, H) and the rank's rows of
the output layer: linear_cross_entropy(..., process_group=...) against the
baseline on the shard's logits `hidden @ W_k.T`; both leave the hidden
states' gradient as this rank's term (no all-reduce of it is timed).

Writes bench/results/vocab-parallel[-linear]-<device>-<date>.csv: per world
size, provider and mode, the time per rank (the slowest rank's median) and the
bytes each rank puts into collectives per forward: `payload_bytes` (the
tensors it contributes) and `sent_bytes` (what a ring algorithm sends:
(W-1) x payload for an all_gather, 2 (W-1)/W x payload for an all-reduce).

    python bench/bench_vocab_parallel.py [--rows 2048] [--classes 32768] [--worlds 2 4] [--hidden 256]
"""
import argparse
import datetime
import multiprocessing
import pathlib
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist

import fused_softmax_ce as fce
from bench import RESULTS, device_name, write_csv

COLUMNS = ["device_name", "torch_version", "date", "world_size", "dtype", "n_rows", "n_classes", "hidden", "provider",
           "mode", "median_ms", "collectives", "payload_bytes", "sent_bytes"]


class MegatronCE(torch.autograd.Function):
    """Megatron-LM's vocab_parallel_cross_entropy, in torch ops: 3 all-reduces
    of N values, the softmax of the shard saved for the backward."""

    @staticmethod
    def forward(ctx, logits, target, lo, group):
        m = logits.max(1).values
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
        z = logits - m.unsqueeze(1)
        absent = (target < lo) | (target >= lo + logits.shape[1])
        local = (target - lo).clamp(0, logits.shape[1] - 1)
        z_y = z.gather(1, local.unsqueeze(1)).squeeze(1).masked_fill(absent, 0.0)
        dist.all_reduce(z_y, group=group)
        exp = z.exp_()
        s = exp.sum(1)
        dist.all_reduce(s, group=group)
        exp.div_(s.unsqueeze(1))
        ctx.save_for_backward(exp, local, absent)
        return (s.log() - z_y).mean()

    @staticmethod
    def backward(ctx, g):
        softmax, local, absent = ctx.saved_tensors
        grad = softmax.clone()
        grad.scatter_add_(1, local.unsqueeze(1), (absent.to(grad.dtype) - 1).unsqueeze(1))
        return grad.mul_(g / grad.shape[0]), None, None, None


def bytes_per_rank(provider, n, world):
    """(collectives, payload, ring-sent) bytes per rank per forward (fp32 logits, index targets)."""
    if provider.startswith("fused"):
        payload = 2 * 8 + n * (8 + 2 * 4)  # the size check (2 int64), then lse (float64), loss and A (float32)
        return 2, payload, (world - 1) * payload
    payload = 3 * n * 4  # three all-reduces of N fp32 values
    return 3, payload, round(2 * (world - 1) / world * payload)


def worker(rank, world, port, args, results):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=300))
    group = dist.group.WORLD
    torch.manual_seed(0)
    sizes = [args.classes // world + (1 if r < args.classes % world else 0) for r in range(world)]
    lo = sum(sizes[:rank])
    target = torch.randint(0, args.classes, (args.rows,))
    if args.hidden:
        # The leaves: the hidden states and this rank's rows of the output layer.
        base = (torch.randn(args.rows, args.hidden), torch.randn(sizes[rank], args.hidden) * args.hidden ** -0.5)
        providers = {
            "fused_linear": lambda h, w: fce.linear_cross_entropy(h, w, target, process_group=group),
            "megatron_linear": lambda h, w: MegatronCE.apply(h @ w.t(), target, lo, group),
        }
    else:
        base = (torch.randn(args.rows, sizes[rank]),)  # the leaf: this rank's logits
        providers = {
            "fused": lambda x: fce.cross_entropy(x, target, process_group=group),
            "megatron": lambda x: MegatronCE.apply(x, target, lo, group),
        }
    # The two agree (a benchmark of a wrong baseline would mean nothing).
    fused, megatron = providers.values()
    torch.testing.assert_close(fused(*base), megatron(*(t.clone() for t in base)))
    times = {(provider, mode): [] for provider in providers for mode in ("fwd", "fwd+bwd")}
    # The providers take turns within each repetition, so that they see the
    # same load on this shared machine; the first repetition is a warm-up.
    for rep in range(args.reps + 1):
        for (provider, mode), ms in times.items():
            leaves = [t.clone().requires_grad_(mode != "fwd") for t in base]
            dist.barrier(group)
            t0 = time.perf_counter()
            loss = providers[provider](*leaves)
            if mode != "fwd":
                loss.backward()
            ms.append((time.perf_counter() - t0) * 1e3)
    out = {key: statistics.median(ms[1:]) for key, ms in times.items()}
    results.put(out)
    dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_world(world, args):
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=worker, args=(r, world, port, args, results)) for r in range(world)]
    for p in procs:
        p.start()
    try:
        per_rank = [results.get(timeout=600) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    return {key: max(r[key] for r in per_rank) for key in per_rank[0]}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--classes", type=int, default=32768)
    parser.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--hidden", type=int, default=0,
                        help="bench linear_cross_entropy from (rows, hidden) hidden states instead")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    name, date = device_name("cpu"), datetime.date.today().isoformat()
    slug = "".join(ch if ch.isalnum() else "-" for ch in name.lower()).strip("-")[:40]
    RESULTS.mkdir(parents=True, exist_ok=True)
    kind = "vocab-parallel-linear" if args.hidden else "vocab-parallel"
    out = pathlib.Path(args.out) if args.out else RESULTS / f"{kind}-cpu-{slug}-{date}.csv"
    rows = []
    for world in args.worlds:
        times = run_world(world, args)
        for (provider, mode), ms in times.items():
            collectives, payload, sent = bytes_per_rank(provider, args.rows, world)
            rows.append(dict(device_name=name, torch_version=torch.__version__, date=date, world_size=world,
                             dtype="fp32", n_rows=args.rows, n_classes=args.classes,
                             hidden=args.hidden or "", provider=provider,
                             mode=mode, median_ms=f"{ms:.2f}", collectives=collectives,
                             payload_bytes=payload, sent_bytes=sent))
            print(f"world {world} {provider:15s} {mode:8s} {ms:9.2f} ms  {collectives} collectives, "
                  f"payload {payload} B, sent {sent} B per rank", file=sys.stderr, flush=True)
    write_csv(out, COLUMNS, rows)
    print(f"CSV: {out}")


if __name__ == "__main__":
    main()
