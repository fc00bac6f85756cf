"""Vocab-parallel cross-entropy (process_group=...) in spawned gloo groups on
loopback, against the single-process result on the full logits."""
import datetime
import multiprocessing
import os
import socket
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch

from conftest import TOLERANCES, random_logits, random_probs, random_targets

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_S = 60  # every collective, and the join of the spawned group

# Per case: the keyword arguments, and what the targets are: "index",
# "ignore" (index targets with ignored rows), or "prob".
CASES = [
    ("index", dict(reduction="mean")),
    ("index", dict(reduction="sum", label_smoothing=0.2)),
    ("ignore", dict(reduction="none", label_smoothing=0.1)),
    ("ignore", dict(reduction="mean", weight=True, label_smoothing=0.3)),
    ("index", dict(reduction="sum", weight=True)),
    ("prob", dict(reduction="mean")),
    ("prob", dict(reduction="none", weight=True, label_smoothing=0.2)),
    ("ignore", dict(reduction="mean", z_loss_scale=0.01, softcap=4.0, logit_scale=0.7, return_stats=True)),
    ("prob", dict(reduction="sum", z_loss_scale=0.02, return_stats=True)),
    ("index", dict(reduction="none", return_stats=True, spatial=True)),
    ("ignore", dict(reduction="mean", weight=True, z_loss_scale=0.01, inplace_backward=True, label_smoothing=0.1)),
    ("ignore", dict(reduction="mean", weight=True, label_smoothing=0.1, token_weight=True, return_stats=True)),
    ("index", dict(reduction="none", softcap=3.0, token_weight=True, inplace_backward=True, return_stats=True)),
    ("prob", dict(reduction="none", weight=True, inplace_backward=True, softcap=3.0)),
]


# linear_cross_entropy's keyword arguments per case, and flags: "bias",
# "weight" (class weights), "ignore" (ignored rows), "batch" (a (B, T, H)
# input), "frozen" (an input that does not require grad).
LINEAR_CASES = [
    dict(reduction="mean"),
    dict(reduction="sum", label_smoothing=0.2, bias=True, chunk_size=4),
    dict(reduction="none", ignore=True, weight=True, label_smoothing=0.1, bias=True, chunk_size=2),
    dict(reduction="mean", ignore=True, weight=True, label_smoothing=0.3, chunk_size=1),
    dict(reduction="mean", ignore=True, z_loss_scale=0.01, softcap=4.0, logit_scale=0.7, return_stats=True,
         bias=True, chunk_size=3),
    dict(reduction="none", batch=True, weight=True, z_loss_scale=0.02, return_stats=True),
    dict(reduction="sum", ignore=True, weight=True, return_stats=True, chunk_size=5),
    dict(reduction="none", frozen=True, bias=True, softcap=2.0, chunk_size=3),
    dict(reduction="mean", ignore=True, weight=True, label_smoothing=0.1, token_weight=True, return_stats=True,
         chunk_size=2),
]
LINEAR_FLAGS = ("bias", "weight", "ignore", "batch", "frozen", "token_weight")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_case(kind, kw, dtype, total, seed):
    """The full-width inputs, identical on every rank (same seed)."""
    torch.manual_seed(seed)
    n = 6
    shape = (n, total, 3) if kw.get("spatial") else (n, total)
    logits = random_logits(shape, dtype, "cpu")
    if kind == "prob":
        target = torch.softmax(random_logits(shape, torch.float64, "cpu"), 1).to(dtype)
    else:
        rows = (n, 3) if kw.get("spatial") else (n,)
        target = random_targets(total, rows, "cpu", ignore_index=-100 if kind == "ignore" else None, ignore_every=3)
    weight = torch.rand(total, dtype=torch.float64).add(0.5).to(dtype) if kw.get("weight") else None
    return logits, target, weight


def options(kw):
    return {k: v for k, v in kw.items() if k not in ("weight", "spatial", "inplace_backward", "token_weight")}


def check_case(kind, kw, dtype, sizes, rank, group, seed):
    import fused_softmax_ce

    total = sum(sizes)
    lo, hi = sum(sizes[:rank]), sum(sizes[:rank + 1])
    logits, target, weight = make_case(kind, kw, dtype, total, seed)
    prob = kind == "prob"
    upstream = torch.rand(target.shape[0], *([3] if kw.get("spatial") else []), dtype=torch.float64)
    tw = torch.randn(upstream.shape) if kw.get("token_weight") else None  # advantages, of either sign

    def run(x, t, w, **extra):
        out = fused_softmax_ce.cross_entropy(x, t, weight=w, token_weight=tw, **options(kw), **extra)
        loss = out.loss if kw.get("return_stats") else out
        total_loss = (loss * upstream.to(loss.dtype)).sum() if kw["reduction"] == "none" else loss
        if kw.get("return_stats") and not kw.get("inplace_backward"):
            # The lse and the entropy are differentiable.
            total_loss = total_loss + 0.3 * out.lse.sum() - 0.2 * (out.entropy * upstream.to(loss.dtype)).sum()
        return out, total_loss

    # The reference: one process, the full logits.
    x_full = logits.clone().requires_grad_()
    t_full = target.clone().requires_grad_() if prob and not kw.get("inplace_backward") else target
    ref, ref_total = run(x_full, t_full, weight)
    ref_total.backward()

    # This rank's shard.
    x = logits[:, lo:hi].clone().requires_grad_()
    t = target[:, lo:hi].clone() if prob else target
    if prob and not kw.get("inplace_backward"):
        t.requires_grad_()
    w = None if weight is None else weight[lo:hi].clone()
    if kw.get("inplace_backward"):
        x_in = x * 1  # a non-leaf, whose storage receives the gradient
        out, total_loss = run(x_in, t, w, process_group=group, inplace_backward=True)
    else:
        out, total_loss = run(x, t, w, process_group=group)
    total_loss.backward()

    atol, rtol = TOLERANCES[dtype]

    def close(actual, expected, what):
        torch.testing.assert_close(actual.double(), expected.double(), atol=atol, rtol=rtol,
                                   msg=lambda m: f"{kind} {kw} {dtype} {sizes} rank {rank}: {what}: {m}")

    if kw.get("return_stats"):
        for field in ("loss", "z_loss", "lse", "accuracy", "entropy"):
            close(getattr(out, field), getattr(ref, field), field)
            assert getattr(out, field).dtype == getattr(ref, field).dtype, field
    else:
        close(out, ref, "loss")
        assert out.dtype == ref.dtype and out.shape == ref.shape
    close(x.grad, x_full.grad[:, lo:hi], "grad of the logits' slice")
    if kw.get("inplace_backward") and kw.get("return_stats"):
        # The statistics carry no gradient in place: using one in a loss raises, never a silent zero.
        for field in ("lse", "entropy", "z_loss"):
            stats, _ = run(x * 1, t, w, process_group=group, inplace_backward=True)
            try:
                (stats.loss.sum() + getattr(stats, field).sum()).backward()
            except RuntimeError as e:
                assert "not differentiable" in str(e), e
            else:
                raise AssertionError(f"backpropagating through the in-place {field} did not raise")
    if prob and not kw.get("inplace_backward"):
        close(t.grad, t_full.grad[:, lo:hi], "grad of the target's slice")


def check_linear_case(kw, dtype, sizes, rank, group, seed):
    """linear_cross_entropy on this rank's rows of the weight against the
    single process on the full weight in float64; the input's gradient
    summed over the ranks against the full one."""
    import torch.distributed as dist

    import fused_softmax_ce

    total = sum(sizes)
    lo, hi = sum(sizes[:rank]), sum(sizes[:rank + 1])
    torch.manual_seed(seed)
    rows, hidden = ((2, 4) if kw.get("batch") else (7,)), 5
    x = random_logits(rows + (hidden,), dtype, "cpu", scale=1.0)
    w = random_logits((total, hidden), dtype, "cpu", scale=1.0)
    b = random_logits((total,), dtype, "cpu", scale=0.5) if kw.get("bias") else None
    y = random_targets(total, rows, "cpu", ignore_index=-100 if kw.get("ignore") else None, ignore_every=3)
    cw = torch.rand(total, dtype=torch.float64).add(0.5).to(dtype) if kw.get("weight") else None
    upstream = torch.rand(rows if kw["reduction"] == "none" else (), dtype=torch.float64) + 0.5
    options = {k: v for k, v in kw.items() if k not in LINEAR_FLAGS}
    if kw.get("token_weight"):
        options["token_weight"] = torch.randn(rows)

    def run(x, w, b, cw, **extra):
        """The result and the gradients {name: grad} of the leaves."""
        leaves = {name: t.clone().requires_grad_(name != "input" or not kw.get("frozen"))
                  for name, t in (("input", x), ("weight", w), ("bias", b)) if t is not None}
        out = fused_softmax_ce.linear_cross_entropy(leaves["input"], leaves["weight"], y,
                                                    linear_bias=leaves.get("bias"), weight=cw, **options, **extra)
        loss = out.loss if kw.get("return_stats") else out
        leaves = {name: t for name, t in leaves.items() if t.requires_grad}
        objective = (loss * upstream.to(loss.dtype)).sum()
        if kw.get("return_stats"):  # the entropy is differentiable (its backward recomputes the chunks)
            objective = objective - 0.2 * out.entropy.sum()
        grads = torch.autograd.grad(objective, list(leaves.values()))
        return out, dict(zip(leaves, grads))

    def f64(t):
        return None if t is None else t.double()

    ref, ref_grads = run(f64(x), f64(w), f64(b), f64(cw))
    out, grads = run(x, w[lo:hi], None if b is None else b[lo:hi], None if cw is None else cw[lo:hi],
                     process_group=group)
    atol, rtol = TOLERANCES[dtype]

    def close(actual, expected, what):
        torch.testing.assert_close(actual.double(), expected.double(), atol=atol, rtol=rtol,
                                   msg=lambda m: f"linear {kw} {dtype} {sizes} rank {rank}: {what}: {m}")

    stats = kw.get("return_stats")
    for field in ("z_loss", "lse", "accuracy", "entropy") if stats else ():
        close(getattr(out, field), getattr(ref, field), field)
    loss, ref_loss = (out.loss, ref.loss) if stats else (out, ref)
    close(loss, ref_loss, "loss")
    assert loss.dtype == dtype and loss.shape == ref_loss.shape
    assert grads.keys() == ref_grads.keys() and all(g.dtype == dtype for g in grads.values())
    if "input" in grads:
        # The input's gradient is this rank's term: the ranks' terms add up to it.
        grad_input = grads["input"].clone()
        dist.all_reduce(grad_input, group=group)
        close(grad_input, ref_grads["input"], "grad of the input, summed over the ranks")
    close(grads["weight"], ref_grads["weight"][lo:hi], "grad of the weight's rows")
    if b is not None:
        close(grads["bias"], ref_grads["bias"][lo:hi], "grad of the bias's slice")


def check_linear_errors(sizes, rank, group):
    import fused_softmax_ce

    total = sum(sizes)
    x = random_logits((4, 3), torch.float64, "cpu").requires_grad_()
    w = random_logits((sizes[rank], 3), torch.float64, "cpu").requires_grad_()
    y = torch.randint(0, total, (4,))
    with pytest.raises(IndexError, match="out of bounds"):
        fused_softmax_ce.linear_cross_entropy(x, w, torch.full((4,), total), process_group=group)
    with pytest.raises(RuntimeError, match="weight"):  # the full-width class weight, not this rank's slice
        fused_softmax_ce.linear_cross_entropy(x, w, y, weight=torch.ones(total, dtype=torch.float64),
                                              process_group=group)
    loss = fused_softmax_ce.linear_cross_entropy(x, w, y, process_group=group)
    with pytest.raises(RuntimeError, match="higher-order gradients"):
        torch.autograd.grad(loss, x, create_graph=True)
    stats = fused_softmax_ce.linear_cross_entropy(x, w, y, z_loss_scale=0.1, return_stats=True,
                                                  process_group=group)
    with pytest.raises(RuntimeError, match="not differentiable"):
        (stats.loss + stats.lse.sum()).backward()
    # Every row ignored: the mean is nan and the gradients zero, as on one process.
    loss = fused_softmax_ce.linear_cross_entropy(x, w, torch.full((4,), -100), label_smoothing=0.1,
                                                 z_loss_scale=0.1, process_group=group)
    grads = torch.autograd.grad(loss, (x, w))
    assert loss.isnan() and not any(g.any() for g in grads)
    rows = 5 if rank == 0 else 4  # rank 0 holds one row more than the others
    with pytest.raises((ValueError, RuntimeError), match="disagree on the number of rows"):
        fused_softmax_ce.linear_cross_entropy(x.new_ones(rows, 3), w, torch.zeros(rows, dtype=torch.long),
                                              process_group=group)


def check_linear_memory(sizes, rank, group):
    """Nothing N x V_k-sized is allocated in the forward or the backward:
    the logits live in chunks (here 4 rows)."""
    import fused_softmax_ce

    # This rank's rows of the output layer: N x V_k dwarfs the O(world x N) all_gather.
    n, classes = 128, 200 * (rank + 1)
    x = random_logits((n, 4), torch.float64, "cpu").requires_grad_()
    w = random_logits((classes, 4), torch.float64, "cpu").requires_grad_()
    y = torch.randint(0, 100 * len(sizes) * (len(sizes) + 1), (n,))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        stats = fused_softmax_ce.linear_cross_entropy(x, w, y, chunk_size=4, label_smoothing=0.1, z_loss_scale=0.01,
                                                      return_stats=True, process_group=group)
        stats.loss.backward()
    largest = max(e.cpu_memory_usage for e in prof.events())
    assert 0 < largest < n * classes * 8 // 4, largest


def check_errors(sizes, rank, group):
    import fused_softmax_ce

    total = sum(sizes)
    x = random_logits((4, sizes[rank]), torch.float64, "cpu")
    bad = torch.full((4,), total)  # one past the last class
    with pytest.raises(IndexError):
        fused_softmax_ce.cross_entropy(x, bad, process_group=group)
    loss = fused_softmax_ce.cross_entropy(x.requires_grad_(), bad % total, process_group=group)
    with pytest.raises(RuntimeError, match="higher-order gradients"):
        torch.autograd.grad(loss, x, create_graph=True)
    # Rank 0 holds one row more than the others.
    rows = 5 if rank == 0 else 4
    x = random_logits((rows, sizes[rank]), torch.float64, "cpu")
    with pytest.raises((ValueError, RuntimeError), match="disagree on the number of rows"):
        fused_softmax_ce.cross_entropy(x, torch.zeros(rows, dtype=torch.long), process_group=group)
    with pytest.raises(RuntimeError, match="inplace|in-place|leaf"):
        fused_softmax_ce.cross_entropy(x.requires_grad_(), torch.zeros(rows, dtype=torch.long),
                                       process_group=group, inplace_backward=True)


def check_class_weight_grad(sizes, rank, group, seed):
    """Probability targets: this rank's slices of the target's and the class
    weight's gradients are those of the full classes; the in-place mode,
    which overwrites the logits they need, refuses them on every rank."""
    import torch.nn.functional as F

    import fused_softmax_ce

    torch.manual_seed(seed)  # the same full problem on every rank
    total = sum(sizes)
    local = slice(sum(sizes[:rank]), sum(sizes[:rank + 1]))
    x, y = random_logits((4, total), torch.float64, "cpu"), random_probs((4, total), torch.float64, "cpu")
    w = torch.rand(total, dtype=torch.float64) + 0.1
    full = [t.clone().requires_grad_() for t in (x, y, w)]
    F.cross_entropy(full[0], full[1], weight=full[2], label_smoothing=0.1).backward()
    shard = [t.clone().requires_grad_() for t in (x[:, local], y[:, local], w[local])]
    fused_softmax_ce.cross_entropy(shard[0], shard[1], weight=shard[2], label_smoothing=0.1,
                                   process_group=group).backward()
    for got, expected in zip(shard, full):
        torch.testing.assert_close(got.grad, expected.grad[..., local], atol=1e-10, rtol=1e-10)
    with pytest.raises(RuntimeError, match="cannot compute the gradient of weight"):
        fused_softmax_ce.cross_entropy(shard[0] * 1, y[:, local], weight=shard[2], inplace_backward=True,
                                       process_group=group)


def check_zero_weight_sum(sizes, rank, group, seed):
    """A smoothed, weighted mean whose target weights sum to 0 (the nll and
    smoothing parts divided apart): PyTorch's infinities, in both modes and
    through linear_cross_entropy."""
    import torch.nn.functional as F

    import fused_softmax_ce

    torch.manual_seed(seed)  # the same full problem on every rank
    total = sum(sizes)
    local = slice(sum(sizes[:rank]), sum(sizes[:rank + 1]))
    h = 3
    x, w = torch.randn(6, h, dtype=torch.float64), torch.randn(total, h, dtype=torch.float64)
    weight = torch.rand(total, dtype=torch.float64) + 0.5
    y = torch.tensor([0, total - 1, 0, total - 1, -100, 0])
    logits = x @ w.T
    # 3 rows of class 0, 2 of the last: sum of w_y = 0 exactly. The sign that
    # makes the nll and smoothing parts agree gives an infinity (else nan).
    for sign in (1.0, -1.0):
        weight[0], weight[total - 1] = sign, -1.5 * sign
        expected = F.cross_entropy(logits, y, weight=weight, label_smoothing=0.2)
        if expected.isinf():
            break
    assert expected.isinf(), expected  # the case: PyTorch's infinity (nan before)
    for inplace in (False, True):
        z = logits[:, local].clone().requires_grad_() * 1
        got = fused_softmax_ce.cross_entropy(z, y, weight=weight[local], label_smoothing=0.2,
                                             inplace_backward=inplace, process_group=group)
        assert torch.equal(got, expected), (inplace, got, expected)
    got = fused_softmax_ce.linear_cross_entropy(x, w[local], y, weight=weight[local], label_smoothing=0.2,
                                                chunk_size=4, process_group=group)
    assert torch.equal(got, expected), (got, expected)


def check_linear_autocast(sizes, rank, group, seed):
    """Under autocast the loss is float32, as PyTorch's on the full weight."""
    import torch.nn.functional as F

    import fused_softmax_ce

    torch.manual_seed(seed)  # the same full problem on every rank
    local = slice(sum(sizes[:rank]), sum(sizes[:rank + 1]))
    h, w = random_logits((4, 3), torch.bfloat16, "cpu"), random_logits((sum(sizes), 3), torch.float32, "cpu")
    y = torch.randint(0, sum(sizes), (4,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = F.linear_cross_entropy(h, w, y)
        got = fused_softmax_ce.linear_cross_entropy(h, w[local], y, process_group=group)
    assert got.dtype == expected.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=TOLERANCES[torch.bfloat16][0], rtol=TOLERANCES[torch.bfloat16][1])


def check_second_split(sizes, rank, group, seed):
    """A second class split of the group in which rank 0 keeps its local
    class count: the CPU reads the split on every call, so both splits give
    the loss of the full classes on every rank, and none waits for the others."""
    import torch.nn.functional as F

    import fused_softmax_ce

    torch.manual_seed(seed)  # the same full problem on every rank
    for split in (sizes, [sizes[0]] + [s + 1 for s in sizes[1:]]):
        local = slice(sum(split[:rank]), sum(split[:rank + 1]))
        h, w = random_logits((4, 3), torch.float64, "cpu"), random_logits((sum(split), 3), torch.float64, "cpu")
        y = torch.randint(0, sum(split), (4,))
        expected = F.cross_entropy(h @ w.t(), y)
        got = fused_softmax_ce.cross_entropy((h @ w.t())[:, local], y, process_group=group)
        torch.testing.assert_close(got, expected, atol=1e-10, rtol=1e-10)
        got = fused_softmax_ce.linear_cross_entropy(h, w[local], y, process_group=group)
        torch.testing.assert_close(got, expected, atol=1e-10, rtol=1e-10)


def check_matches_full_logits(sizes, rank, group, seed):
    uneven = len(set(sizes)) > 1  # linear_cross_entropy runs in these groups only, to save time
    for dtype in (torch.float64, torch.float32):
        for seed, (kind, kw) in enumerate(CASES):
            check_case(kind, kw, dtype, sizes, rank, group, seed)
        for seed, kw in enumerate(LINEAR_CASES if uneven else []):
            check_linear_case(kw, dtype, sizes, rank, group, seed)
    check_errors(sizes, rank, group)
    if uneven:
        for seed, kw in enumerate(LINEAR_CASES[3:6]):  # bf16 runs its matmuls in fp32 on the CPU
            check_linear_case(kw, torch.bfloat16, sizes, rank, group, seed)
        check_linear_errors(sizes, rank, group)
        check_linear_memory(sizes, rank, group)


def worker(rank, sizes, port, results, check, seed):
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=len(sizes), timeout=datetime.timedelta(seconds=TIMEOUT_S))
        group = dist.new_group(list(range(len(sizes))), timeout=datetime.timedelta(seconds=TIMEOUT_S))
        check(sizes, rank, group, seed)
        results.put((rank, None))
    except BaseException:
        results.put((rank, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_group(sizes, check=check_matches_full_logits):
    """check(sizes, rank, group, seed) on every rank of a spawned gloo group; seed is fresh, the same on every rank."""
    seed = int(torch.randint(0, 2**31, ()))
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    env_path = os.environ.get("PYTHONPATH", "")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests"), env_path])
    procs = [ctx.Process(target=worker, args=(r, sizes, port, results, check, seed)) for r in range(len(sizes))]
    try:
        for p in procs:
            p.start()
    finally:
        os.environ["PYTHONPATH"] = env_path
    errors = []
    try:
        for _ in procs:
            rank, error = results.get(timeout=4 * TIMEOUT_S)
            if error:
                errors.append(f"rank {rank}:\n{error}")
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("sizes", [(5, 5), (3, 8), (4, 4, 4), (2, 7, 3)], ids=str)
def test_vocab_parallel_matches_full_logits(sizes):
    run_group(list(sizes))


@pytest.mark.parametrize("sizes", [(3, 5)], ids=str)
def test_vocab_parallel_class_weight_grad(sizes):
    run_group(list(sizes), check_class_weight_grad)


@pytest.mark.parametrize("sizes", [(3, 5), (2, 4, 3)], ids=str)
def test_vocab_parallel_zero_weight_sum(sizes):
    run_group(list(sizes), check_zero_weight_sum)


@pytest.mark.parametrize("sizes", [(3, 5)], ids=str)
def test_vocab_parallel_linear_autocast(sizes):
    run_group(list(sizes), check_linear_autocast)


@pytest.mark.parametrize("sizes", [(4, 4), (2, 3, 3)], ids=str)
def test_second_class_split_of_a_group(sizes):
    run_group(list(sizes), check_second_split)


def test_example_runs_under_torchrun():
    torchrun = Path(sys.executable).with_name("torchrun")
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    out = subprocess.run(
        [str(torchrun), "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
         str(ROOT / "examples" / "vocab_parallel.py")],
        capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "matches the full logits" in out.stdout and "matches the full weight" in out.stdout
