"""Hugging Face Transformers: make one causal LM instance use this package's loss.

    from fused_softmax_ce.integrations import transformers as fce_hf
    fce_hf.apply(model)                      # our cross_entropy on the model's logits
    fce_hf.apply(model, fused_linear=True)   # loss from hidden states; logits never built
    fce_hf.revert(model)

Only the instance is patched, never Transformers' classes. ``loss_options``
are passed to ``fused_softmax_ce.cross_entropy`` (or ``linear_cross_entropy``
with ``fused_linear=True``), e.g. ``label_smoothing=0.1``.
"""
import functools
import inspect
import types

import torch
import torch.nn.functional as F
from torch import nn

import fused_softmax_ce

try:
    from transformers.loss.loss_utils import ForCausalLMLoss
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "fused_softmax_ce.integrations.transformers needs transformers>=4.46 "
        "(pip install fused_softmax_ce[transformers])"
    ) from e

__all__ = ["apply", "revert"]

_STATE = "_fsce_patch"
# Set by the integration from the model's call, as Transformers does; not options.
_RESERVED = ("input", "target", "linear_weight", "linear_bias", "reduction", "size_average",
             "reduce", "ignore_index")


def apply(model, *, fused_linear=False, **loss_options):
    """Patch ``model`` (a Transformers ``*ForCausalLM`` instance) in place and return it.

    ``fused_linear=False``: the model's loss hook (``model.loss_function``)
    becomes our ``cross_entropy`` on the model's logits, in their dtype (no
    float32 copy), with Transformers' label shift, ``ignore_index``,
    ``shift_labels`` and ``num_items_in_batch``.

    ``fused_linear=True``: when ``labels`` are given, the loss is computed from
    the final hidden states and the ``lm_head`` weight by
    ``linear_cross_entropy``; the logits are never materialised and the
    output's ``logits`` is None. Without labels (generation) the model runs
    unchanged. Gemma's ``final_logit_softcapping`` becomes the ``softcap``
    option.
    """
    if hasattr(model, _STATE):
        raise RuntimeError(f"{type(model).__name__} is already patched; call revert(model) first")
    hook = getattr(type(model), "loss_function", None)
    if not isinstance(hook, property) or hook.fset is None:
        raise TypeError(
            f"cannot patch {type(model).__name__}: it has no loss_function hook "
            "(expected a transformers>=4.46 PreTrainedModel)"
        )
    if model.loss_function is not ForCausalLMLoss:
        raise TypeError(
            f"cannot patch {type(model).__name__}: its loss is {_name(model.loss_function)}, "
            "expected Transformers' ForCausalLMLoss (a *ForCausalLM model without a custom loss)"
        )
    loss_fn = _loss_fn(fused_linear)
    options = _check_options(loss_fn, loss_options)
    if fused_linear:
        _check_head(model)
        cap = getattr(model.config, "final_logit_softcapping", None)
        if cap is not None:
            if "softcap" in options:
                raise TypeError(
                    f"loss option softcap={options['softcap']} conflicts with the model's "
                    f"final_logit_softcapping={cap}"
                )
            options["softcap"] = cap
        state = {"forward": model.__dict__.get("forward")}
        model._fsce_inner_forward = model.forward
        model._fsce_options = options
        model.forward = types.MethodType(_fused_forward_for(type(model).forward), model)
    else:
        state = {"loss_function": model.__dict__.get("_loss_function")}
        model.loss_function = CausalLMLoss(**options)
    setattr(model, _STATE, state)
    return model


def revert(model):
    """Undo ``apply(model)`` and return the model."""
    state = model.__dict__.pop(_STATE, None)
    if state is None:
        raise RuntimeError(f"{type(model).__name__} is not patched by fused_softmax_ce")
    if "forward" in state:
        del model.forward, model._fsce_inner_forward, model._fsce_options
        if state["forward"] is not None:
            model.forward = state["forward"]
    else:
        del model._loss_function
        if state["loss_function"] is not None:
            model.loss_function = state["loss_function"]
    return model


class CausalLMLoss:
    """Transformers' ``ForCausalLMLoss`` computed by ``fused_softmax_ce.cross_entropy``.

    Called with the same arguments and giving the same result, float32; the
    logits are not upcast (no float32 copy). Other
    keyword arguments that Transformers forwards from the model call are
    ignored, as ``ForCausalLMLoss`` does.
    """

    def __init__(self, **options):
        self.options = options

    def __call__(self, logits, labels, vocab_size, num_items_in_batch=None, ignore_index=-100,
                 shift_labels=None, **kwargs):
        target = _shifted_labels(labels, shift_labels, ignore_index, logits.device)
        logits = logits.reshape(-1, vocab_size)
        return _reduced(
            lambda reduction: fused_softmax_ce.cross_entropy(
                logits, target, ignore_index=ignore_index, reduction=reduction, **self.options),
            logits, num_items_in_batch,
        )


def _shifted_labels(labels, shift_labels, ignore_index, device):
    """Tokens < n predict n: as ForCausalLMLoss, the last position gets ignore_index."""
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    return shift_labels.reshape(-1).to(device)


def _reduced(loss_of, logits_or_hidden, num_items_in_batch):
    """The mean over tokens, or the sum over num_items_in_batch (the Trainer's
    gradient accumulation), in float32 like Transformers' loss, which upcasts
    the logits (and downcasts float64 ones).

    Half-precision logits are not copied: autocast to their own dtype makes
    our loss read them as they are and return its float32 accumulation,
    unrounded, as PyTorch's cross_entropy does under autocast.
    """
    dtype = logits_or_hidden.dtype
    with torch.autocast(logits_or_hidden.device.type, dtype=dtype, enabled=dtype in (torch.float16, torch.bfloat16)):
        if num_items_in_batch is None:
            return loss_of("mean").to(torch.float32)
        total = loss_of("sum").to(torch.float32)
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


def _loss_fn(fused_linear):
    if not fused_linear:
        return fused_softmax_ce.cross_entropy
    fn = getattr(fused_softmax_ce, "linear_cross_entropy", None)
    if fn is None:
        raise NotImplementedError(
            "fused_linear=True needs fused_softmax_ce.linear_cross_entropy, which this "
            "version of fused_softmax_ce does not have"
        )
    return fn


def _check_options(loss_fn, loss_options):
    params = inspect.signature(loss_fn).parameters
    for name, value in loss_options.items():
        if name in _RESERVED:
            raise TypeError(
                f"loss option {name}={value!r} is not allowed: the integration sets it from the "
                "model's call, as Transformers does (ignore_index=-100; mean, or sum over "
                "num_items_in_batch)"
            )
        if name == "return_stats":
            raise TypeError("loss option return_stats is not supported: the model's loss must be a tensor")
        if name not in params:
            allowed = sorted(n for n in params if n not in _RESERVED and n != "return_stats")
            raise TypeError(
                f"{loss_fn.__name__}() got an unexpected loss option {name!r}; expected one of {allowed}"
            )
    return dict(loss_options)


def _check_head(model):
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear) or type(head).forward is not nn.Linear.forward:
        raise TypeError(
            f"cannot patch {type(model).__name__} with fused_linear=True: its output "
            f"embedding is {type(head).__name__}, expected a plain torch.nn.Linear"
        )
    if "labels" not in inspect.signature(model.forward).parameters:
        raise TypeError(f"cannot patch {type(model).__name__}: its forward takes no labels argument")


def _fused_forward_for(class_forward):
    """The patched forward: the model's own forward with ``labels`` withheld and
    the lm_head replaced, for that call, by a capture of its input."""
    label_pos = list(inspect.signature(class_forward).parameters).index("labels") - 1  # minus self

    @functools.wraps(class_forward)  # generate() inspects the forward's parameters
    def forward(self, *args, **kwargs):
        if label_pos < len(args):
            labels, args = args[label_pos], args[:label_pos] + (None,) + args[label_pos + 1:]
        else:
            labels = kwargs.pop("labels", None)
        if labels is None:
            return self._fsce_inner_forward(*args, **kwargs)

        return_dict = kwargs.pop("return_dict", None)
        if return_dict is None:
            return_dict = getattr(self.config, "return_dict", True)
        head = self.get_output_embeddings()
        captured = []

        def capture(hidden):
            captured.append(hidden)
            captured.append(hidden.new_empty(hidden.shape[:-1] + (0,)))
            return captured[-1]

        head_forward = head.__dict__.get("forward")
        head.forward = capture
        try:
            out = self._fsce_inner_forward(*args, return_dict=True, **kwargs)
        finally:
            del head.forward
            if head_forward is not None:
                head.forward = head_forward
        _check_capture(self, out, captured)

        hidden = captured[0]
        options = self._fsce_options
        ignore_index = kwargs.get("ignore_index", -100)
        target = _shifted_labels(labels, kwargs.get("shift_labels"), ignore_index, hidden.device)
        hidden = hidden.reshape(-1, hidden.shape[-1])
        loss = _reduced(
            lambda reduction: fused_softmax_ce.linear_cross_entropy(
                hidden, head.weight, target, linear_bias=head.bias, ignore_index=ignore_index,
                reduction=reduction, **options),
            hidden, kwargs.get("num_items_in_batch"),
        )
        out = type(out)(**{**out, "loss": loss, "logits": None})
        return out if return_dict else out.to_tuple()

    return forward


def _check_capture(model, out, captured):
    """Refuse what the fused loss cannot reproduce, rather than return a different loss."""
    name = type(model).__name__
    if len(captured) != 2:
        raise RuntimeError(
            f"fused_linear=True: {name}'s forward called its lm_head {len(captured) // 2} times, "
            "expected once"
        )
    softcapped = getattr(model.config, "final_logit_softcapping", None) is not None
    if not softcapped and out.get("logits") is not captured[1]:
        raise NotImplementedError(
            f"fused_linear=True: {name}'s forward transforms the lm_head's output before its loss "
            "(e.g. a logit scale), which linear_cross_entropy cannot reproduce; use fused_linear=False"
        )
    if out.get("aux_loss") is not None:
        raise NotImplementedError(
            f"fused_linear=True: {name} adds an auxiliary loss to its language-model loss, which "
            "this integration does not reproduce; use fused_linear=False"
        )


def _name(fn):
    return getattr(fn, "__qualname__", None) or repr(fn)
