"""`generalized_jsd` and `linear_generalized_jsd`: distillation losses with
the semantics of TRL's `generalized_jsd_loss` (see docs/distillation.md).

With s = log_softmax(student / T) and t = log_softmax(teacher / T) per row:
beta = 0 gives KL(teacher || student) = sum e^t (t - s), beta = 1 gives
KL(student || teacher) = sum e^s (s - t), and otherwise, with the mixture
m = log((1 - beta) e^s + beta e^t), beta KL(teacher || m) + (1 - beta) KL(student || m).
No T^2 factor. The gradient goes to the student only.
"""
import torch

from ._chunks import HALF, compute_dtype, default_chunk_size
from ._derivatives import acc_dtype
from ._jsd_ops import ops
from ._linear_jsd_op import linear_jsd

REDUCTIONS = ("batchmean", "sum", "none")
_FLOAT = (torch.float32, torch.float64) + HALF


def _check_options(beta, temperature, reduction):
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"generalized_jsd: beta must be in [0, 1], got {beta}")
    if not (temperature > 0.0 and temperature != float("inf")):
        raise ValueError(f"generalized_jsd: temperature must be finite and > 0, got {temperature}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"generalized_jsd: reduction must be one of {REDUCTIONS}, got {reduction!r}")


def _check_teacher(*tensors):
    for t in tensors:
        if t is not None and t.requires_grad and torch.is_grad_enabled():
            raise ValueError(
                "generalized_jsd: the teacher gets no gradient, but a teacher tensor of shape "
                f"{tuple(t.shape)} requires grad; pass it detached (.detach()), computed under "
                "torch.no_grad(), or with requires_grad_(False)")


def _label_rows(labels, lead_shape, device):
    """labels as one int64 per row (or None), checked against the logits' leading shape."""
    if labels is None:
        return None
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise RuntimeError(f"generalized_jsd: labels must be integer class indices, got {labels.dtype}")
    if tuple(labels.shape) != tuple(lead_shape):
        raise ValueError(f"generalized_jsd: labels must have shape {tuple(lead_shape)} (the logits' shape without "
                         f"V), got {tuple(labels.shape)}")
    if labels.device != device:
        raise RuntimeError(f"generalized_jsd: labels are on {labels.device} but the logits are on {device}")
    return labels.reshape(-1).long()


def reduce_rows(loss, labels, ignore_index, reduction, lead_shape):
    """TRL's reductions of the per-row loss (0 on ignored rows): 'batchmean'
    divides the sum by the rows kept (all rows without labels); 0 / 0 is nan."""
    if reduction == "none":
        return loss.reshape(lead_shape)
    total = loss.sum()
    if reduction == "sum":
        return total
    count = loss.shape[0] if labels is None else (labels != ignore_index).sum()
    return total / count


def generalized_jsd(student_logits, teacher_logits, labels=None, *, beta=0.5, temperature=1.0, ignore_index=-100,
                    reduction="batchmean"):
    """Generalized Jensen-Shannon divergence between student and teacher
    logits, (N, V) or (B, T, V); float32 for 16- and 32-bit logits, float64
    for float64. Rows whose label is ``ignore_index`` are left out."""
    _check_options(beta, temperature, reduction)
    if student_logits.dim() not in (2, 3):
        raise ValueError(f"generalized_jsd: student_logits must be (N, V) or (B, T, V), got shape "
                         f"{tuple(student_logits.shape)}")
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(f"generalized_jsd: teacher_logits must have the student's shape "
                         f"{tuple(student_logits.shape)}, got {tuple(teacher_logits.shape)}")
    for name, t in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
        if t.dtype not in _FLOAT:
            raise RuntimeError(f"generalized_jsd: {name} must be float32, float64, float16 or bfloat16, "
                               f"got {t.dtype}")
    if teacher_logits.device != student_logits.device:
        raise RuntimeError(f"generalized_jsd: teacher_logits are on {teacher_logits.device} but student_logits "
                           f"are on {student_logits.device}")
    _check_teacher(teacher_logits)
    lead_shape = student_logits.shape[:-1]
    rows = _label_rows(labels, lead_shape, student_logits.device)
    # Mixed dtypes meet in the wider one (as PyTorch's arithmetic would).
    dtype = torch.promote_types(student_logits.dtype, teacher_logits.dtype)
    v = student_logits.shape[-1]
    s = student_logits.to(dtype).reshape(-1, v)
    t = teacher_logits.to(dtype).reshape(-1, v)
    loss, _ = ops.jsd_forward(s, t, rows, float(beta), float(temperature), int(ignore_index))
    return reduce_rows(loss, rows, ignore_index, reduction, lead_shape)


def _flat_rows(x, name):
    if x.dim() < 1:
        raise ValueError(f"linear_generalized_jsd: {name} must have at least 1 dimension (..., H), got a scalar")
    return x.reshape(-1, x.shape[-1]) if x.dim() != 2 else x


def _check_linear(name, x, weight, bias):
    if weight.dim() != 2:
        raise ValueError(f"linear_generalized_jsd: {name}_weight must be 2-D (V, H), got shape {tuple(weight.shape)}")
    if x.shape[-1] != weight.shape[1]:
        raise RuntimeError(f"linear_generalized_jsd: {name}_input's hidden size {x.shape[-1]} does not match "
                           f"{name}_weight of shape {tuple(weight.shape)} (V, H)")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise RuntimeError(f"linear_generalized_jsd: {name}_bias must have shape ({weight.shape[0]},), got "
                           f"{tuple(bias.shape)}")
    for t in (x, weight, bias):
        if t is not None and t.dtype not in _FLOAT:
            raise RuntimeError(f"linear_generalized_jsd: {name} tensors must be float32, float64, float16 or "
                               f"bfloat16, got {t.dtype}")


def _autocast(tensors, device_type):
    """As autocast runs the reference: the linears in its dtype (float64 stays)."""
    dt = torch.get_autocast_dtype(device_type)
    return tuple(None if t is None or t.dtype == torch.float64 else t.to(dt) for t in tensors)


def linear_generalized_jsd(student_input, student_weight, teacher_input, teacher_weight, labels=None, *,
                           student_bias=None, teacher_bias=None, beta=0.5, temperature=1.0, ignore_index=-100,
                           reduction="batchmean", chunk_size=None):
    """`generalized_jsd` of the logits student_input @ student_weight.T (+
    student_bias) and teacher_input @ teacher_weight.T (+ teacher_bias),
    computed in chunks of rows without either model's N x V logits. The
    hidden sizes may differ; the vocabularies must match. Gradients go to
    the student's input, weight and bias."""
    _check_options(beta, temperature, reduction)
    _check_linear("student", student_input, student_weight, student_bias)
    _check_linear("teacher", teacher_input, teacher_weight, teacher_bias)
    if student_weight.shape[0] != teacher_weight.shape[0]:
        raise ValueError(f"linear_generalized_jsd: the vocabularies must match, got student_weight with "
                         f"{student_weight.shape[0]} rows and teacher_weight with {teacher_weight.shape[0]}")
    if student_input.shape[:-1] != teacher_input.shape[:-1]:
        raise ValueError(f"linear_generalized_jsd: student_input {tuple(student_input.shape)} and teacher_input "
                         f"{tuple(teacher_input.shape)} must have the same leading (token) shape")
    _check_teacher(teacher_input, teacher_weight, teacher_bias)
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"linear_generalized_jsd: chunk_size must be a positive number of rows, got {chunk_size}")
    device = student_input.device
    lead_shape = student_input.shape[:-1]
    rows = _label_rows(labels, lead_shape, device)
    student = (student_input, student_weight, student_bias)
    teacher = (teacher_input, teacher_weight, teacher_bias)
    if torch.is_autocast_enabled(device.type):
        student, teacher = _autocast(student, device.type), _autocast(teacher, device.type)
    # One dtype for both models' logits (the kernels read them together).
    dtype = torch.promote_types(student[0].dtype, teacher[0].dtype)
    if teacher[0].dtype != dtype or teacher[1].dtype != dtype:
        teacher = tuple(None if t is None else t.to(dtype) for t in teacher)
    x, w, b = student
    if x.dtype != dtype or w.dtype != dtype:
        x, w, b = (None if t is None else t.to(dtype) for t in student)
    x, xt = _flat_rows(x, "student_input"), _flat_rows(teacher[0], "teacher_input")
    n, v = x.shape[0], w.shape[0]
    if chunk_size is None:
        # linear_cross_entropy's rule, by the bytes of one model's logits block (512 rows at V = 32000 in fp32).
        chunk_size = default_chunk_size(n, max(x.shape[1], xt.shape[1]), v, compute_dtype(x.dtype, device).itemsize,
                                        device.type)
    acc = acc_dtype(compute_dtype(x.dtype, device))
    if reduction == "batchmean":
        count = n if rows is None else (rows != ignore_index).sum()
        scale = torch.ones((), dtype=acc, device=device) / count
    else:
        scale = torch.ones((), dtype=acc, device=device)
    grad_on = torch.is_grad_enabled()
    need = [grad_on and reduction != "none" and t is not None and t.requires_grad for t in (x, w, b)]
    grad_acc_dtype = torch.float32 if x.dtype in HALF else x.dtype
    loss, *_ = linear_jsd(x, w, xt, teacher[1], rows, b, teacher[2], scale, None, reduction, float(beta),
                          float(temperature), int(ignore_index), int(chunk_size), grad_acc_dtype, *need)
    return loss.reshape(lead_shape) if reduction == "none" else loss
