"""The derivatives the fused kernels do not compute, in plain torch ops.

The kernels compute the loss, the lse and the first derivative with respect
to the logits. Everything rarer (the gradient of probability targets, the
derivatives of the backward itself for double backward, and the tangents of
forward-mode AD) is written here from the same algebra as csrc/row_math.h:

    dloss/dz_j = (g A + h) p_j - g (k a_j + [j == y] coef_y),   p = softmax(z)

with g the upstream gradient of the loss and h that of the lse. Being torch
ops, these formulas are themselves differentiable to any order, batch under
vmap, and work on every device.
"""
from typing import NamedTuple, Optional

import torch


def acc_dtype(dtype):
    """The accumulation dtype of the kernels: float64 stays, the rest use float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def row_shape(logits):
    """Per-row values of (N, C[, S]) logits, shaped to broadcast over classes."""
    return (logits.shape[0], 1) + tuple(logits.shape[2:])


def class_shape(logits):
    """Per-class values, shaped to broadcast over rows."""
    return (1, logits.shape[1]) + (1,) * (logits.dim() - 2)


class RowTerms(NamedTuple):
    """dloss/dz = A p - k a - coef_y onehot, broadcastable to the logits (acc dtype)."""

    p: torch.Tensor  # softmax, zero on ignored rows
    A: torch.Tensor
    k: torch.Tensor
    a: torch.Tensor
    coef_y: torch.Tensor
    onehot: Optional[torch.Tensor]  # None for probability targets
    valid: torch.Tensor  # 1 for rows that are not ignored


def row_terms(logits, target, weight, lse, ignore_index, label_smoothing):
    acc = acc_dtype(logits.dtype)
    eps = label_smoothing
    n_classes = logits.shape[1]
    w = None if weight is None else weight.to(acc).reshape(class_shape(logits))
    log_p = logits.double() - lse.double().reshape(row_shape(logits))
    if target.is_floating_point():
        a = target.to(acc) * (1 - eps) + eps / n_classes
        if w is not None:
            a = a * w
        A = a.sum(1, keepdim=True)
        valid = torch.ones_like(A)
        return RowTerms(log_p.exp().to(acc), A, valid, a, torch.zeros_like(A), None, valid)
    t = target.reshape(row_shape(logits))
    is_valid = t != ignore_index
    valid = is_valid.to(acc)
    y = torch.where(is_valid, t, torch.zeros_like(t))
    classes = torch.arange(n_classes, device=logits.device).reshape(class_shape(logits))
    onehot = ((classes == y) & is_valid).to(acc)
    if w is None:
        w_y, sum_w, a = valid, float(n_classes), torch.ones((), dtype=acc, device=logits.device)
    else:
        w_y, sum_w, a = weight.to(acc)[y] * valid, w.sum(), w
    coef_y = (1 - eps) * w_y
    k = (eps / n_classes) * valid
    A = coef_y + k * sum_w
    return RowTerms(log_p.exp().to(acc) * valid, A, k, a, coef_y, onehot, valid)


def rows(v, logits):
    """A per-row vector (R,) as a broadcastable (N, 1[, S]) tensor."""
    return v.reshape(row_shape(logits))


def flat(v):
    """A (N, 1[, S]) per-row tensor back to (R,)."""
    return v.reshape(-1)


def logits_grad(terms, g, h):
    """dloss/dz for upstream gradients g (loss) and h (lse), both (N, 1[, S])."""
    out = (g * terms.A + h * terms.valid) * terms.p - g * terms.k * terms.a
    if terms.onehot is not None:
        out = out - g * terms.coef_y * terms.onehot
    return out


def effective_logits(logits, options):
    """v = logit_scale * z, then softcap * tanh(v / softcap): what the kernels
    see (csrc/row_math.h's LogitTransform), for a `LossOptions`."""
    if not options.transforms_logits:
        return logits
    v = logits.double() * options.logit_scale
    return options.softcap * torch.tanh(v / options.softcap) if options.softcap else v


def target_grad(v, lse, weight, label_smoothing, g):
    """dloss/dt_j = -(1 - eps) w_j log p_j g for probability targets (v the
    effective logits)."""
    log_p = v.double() - lse.double().reshape(row_shape(v))
    if weight is not None:
        log_p = log_p * weight.double().reshape(class_shape(v))
    return -(1.0 - label_smoothing) * log_p * g.double()


def weight_terms(v, lse, target, label_smoothing, n_classes):
    """dloss_row/dw_j = -((1 - eps) t_j + eps / C) log p_j for probability
    targets (v the effective logits, C all the classes), float64."""
    log_p = v.double() - lse.double().reshape(row_shape(v))
    return -(target.double() * (1 - label_smoothing) + label_smoothing / n_classes) * log_p


def weight_grad(terms, g):
    """The class weight's gradient from weight_terms and the rows' upstream gradient g."""
    return (terms * g.double()).sum([0] + list(range(2, terms.dim())))


def backward_vjp(terms, g, h, weight, label_smoothing, is_prob, V):
    """The vector-Jacobian products of G = logits_grad(terms, g, h) with V:
    with respect to (g, h, z, lse, t); t only for probability targets."""
    pV = (terms.p * V).sum(1, keepdim=True)
    grad_g = terms.A * pV - terms.k * (terms.a * V).sum(1, keepdim=True)
    if terms.onehot is not None:
        grad_g = grad_g - terms.coef_y * (terms.onehot * V).sum(1, keepdim=True)
    scale = g * terms.A + h * terms.valid
    grad_h = pV * terms.valid
    grad_z = scale * terms.p * V
    grad_lse = -scale * pV
    grad_t = None
    if is_prob:
        w = 1.0 if weight is None else weight.to(V.dtype).reshape(class_shape(V))
        grad_t = g * (1 - label_smoothing) * w * (pV - V)
    return grad_g, grad_h, grad_z, grad_lse, grad_t


def backward_jvp(terms, g, h, weight, label_smoothing, is_prob, dg, dh, dz, dlse, dt):
    """The tangent of G = logits_grad(terms, g, h) for tangents of (g, h, z, lse, t)."""
    out = logits_grad(terms, dg, dh)
    scale = g * terms.A + h * terms.valid
    out = out + scale * terms.p * (dz - dlse)
    if is_prob and dt is not None:
        w = 1.0 if weight is None else weight.to(dt.dtype).reshape(class_shape(dt))
        wdt = (1 - label_smoothing) * w * dt
        out = out + g * (wdt.sum(1, keepdim=True) * terms.p - wdt)
    return out
