"""Vocab-parallel cross-entropy: each rank holds a slice of the classes.

    torchrun --nproc-per-node 2 examples/vocab_parallel.py

Runs on the CPU with gloo. Every rank builds the same full logits (same
seed), keeps its own contiguous slice of the classes (uneven slices), and
computes the loss with process_group=...; every rank checks the loss and
its gradient slice against the single-process result. Then the same from
hidden states with the output layer's rows sharded (LinearCrossEntropyLoss),
where the hidden states' gradient is all-reduced as a tensor-parallel model
does.
"""
import datetime

import torch
import torch.distributed as dist

import fused_softmax_ce


def main():
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    n, vocab = 8, 50 * world + 3
    logits = torch.randn(n, vocab, dtype=torch.float64) * 3
    target = torch.randint(0, vocab, (n,))
    # Uneven slices: rank 0 holds the 3 extra classes.
    sizes = [50 + (3 if r == 0 else 0) for r in range(world)]
    lo = sum(sizes[:rank])
    shard = logits[:, lo:lo + sizes[rank]].clone().requires_grad_()

    loss_fn = fused_softmax_ce.CrossEntropyLoss(label_smoothing=0.1, process_group=dist.group.WORLD)
    loss = loss_fn(shard, target)
    loss.backward()

    full = logits.clone().requires_grad_()
    expected = fused_softmax_ce.cross_entropy(full, target, label_smoothing=0.1)
    expected.backward()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(shard.grad, full.grad[:, lo:lo + sizes[rank]])
    print(f"rank {rank}/{world}: classes [{lo}, {lo + sizes[rank]}) of {vocab}, loss {loss.item():.6f} "
          "matches the full logits")

    # The output layer (vocab x hidden) sharded by rows: this rank's rows only.
    hidden = torch.randn(n, 16, dtype=torch.float64)
    lm_head = torch.randn(vocab, 16, dtype=torch.float64) * 0.3
    h = hidden.clone().requires_grad_()
    w = lm_head[lo:lo + sizes[rank]].clone().requires_grad_()
    loss_fn = fused_softmax_ce.LinearCrossEntropyLoss(label_smoothing=0.1, process_group=dist.group.WORLD)
    loss = loss_fn(h, w, target)
    loss.backward()
    # h.grad is this rank's term of the sum over the shards; a tensor-parallel
    # model all-reduces it where the hidden states enter the sharded layer.
    dist.all_reduce(h.grad)

    h_full, w_full = hidden.clone().requires_grad_(), lm_head.clone().requires_grad_()
    expected = fused_softmax_ce.linear_cross_entropy(h_full, w_full, target, label_smoothing=0.1)
    expected.backward()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(h.grad, h_full.grad)
    torch.testing.assert_close(w.grad, w_full.grad[lo:lo + sizes[rank]])
    print(f"rank {rank}/{world}: rows [{lo}, {lo + sizes[rank]}) of the output layer, loss {loss.item():.6f} "
          "matches the full weight")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
