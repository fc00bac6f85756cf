"""A GRPO-style policy-gradient step with fused_softmax_ce.

A tiny policy (an embedding and a linear head over a small vocabulary) samples
groups of completions at a temperature; the reward of a completion is the
share of its tokens that are even. Each completion's advantage is its reward
standardised within its group, and every one of its tokens carries it:

    loss = mean over completion tokens of  advantage * (-log p(token))
           - entropy_bonus * mean entropy of the policy

One call gives both terms: ``token_weight`` multiplies each token's
cross-entropy (-log p) by its advantage, ``logit_scale = 1 / temperature``
applies the sampling temperature, padding is ``ignore_index``, and
``return_stats=True`` returns the entropy, differentiable in the same backward
pass. The first step is checked against the plain-PyTorch composition.

    python examples/grpo.py            # a few seconds on a CPU
"""
import argparse

import torch
from torch import nn

import fused_softmax_ce as fce


class Policy(nn.Module):
    def __init__(self, vocab, hidden):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, tokens):  # (B, T) -> next-token logits (B, T, V)
        return self.head(torch.tanh(self.embed(tokens).cumsum(1)))


def sample(policy, prompts, length, temperature):
    """Completions (B, length) sampled token by token; a few are cut short and padded with -100."""
    tokens = prompts
    with torch.no_grad():
        for _ in range(length):
            probs = (policy(tokens)[:, -1] / temperature).softmax(-1)
            tokens = torch.cat([tokens, torch.multinomial(probs, 1)], 1)
    completions = tokens[:, prompts.shape[1]:].clone()
    stops = torch.randint(length // 2, length + 1, (len(completions),))
    completions[torch.arange(length)[None, :] >= stops[:, None]] = -100
    return tokens[:, :-1], completions


def grpo_loss(policy, inputs, completions, advantages, temperature, entropy_bonus, prompt_len):
    logits = policy(inputs)[:, prompt_len - 1:]  # the logits that predicted each completion token
    token_weight = advantages[:, None].expand_as(completions)
    stats = fce.cross_entropy(logits.transpose(1, 2), completions, token_weight=token_weight,
                              logit_scale=1 / temperature, return_stats=True)
    kept = completions != -100
    return stats.loss - entropy_bonus * stats.entropy[kept].mean(), stats


def reference_loss(policy, inputs, completions, advantages, temperature, entropy_bonus, prompt_len):
    """The same loss in plain PyTorch, float64."""
    logp = (policy(inputs)[:, prompt_len - 1:].double() / temperature).log_softmax(-1)
    kept = completions != -100
    token_logp = logp.gather(-1, completions.clamp(min=0)[..., None])[..., 0]
    pg = -(advantages[:, None].double() * token_logp)[kept].sum() / kept.sum()
    entropy = -(logp.exp() * logp).sum(-1)[kept].mean()
    return pg - entropy_bonus * entropy


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--vocab", type=int, default=64)
    parser.add_argument("--group", type=int, default=8, help="completions per prompt")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--length", type=int, default=12)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--entropy-bonus", type=float, default=1e-3)
    args = parser.parse_args()
    torch.manual_seed(0)
    policy = Policy(args.vocab, 32)
    optimizer = torch.optim.Adam(policy.parameters(), lr=3e-2)
    prompt_len = 3
    for step in range(args.steps):
        prompts = torch.randint(0, args.vocab, (args.prompts, prompt_len)).repeat_interleave(args.group, 0)
        inputs, completions = sample(policy, prompts, args.length, args.temperature)
        kept = completions != -100
        reward = ((completions % 2 == 0) & kept).sum(1) / kept.sum(1)
        grouped = reward.view(args.prompts, args.group)
        advantages = ((grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-4)).view(-1)
        loss, stats = grpo_loss(policy, inputs, completions, advantages, args.temperature, args.entropy_bonus,
                                prompt_len)
        optimizer.zero_grad()
        loss.backward()
        if step == 0:  # the fused loss and its gradient against the plain-PyTorch composition
            fused = [p.grad.clone() for p in policy.parameters()]
            optimizer.zero_grad()
            expected = reference_loss(policy, inputs, completions, advantages, args.temperature,
                                      args.entropy_bonus, prompt_len)
            expected.backward()
            worst = max((a - b.grad).abs().max().item() for a, b in zip(fused, policy.parameters()))
            print(f"step 0: loss {loss.item():.6f} vs plain PyTorch {expected.item():.6f}, "
                  f"largest gradient difference {worst:.1e}")
            assert abs(loss.item() - expected.item()) < 1e-5 and worst < 1e-5
            for p, g in zip(policy.parameters(), fused):
                p.grad = g
        optimizer.step()
        if step % 5 == 0 or step == args.steps - 1:
            print(f"step {step:3d}  mean reward {reward.mean():.3f}  "
                  f"entropy {stats.entropy[kept].mean():.3f}")


if __name__ == "__main__":
    main()
