"""The Transformers integration: tiny causal LMs from configs, patched vs unpatched."""
import copy
import functools
import importlib.util
import pathlib

import pytest
import torch

from conftest import TOLERANCES, device_param

transformers = pytest.importorskip("transformers")
fce_hf = pytest.importorskip("fused_softmax_ce.integrations.transformers")

V, B, T = 1000, 2, 16
_LLAMA_LIKE = dict(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2)
CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**_LLAMA_LIKE),
    "mistral": lambda: transformers.MistralConfig(**_LLAMA_LIKE),
    "qwen2": lambda: transformers.Qwen2Config(**_LLAMA_LIKE),
    "qwen3": lambda: transformers.Qwen3Config(**_LLAMA_LIKE, head_dim=16),
    # final_logit_softcapping defaults to 30.0; the fused test sets it to None too.
    "gemma2": lambda: transformers.Gemma2Config(**_LLAMA_LIKE, head_dim=16),
    "gpt2": lambda: transformers.GPT2Config(vocab_size=V, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
    "olmo": lambda: transformers.OlmoConfig(**_LLAMA_LIKE),  # the generic path
}
def make_model(name, dtype=torch.float32, device="cpu", **overrides):
    torch.manual_seed(0)
    config = CONFIGS[name]()
    for key, value in overrides.items():
        setattr(config, key, value)
    return transformers.AutoModelForCausalLM.from_config(config).to(device=device, dtype=dtype)


def batches(device, steps=3):
    """Token batches whose labels have padding (-100) at the end of one row, as a collator makes."""
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(steps):
        ids = torch.randint(0, V, (B, T), generator=g)
        labels = ids.clone()
        labels[1, T - 5:] = -100
        mask = torch.ones_like(ids)
        mask[1, T - 5:] = 0
        out.append((ids.to(device), labels.to(device), mask.to(device)))
    return out


def train(model, data, **call_kwargs):
    # eps: some gradients are zero in exact arithmetic (a key bias's), and
    # AdamW's default eps (1e-8) turns their rounding noise into whole steps.
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, eps=1e-6)
    losses, first_grads = [], None
    for ids, labels, mask in data:
        kwargs = dict(call_kwargs)
        if "num_items_in_batch" in kwargs:  # the Trainer counts the batch's target tokens
            kwargs["num_items_in_batch"] = (labels[:, 1:] != -100).sum()
        loss = model(input_ids=ids, attention_mask=mask, labels=labels, **kwargs).loss
        loss.backward()
        if first_grads is None:  # AdamW is blind to a gradient's scale: check it here
            first_grads = [p.grad.clone() for p in model.parameters()]
        opt.step()
        opt.zero_grad()
        losses.append(loss.detach())
    return torch.stack(losses), first_grads


def assert_trains_alike(name, dtype, device, fused_linear, overrides=None, options=None, **call_kwargs):
    """3 AdamW steps of the model as Transformers trains it and patched with apply(), from the same weights."""
    data = batches(device)
    plain = make_model(name, dtype, device, **(overrides or {}))
    patched = fce_hf.apply(copy.deepcopy(plain), fused_linear=fused_linear, **(options or {}))
    (expected, expected_grads), (got, grads) = train(plain, data, **call_kwargs), train(patched, data, **call_kwargs)
    names = [name for name, _ in plain.named_parameters()]
    if dtype == torch.float32:
        # Gradients: within 1e-5 of each tensor's largest (sums over tokens and
        # chunks round in a different order). Parameters: 1e-5 relative, give
        # or take 1% of one step (lr = 1e-3), as AdamW divides each gradient
        # entry by its own size and so magnifies rounding in the small ones.
        loss_tol, grad_tol, param_tol = (0, 1e-5), 1e-5, (1e-5, 1e-5)
    else:
        loss_tol = param_tol = TOLERANCES[dtype]
        grad_tol = TOLERANCES[dtype][1]
    close = functools.partial(torch.testing.assert_close, check_dtype=False)
    close(got.float(), expected.float(), atol=loss_tol[0], rtol=loss_tol[1])
    for name, g, e in zip(names, grads, expected_grads):
        atol = grad_tol * e.abs().max().item() + 1e-9
        close(g.float(), e.float(), atol=atol, rtol=grad_tol, msg=lambda m: f"grad of {name}: {m}")
    for name, q, p in zip(names, patched.parameters(), plain.parameters()):
        close(q.float(), p.float(), atol=param_tol[0], rtol=param_tol[1],
              msg=lambda m: f"{name}: {m}")


@device_param()
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_trains_like_transformers(name, dtype, device):
    assert_trains_alike(name, dtype, device, fused_linear=False)


@device_param()
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_num_items_in_batch(name, dtype, device):
    assert_trains_alike(name, dtype, device, fused_linear=False, num_items_in_batch=True)


@device_param()
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inplace_backward_option(dtype, device):
    assert_trains_alike("llama", dtype, device, fused_linear=False, options={"inplace_backward": True},
                        num_items_in_batch=True)


@device_param()
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_fused_linear_trains_like_transformers(name, dtype, device):
    assert_trains_alike(name, dtype, device, fused_linear=True)


@device_param()
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_fused_linear_num_items_in_batch(name, dtype, device):
    assert_trains_alike(name, dtype, device, fused_linear=True, num_items_in_batch=True)


@device_param()
def test_fused_linear_without_softcapping(device):
    assert_trains_alike("gemma2", torch.float32, device, fused_linear=True,
                        overrides={"final_logit_softcapping": None})


def labelled_batch(device):
    ids, labels, mask = batches(device, steps=1)[0]
    return dict(input_ids=ids, attention_mask=mask, labels=labels)


@device_param()
@pytest.mark.parametrize("fused_linear", [False, True])
def test_generate_unchanged(fused_linear, device):
    model = make_model("llama", device=device).eval()
    prompt = torch.randint(0, V, (B, 5), device=device)
    expected = model.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)
    fce_hf.apply(model, fused_linear=fused_linear)
    got = model.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(got, expected)


@device_param()
def test_fused_linear_outputs(device):
    model = make_model("llama", device=device)
    batch = labelled_batch(device)
    expected = model(**batch)
    fce_hf.apply(model, fused_linear=True)
    out = model(**batch)
    assert out.logits is None  # never materialised
    torch.testing.assert_close(out.loss, expected.loss, atol=0, rtol=1e-5)
    # labels passed positionally, and a tuple output
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    loss, *_ = model(ids, mask, None, None, None, labels, return_dict=False)
    torch.testing.assert_close(loss, expected.loss, atol=0, rtol=1e-5)
    # without labels: the model's own logits
    torch.testing.assert_close(model(ids, attention_mask=mask).logits, expected.logits)


@device_param()
@pytest.mark.parametrize("fused_linear", [False, True])
def test_shift_labels_and_options(fused_linear, device):
    """Precomputed shift_labels, and our options (label smoothing) passed through."""
    batch = labelled_batch(device)
    shift_labels = torch.nn.functional.pad(batch.pop("labels")[:, 1:], (0, 1), value=-100)
    plain = make_model("qwen2", device=device)
    logits = plain(**batch).logits
    expected = torch.nn.functional.cross_entropy(
        logits.reshape(-1, V).double(), shift_labels.reshape(-1), label_smoothing=0.2)
    fce_hf.apply(plain, fused_linear=fused_linear, label_smoothing=0.2)
    # labels must be given for a loss; with shift_labels they are not read
    got = plain(**batch, labels=torch.zeros_like(shift_labels), shift_labels=shift_labels).loss
    torch.testing.assert_close(got.double(), expected, atol=0, rtol=1e-5)


@device_param()
@pytest.mark.parametrize("fused_linear", [False, True])
def test_revert(fused_linear, device):
    model = make_model("gpt2", device=device)
    batch = labelled_batch(device)
    before = dict(model.__dict__)
    expected = model(**batch).loss
    fce_hf.apply(model, fused_linear=fused_linear)
    assert fce_hf.revert(model) is model
    assert model.__dict__.keys() == before.keys()
    assert model.loss_function is transformers.loss.loss_utils.ForCausalLMLoss
    out = model(**batch)
    assert out.loss.grad_fn.name() == expected.grad_fn.name()  # Transformers' own loss again
    assert out.logits is not None
    with pytest.raises(RuntimeError, match="not patched"):
        fce_hf.revert(model)


def test_float16_sum_does_not_overflow():
    """With num_items_in_batch the sum is taken in float32, as Transformers' upcast does."""
    n = 4096
    logits = (torch.randn(1, n, V, dtype=torch.float64) * 8).to(torch.float16)
    labels = torch.randint(0, V, (1, n))
    loss = fce_hf.CausalLMLoss()(logits, labels, V, num_items_in_batch=torch.tensor(n - 1))
    expected = transformers.loss.loss_utils.ForCausalLMLoss(
        logits.double(), labels, V, num_items_in_batch=torch.tensor(n - 1))
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, expected, atol=0, rtol=TOLERANCES[torch.float16][1])


def test_errors():
    model = make_model("llama")
    with pytest.raises(TypeError, match="unexpected loss option 'label_smoothin'"):
        fce_hf.apply(model, label_smoothin=0.1)
    with pytest.raises(TypeError, match="reduction='sum' is not allowed"):
        fce_hf.apply(model, reduction="sum")
    with pytest.raises(TypeError, match="return_stats"):
        fce_hf.apply(model, return_stats=True)
    fce_hf.apply(model)
    with pytest.raises(RuntimeError, match="already patched"):
        fce_hf.apply(model)
    classifier = transformers.LlamaForSequenceClassification(CONFIGS["llama"]())
    with pytest.raises(TypeError, match="ForCausalLMLoss"):
        fce_hf.apply(classifier)
    with pytest.raises(TypeError, match="no loss_function hook"):
        fce_hf.apply(torch.nn.Linear(2, 2))


def test_fused_linear_refuses_what_it_cannot_reproduce():
    odd_head = make_model("llama")
    odd_head.lm_head = torch.nn.Sequential(odd_head.lm_head)
    with pytest.raises(TypeError, match="expected a plain torch.nn.Linear"):
        fce_hf.apply(odd_head, fused_linear=True)
    # Cohere multiplies the logits by logit_scale before its loss.
    cohere = transformers.CohereForCausalLM(transformers.CohereConfig(**_LLAMA_LIKE))
    fce_hf.apply(cohere, fused_linear=True)
    with pytest.raises(NotImplementedError, match="transforms the lm_head's output"):
        cohere(**labelled_batch("cpu"))
    gemma = make_model("gemma2")
    with pytest.raises(TypeError, match="conflicts with the model's final_logit_softcapping"):
        fce_hf.apply(gemma, fused_linear=True, softcap=5.0)



def test_example_runs():
    """examples/hf_causal_lm.py, made smaller still through its flags."""
    path = pathlib.Path(__file__).resolve().parents[1] / "examples" / "hf_causal_lm.py"
    spec = importlib.util.spec_from_file_location("hf_causal_lm", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    results = example.main(["--vocab", "1000", "--seq", "32", "--steps", "2", "--device", "cpu"])
    (expected, _), *patched = results.values()
    assert len(patched) == 2
    for losses, _peak in patched:  # nothing is asserted about memory
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(expected), atol=0, rtol=1e-5)


@pytest.mark.parametrize("name", ["gpt2", "gemma2"])
def test_parity_models_tie_embeddings(name):
    """So the parity tests above cover tied embeddings (one weight, two gradients)."""
    model = make_model(name)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight


def test_deepcopy_of_patched_model_is_patched_on_its_own():
    model = fce_hf.apply(make_model("llama"), fused_linear=True)
    clone = copy.deepcopy(model)
    batch = labelled_batch("cpu")
    with torch.no_grad():
        clone.lm_head.weight.mul_(2)
    assert clone(**batch).logits is None
    assert not torch.allclose(clone(**batch).loss, model(**batch).loss)
    fce_hf.revert(clone)
    assert model(**batch).logits is None  # the original is still patched


@pytest.mark.parametrize("fused_linear", [False, True])
@pytest.mark.parametrize("dtype, num_items_in_batch", [
    (torch.bfloat16, False), (torch.bfloat16, True), (torch.float16, False),  # float16's sum was float32 already
    (torch.float64, False), (torch.float64, True)], ids=str)
def test_loss_is_float32_as_transformers(dtype, num_items_in_batch, fused_linear):
    """Transformers computes the loss from logits.float(): a float32 loss, not
    rounded to a half-precision model's dtype, and float32 for float64 models."""
    ids, labels, mask = batches("cpu", steps=1)[0]
    kwargs = dict(num_items_in_batch=(labels[:, 1:] != -100).sum()) if num_items_in_batch else {}
    plain = make_model("llama", dtype)
    patched = fce_hf.apply(copy.deepcopy(plain), fused_linear=fused_linear)
    if fused_linear and dtype != torch.float64:
        # The same logits: on the CPU, linear_cross_entropy multiplies half precision in float32.
        head = plain.lm_head
        head.forward = lambda h: torch.nn.functional.linear(h.float(), head.weight.float())
    with torch.no_grad():
        expected = plain(input_ids=ids, attention_mask=mask, labels=labels, **kwargs).loss
        got = patched(input_ids=ids, attention_mask=mask, labels=labels, **kwargs).loss
    assert got.dtype == expected.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=2e-6, rtol=2e-5)
