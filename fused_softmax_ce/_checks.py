"""Argument checks with PyTorch's exception types and messages."""
import torch

_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_AUTOCAST_TO_FLOAT = (torch.float16, torch.bfloat16, torch.float32)


def check_index_target(input, target):
    """PyTorch's nll_loss checks, in its order, with its messages and exception types."""
    multi_target = "0D or 1D target tensor expected, multi-target not supported"
    if input.dim() == 1:
        if target.dim() > 1:
            raise RuntimeError(multi_target)
        if target.dtype not in (torch.long, torch.uint8):
            raise RuntimeError(f"expected target dtype to be Long or Byte, but got {dtype_name(target.dtype)}")
        if target.dim() == 1 and target.shape[0] != 1:
            raise ValueError(f"For 1D input, 1D target must have size 1, but got target size: {target.shape[0]}")
        return
    got = target.shape[0] if target.dim() > 0 else 0
    if input.shape[0] != got or target.dim() == 0:
        raise ValueError(f"Expected input batch_size ({input.shape[0]}) to match target batch_size ({got}).")
    expected = [input.shape[0]] + list(input.shape[2:])
    if input.dim() == 2 and target.dim() != 1:
        raise RuntimeError(multi_target)
    if input.dim() == 4 and target.dim() != 3:
        raise RuntimeError("only batches of spatial targets supported (3D tensors) but got targets of "
                           f"dimension: {target.dim()}")
    if list(target.shape) != expected:
        if input.dim() == 4:
            raise RuntimeError(f"size mismatch (got input: {list(input.shape)} , target: {list(target.shape)}")
        raise RuntimeError(f"Expected target size {expected}, got {list(target.shape)}")
    if target.dtype not in (torch.long, torch.uint8):
        raise RuntimeError(f"expected target dtype to be Long or Byte, but got {dtype_name(target.dtype)}")


def check_zero_dim_input(input, target):
    """A 0-d input: PyTorch's errors, which depend on the target."""
    if target.dim() > 0:
        raise IndexError("Dimension out of range (expected to be in range of [-1, 0], but got 1)")
    if not target.is_floating_point():
        raise RuntimeError(f"Expected floating point type for target with class probabilities, got "
                           f"{dtype_name(target.dtype)}")
    raise IndexError("Dimension specified as 1 but tensor has no dimensions")


def dtype_name(dtype):
    return {torch.float32: "Float", torch.float64: "Double", torch.float16: "Half",
            torch.bfloat16: "BFloat16", torch.int32: "Int", torch.int16: "Short",
            torch.int8: "Char", torch.bool: "Bool", torch.long: "Long"}.get(dtype, str(dtype))


def check_common(input, weight):
    if input.dim() == 0:
        raise ValueError("Expected 1 or more dimensions (got 0)")
    if input.dtype not in _FLOAT_DTYPES:
        raise NotImplementedError(
            f"cross_entropy: input dtype {input.dtype} is not supported; expected one of "
            "float32, float64, float16, bfloat16"
        )
    if weight is not None:
        check_class_weight_shape(weight, input.shape[1] if input.dim() > 1 else input.shape[0])
        if weight.device != input.device:
            raise RuntimeError(
                f"Expected all tensors to be on the same device, but weight is on "
                f"{weight.device} and input is on {input.device}"
            )


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


def check_inplace(input, target, weight):
    """PyTorch's rule for in-place ops, checked before anything is written: no
    leaf, or view of a leaf, that requires grad. (Logits whose elements share
    memory are refused by the op itself, with ATen's internal-overlap check.)
    Nor a target or class weight that requires grad: their gradients need the
    logits' values, which the in-place forward overwrites."""
    base = input._base if input._base is not None else input
    if base.is_leaf and base.requires_grad:
        what = "a leaf Variable" if base is input else "a view of a leaf Variable"
        raise RuntimeError(
            f"{what} that requires grad is being used in an in-place operation "
            "(cross_entropy with inplace_backward=True overwrites its input); pass a non-leaf "
            "tensor such as the output of the layer that computes the logits"
        )
    for name, t in (("target", target), ("weight", weight)):
        if t is not None and t.requires_grad:
            raise RuntimeError(
                f"cross_entropy with inplace_backward=True cannot compute the gradient of {name} "
                f"({name}.requires_grad=True): it needs the logits' values, which the forward "
                "overwrites; use inplace_backward=False, or detach() it"
            )


def check_weight_not_differentiable(weight):
    """PyTorch's nll_loss has no weight gradient and refuses, at the forward,
    a weight that requires grad (index targets; probability targets have one)."""
    if weight.requires_grad and torch.is_grad_enabled():
        raise RuntimeError(
            "The function 'nll_loss_forward' is not differentiable with respect to argument 'weight'. "
            "This input cannot have requires_grad True."
        )


def token_weight_rows(token_weight, loss_shape, device, acc):
    """The per-token weights as one `acc` value per row (the rows' order is
    the ``reduction="none"`` loss's), or None; they get no gradient."""
    if token_weight is None:
        return None
    if not torch.is_tensor(token_weight) or not token_weight.is_floating_point():
        got = f"a tensor of dtype {token_weight.dtype}" if torch.is_tensor(token_weight) else repr(token_weight)
        raise ValueError(f"token_weight must be a floating-point tensor, got {got}")
    if token_weight.requires_grad:
        raise ValueError("token_weight must not require grad (it gets no gradient; pass token_weight.detach()), "
                         f"got a tensor of shape {list(token_weight.shape)} with requires_grad=True")
    if tuple(token_weight.shape) != tuple(loss_shape):
        raise ValueError(f"token_weight must have the target's shape {list(loss_shape)} (one weight per "
                         f"token), got {list(token_weight.shape)}")
    if token_weight.device != device:
        raise RuntimeError(f"Expected all tensors to be on the same device, but token_weight is on "
                           f"{token_weight.device} and input is on {device}")
    return token_weight.reshape(-1).to(acc)
