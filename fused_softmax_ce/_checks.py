"""Argument checks with PyTorch's exception types and messages."""
import torch

_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_AUTOCAST_TO_FLOAT = (torch.float16, torch.bfloat16, torch.float32)


def check_index_target(input, target):
    """PyTorch's nll_loss checks, with its messages and exception types."""
    if input.dim() == 1:
        if target.numel() != 1 or target.dim() > 1:
            raise ValueError(
                f"Expected input batch_size (1) to match target batch_size ({target.numel()})."
            )
    elif target.dim() == 0 or input.shape[0] != target.shape[0]:
        got = target.shape[0] if target.dim() > 0 else 0
        raise ValueError(f"Expected input batch_size ({input.shape[0]}) to match target batch_size ({got}).")
    elif tuple(target.shape) != (input.shape[0],) + tuple(input.shape[2:]):
        expected = [input.shape[0]] + list(input.shape[2:])
        raise RuntimeError(f"Expected target size {expected}, got {list(target.shape)}")
    if target.dtype not in (torch.long, torch.uint8):
        raise RuntimeError(f"expected target dtype to be Long or Byte, but got {dtype_name(target.dtype)}")


def dtype_name(dtype):
    return {torch.float32: "Float", torch.float64: "Double", torch.float16: "Half",
            torch.bfloat16: "BFloat16", torch.int32: "Int", torch.int16: "Short",
            torch.int8: "Char", torch.bool: "Bool", torch.long: "Long"}.get(dtype, str(dtype))


def check_common(input, weight, label_smoothing):
    if input.dim() == 0:
        raise ValueError("Expected 1 or more dimensions (got 0)")
    if input.dtype not in _FLOAT_DTYPES:
        raise NotImplementedError(
            f"cross_entropy: input dtype {input.dtype} is not supported; expected one of "
            "float32, float64, float16, bfloat16"
        )
    check_label_smoothing(label_smoothing)
    if weight is not None:
        check_class_weight_shape(weight, input.shape[1] if input.dim() > 1 else input.shape[0])
        if weight.device != input.device:
            raise RuntimeError(
                f"Expected all tensors to be on the same device, but weight is on "
                f"{weight.device} and input is on {input.device}"
            )


def check_label_smoothing(label_smoothing):
    if not 0.0 <= label_smoothing <= 1.0:
        raise RuntimeError(f"label_smoothing must be between 0.0 and 1.0. Got: {label_smoothing}")


def check_class_weight_shape(weight, n_classes):
    if weight.dim() != 1 or weight.numel() != n_classes:
        raise RuntimeError(
            f"weight tensor should be defined either for all {n_classes} classes or no "
            f"classes but got weight tensor of shape: {list(weight.shape)}"
        )


def check_index_weight_dtype(input, weight, autocast):
    """nll_loss wants the weight in the input's dtype; under autocast both are
    first cast to float32 (float64 stays), and the kernels read the weight in
    float32 anyway, so no copy of the logits is needed."""
    def cast(dtype):
        return torch.float32 if autocast and dtype in _AUTOCAST_TO_FLOAT else dtype

    if cast(weight.dtype) != cast(input.dtype):
        raise RuntimeError(
            f"expected scalar type {dtype_name(cast(input.dtype))} but found "
            f"{dtype_name(cast(weight.dtype))} (weight)"
        )


def check_inplace(input):
    """PyTorch's rule for in-place ops, checked before anything is written: no
    leaf, or view of a leaf, that requires grad. (Logits whose elements share
    memory are refused by the op itself, with ATen's internal-overlap check.)"""
    base = input._base if input._base is not None else input
    if base.is_leaf and base.requires_grad:
        what = "a leaf Variable" if base is input else "a view of a leaf Variable"
        raise RuntimeError(
            f"{what} that requires grad is being used in an in-place operation "
            "(cross_entropy with inplace_backward=True overwrites its input); pass a non-leaf "
            "tensor such as the output of the layer that computes the logits"
        )


def check_llm_options(logit_scale, softcap, z_loss_scale):
    def finite_number(value):
        return isinstance(value, (int, float)) and not isinstance(value, bool) and value - value == 0  # not inf, not nan

    if not finite_number(logit_scale) or logit_scale <= 0:
        raise ValueError(f"logit_scale must be a finite number > 0, got {logit_scale!r}")
    if softcap is not None and (not finite_number(softcap) or softcap <= 0):
        raise ValueError(f"softcap must be None or a finite number > 0, got {softcap!r}")
    if not finite_number(z_loss_scale) or z_loss_scale < 0:
        raise ValueError(f"z_loss_scale must be a finite number >= 0, got {z_loss_scale!r}")
