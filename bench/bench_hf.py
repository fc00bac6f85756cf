"""Peak memory and time of one training step of a tiny Llama with a large vocabulary,
as Transformers computes its loss and through fused_softmax_ce's integration.

One step is forward + backward of `model(input_ids, labels=labels).loss` for a
2-layer, hidden-64 Llama (V = 128256 by default, T = 1024, batch 1), whose
memory is dominated by the N x V logits. Writes a CSV under bench/results/.

    python bench/bench_hf.py
    python bench/bench_hf.py --vocab 32000 --seq 512 --reps 5
"""
import argparse
import datetime
import pathlib
import statistics
import sys

import torch
import transformers

from bench import RESULTS, device_name, timed, write_csv
from memory import PeakMemory

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "examples"))
from hf_causal_lm import DTYPES, build_model, synthetic_batches  # noqa: E402

from fused_softmax_ce.integrations import transformers as fce_hf  # noqa: E402

COLUMNS = ["device_name", "torch_version", "transformers_version", "date", "dtype", "vocab", "seq",
           "batch", "hidden", "variant", "peak_mem_mb", "median_ms"]
# variant -> apply()'s arguments (None: Transformers' own loss)
VARIANTS = {
    "transformers": None,
    "fused_softmax_ce": {},
    "fused_softmax_ce_inplace": {"inplace_backward": True},
    "fused_softmax_ce_fused_linear": {"fused_linear": True},
}


def measure(variant, args, dtype):
    model = build_model(args.vocab, args.hidden, 2, dtype, args.device)
    if VARIANTS[variant] is not None:
        fce_hf.apply(model, **VARIANTS[variant])
    (ids, labels), = synthetic_batches(1, args.batch, args.seq, args.vocab, args.device)
    times, peak = [], 0.0

    def step():
        model(input_ids=ids, labels=labels).loss.backward()

    for i in range(args.reps + 1):
        model.zero_grad(set_to_none=True)
        with PeakMemory(args.device) as mem:
            t = timed(args.device, step)
        if i > 0:  # the first is warm-up
            times.append(t)
            peak = max(peak, mem.mb)
    return peak, statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None, help="CSV path (default: bench/results/hf-<device>-<date>.csv)")
    args = parser.parse_args()
    name, date = device_name(args.device), datetime.date.today().isoformat()
    slug = "".join(ch if ch.isalnum() else "-" for ch in name.lower()).strip("-")[:40]
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = pathlib.Path(args.out) if args.out else RESULTS / f"hf-{args.device}-{slug}-{date}.csv"

    rows = []
    print(f"{name}, torch {torch.__version__}, transformers {transformers.__version__}", file=sys.stderr)
    for dt_name, dtype in DTYPES.items():
        for variant in VARIANTS:
            peak, ms = measure(variant, args, dtype)
            rows.append(dict(device_name=name, torch_version=torch.__version__,
                             transformers_version=transformers.__version__, date=date, dtype=dt_name,
                             vocab=args.vocab, seq=args.seq, batch=args.batch, hidden=args.hidden,
                             variant=variant, peak_mem_mb=f"{peak:.1f}", median_ms=f"{ms:.1f}"))
            print(f"{dt_name:5s} {variant:30s} peak {peak:9.1f} MiB {ms:9.1f} ms", file=sys.stderr, flush=True)
    write_csv(out, COLUMNS, rows)
    print(f"CSV: {out}")


if __name__ == "__main__":
    main()
