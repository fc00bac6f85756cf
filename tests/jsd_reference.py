"""TRL's generalized_jsd_loss as a float64 PyTorch composition: the
reference of tests/test_jsd*.py and the eager/compiled baseline of
bench/bench_jsd.py (`trl_jsd`, in the logits' own dtype)."""
import torch
import torch.nn.functional as F


def trl_jsd(student_logits, teacher_logits, labels=None, beta=0.5, temperature=1.0, ignore_index=-100,
            reduction="batchmean"):
    """TRL's formula (F.kl_div with log targets, logsumexp mixture) over the
    last dimension. Unlike TRL, 'batchmean' without labels divides by all
    rows, (B, T, V) included (TRL divides by B), and 'none' gives per-row
    values (TRL's per-class ones)."""
    s = F.log_softmax(student_logits / temperature, dim=-1)
    t = F.log_softmax(teacher_logits / temperature, dim=-1)
    if beta == 0:
        jsd = F.kl_div(s, t, reduction="none", log_target=True)
    elif beta == 1:
        jsd = F.kl_div(t, s, reduction="none", log_target=True)
    else:
        b = torch.tensor(beta, dtype=s.dtype, device=s.device)
        m = torch.logsumexp(torch.stack([s + torch.log(1 - b), t + torch.log(b)]), dim=0)
        jsd = beta * F.kl_div(m, t, reduction="none", log_target=True) + (1 - beta) * F.kl_div(
            m, s, reduction="none", log_target=True)
    rows = jsd.sum(-1)
    if labels is not None:
        rows = torch.where(labels != ignore_index, rows, torch.zeros_like(rows))
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    count = rows.numel() if labels is None else (labels != ignore_index).sum()
    return rows.sum() / count


def reference(student_logits, teacher_logits, labels=None, **kwargs):
    """trl_jsd in float64 on the same (rounded) inputs, differentiable in the student."""
    return trl_jsd(student_logits.double(), teacher_logits.double(), labels, **kwargs)
