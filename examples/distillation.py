"""One distillation setup with fused_softmax_ce's generalized JSD: a small
student language-model head learns a larger teacher's next-token
distribution from hidden states, without either model's (tokens x V) logits.

Student: hidden 64 -> vocabulary 1000; teacher: hidden 128 -> the same
vocabulary (frozen). Prints the loss every 20 steps; it falls as the
student's head matches the teacher's.
"""
import torch
from torch import nn

from fused_softmax_ce import generalized_jsd, linear_generalized_jsd

VOCAB, H_STUDENT, H_TEACHER, TOKENS = 1000, 64, 128, 256


def main():
    torch.manual_seed(0)
    teacher_head = nn.Linear(H_TEACHER, VOCAB, bias=False).requires_grad_(False)  # frozen: no gradient
    student_body = nn.Linear(H_TEACHER, H_STUDENT)  # stands for the student's transformer
    student_head = nn.Linear(H_STUDENT, VOCAB, bias=False)
    opt = torch.optim.AdamW([*student_body.parameters(), *student_head.parameters()], lr=3e-3)

    for step in range(101):
        features = torch.randn(4, TOKENS // 4, H_TEACHER)  # (B, T, H): a batch of token features
        labels = torch.randint(0, VOCAB, (4, TOKENS // 4))
        labels[:, :3] = -100  # the prompt's tokens: not distilled
        student_hidden = student_body(features)
        teacher_hidden = features  # the teacher's last hidden states (computed under no_grad in practice)
        loss = linear_generalized_jsd(student_hidden, student_head.weight, teacher_hidden, teacher_head.weight,
                                      labels, beta=0.5, temperature=2.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 20 == 0:
            print(f"step {step:3d}  jsd {loss.item():.4f}")

    # The same loss from the logits, where they exist anyway (as in TRL's GKD trainer).
    with torch.no_grad():
        hidden = student_body(features)
        chunked = linear_generalized_jsd(hidden, student_head.weight, features, teacher_head.weight, labels,
                                         beta=0.5, temperature=2.0)
        from_logits = generalized_jsd(student_head(hidden), teacher_head(features), labels, beta=0.5,
                                      temperature=2.0)
    print(f"linear form {chunked.item():.6f}, from logits {from_logits.item():.6f}")


if __name__ == "__main__":
    main()
