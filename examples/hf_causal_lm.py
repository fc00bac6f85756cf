"""A tiny Llama trained with fused_softmax_ce's loss through the Transformers integration.

Builds a Llama from its config (random weights, nothing downloaded), trains it
for a few AdamW steps on synthetic tokens as Transformers does it, then with
`apply(model)` and, when this build has linear_cross_entropy, with
`apply(model, fused_linear=True)`, from the same seed. Prints the losses and
the peak memory of a training step (CUDA's allocator, or on the CPU the peak
of live tensor bytes, bench/memory.py).

    python examples/hf_causal_lm.py                       # quick (seconds)
    python examples/hf_causal_lm.py --vocab 128256 --seq 1024 --steps 5
"""
import argparse
import pathlib
import sys

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import fused_softmax_ce as fce
from fused_softmax_ce.integrations import transformers as fce_hf

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "bench"))
from memory import PeakMemory  # noqa: E402  (the benchmark's peak-memory meter)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def build_model(vocab, hidden, layers, dtype, device, seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(config).to(device=device, dtype=dtype)


def synthetic_batches(steps, batch, seq, vocab, device, seed=1):
    """Random tokens; the last quarter of the first row is padding (label -100)."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        ids = torch.randint(0, vocab, (batch, seq), generator=g)
        labels = ids.clone()
        labels[0, -(seq // 4):] = -100
        yield ids.to(device), labels.to(device)


def train(model, batches, device):
    """AdamW steps; returns the losses and the largest peak memory of a step (MiB)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses, peak = [], 0.0
    for ids, labels in batches:
        with PeakMemory(device) as mem:
            loss = model(input_ids=ids, labels=labels).loss
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        peak = max(peak, mem.mb)
    return losses, peak


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--dtype", choices=DTYPES, default="fp32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    variants = {"transformers": None, "fused_softmax_ce": {}}
    if hasattr(fce, "linear_cross_entropy"):
        variants["fused_softmax_ce, fused_linear"] = {"fused_linear": True}
    results = {}
    for name, options in variants.items():
        model = build_model(args.vocab, args.hidden, args.layers, DTYPES[args.dtype], args.device)
        if options is not None:
            fce_hf.apply(model, **options)  # the one line
        batches = synthetic_batches(args.steps, args.batch, args.seq, args.vocab, args.device)
        results[name] = train(model, batches, args.device)
        del model

    print(f"Llama, vocab {args.vocab}, hidden {args.hidden}, {args.layers} layers, batch {args.batch}x{args.seq}, "
          f"{args.dtype}, {args.device}")
    for name, (losses, peak) in results.items():
        print(f"{name:32s} losses {' '.join(f'{x:.5f}' for x in losses)}   peak step memory {peak:8.1f} MiB")
    return results


if __name__ == "__main__":
    main()
