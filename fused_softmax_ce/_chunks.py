"""The chunk engine of linear_cross_entropy (single-process and vocab
parallel): each chunk of rows gets its logits from one matmul into a reused
buffer, and `Grads` sums each chunk's share of the input, weight and bias
gradients from its dloss/dlogits."""
import torch

from ._ops import ops

HALF = (torch.float16, torch.bfloat16)


def compute_dtype(dtype, device):
    """The matmuls' dtype: the CPU emulates bf16/fp16 GEMMs (several times slower), so half runs in fp32 there."""
    return torch.float32 if dtype in HALF and device.type == "cpu" else dtype


# A chunk's logits block: from CACHE_BYTES (CPU) up to CHUNK_BYTES, and never
# under MIN_CHUNK_ROWS rows (thinner GEMMs are slow); see default_chunk_size.
CACHE_BYTES = 2 << 20
CHUNK_BYTES = 64 << 20
MIN_CHUNK_ROWS = 64
NARROW_H = 16  # see Grads


def default_chunk_size(n_rows, hidden, n_classes, element_size, device_type="cpu"):
    """Rows per chunk, sized by the bytes of its logits block (rows x V in the
    matmuls' dtype).

    Each chunk streams the whole weight and its gradient (about 4 V H
    elements) besides its logits block (about 5 passes over rows x V), so with
    rows >= 8 H the weight costs under a tenth of the logits' traffic. The
    block is the smallest that gets there, but at least CACHE_BYTES on the
    CPU (about an L2: the passes then hit the cache) and at most CHUNK_BYTES;
    never under MIN_CHUNK_ROWS rows, never over N, and the rows are spread
    evenly over the chunks so the last one is not a sliver. The former rule,
    logits the input's size (N / (V / H) rows), fell to one row per chunk
    where V / H >= N: at H = 4, V = 4096, N = 512, 512 chunks and twice
    PyTorch's time (issue 20).
    """
    row_bytes = max(n_classes * element_size, 1)
    least = CACHE_BYTES if device_type == "cpu" else CHUNK_BYTES
    rows = min(CHUNK_BYTES // row_bytes, max(least // row_bytes, 8 * hidden))
    rows = max(MIN_CHUNK_ROWS, rows)
    if rows >= n_rows:
        return max(n_rows, 1)
    n_chunks = -(-n_rows // rows)
    return -(-n_rows // n_chunks)


def cast(dtype, *tensors):
    """The tensors in dtype; None stays None."""
    return tuple(None if t is None else t.to(dtype) for t in tensors)


def chunks(input, w, b, cdt, chunk_size):
    """(start, stop, input rows in cdt, their logits input @ w.T + b) per
    chunk of rows; the logits live in one buffer reused by every chunk: no
    allocation, and no fresh pages to fault in, per chunk."""
    n = input.shape[0]
    rows = max(1, min(chunk_size, n))
    buf = torch.empty(rows, w.shape[0], dtype=cdt, device=input.device)
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        x = input[start:stop].to(cdt)
        logits = buf[: stop - start]
        if b is None:
            torch.mm(x, w.t(), out=logits)
        else:
            torch.addmm(b, x, w.t(), out=logits)
        yield start, stop, x, logits


class Grads:
    """The gradients of input, linear_weight and linear_bias, summed over
    chunks from each chunk's dloss/dlogits; a fresh empty tensor stands for
    each not asked for (the op's outputs must not alias one another)."""

    def __init__(self, input, linear_weight, linear_bias, cdt, chunk_size, grad_acc_dtype, need_input,
                 need_weight, need_bias):
        n, h = input.shape
        v, device = linear_weight.shape[0], input.device
        self.needs = (need_input, need_weight, need_bias)
        self.dtypes = (input.dtype, linear_weight.dtype, None if linear_bias is None else linear_bias.dtype)
        self.input = (torch.empty_like(input, memory_format=torch.contiguous_format) if need_input
                      else input.new_empty(0))
        self.weight = torch.zeros(v, h, dtype=grad_acc_dtype, device=device) if need_weight else input.new_empty(0)
        self.bias = torch.zeros(v, dtype=grad_acc_dtype, device=device) if need_bias else input.new_empty(0)
        # A grad-input buffer, reused by every chunk, when it needs a cast.
        rows = max(1, min(chunk_size, n))
        self.cast_buf = torch.empty(rows, h, dtype=cdt, device=device) if need_input and cdt != input.dtype else None
        # The CPU's BLAS is up to 15x slower on a product whose output has few
        # columns (N x H or V x H, H = 4: 15 ms against 1 ms at N = 512,
        # V = 4096); with H <= NARROW_H those run transposed, into an H-row temporary.
        self.narrow = device.type == "cpu" and h <= NARROW_H

    def add(self, g, x, w, start, stop):
        """Adds the chunk's share for its dloss/dlogits g, input rows x and weight w (both in g's dtype)."""
        need_input, need_weight, need_bias = self.needs
        if need_input and self.narrow:
            self.input[start:stop] = torch.mm(w.t(), g.t()).t()
        elif need_input:
            if self.cast_buf is None:
                torch.mm(g, w, out=self.input[start:stop])
            else:
                self.input[start:stop] = torch.mm(g, w, out=self.cast_buf[: stop - start])
        if need_weight and self.narrow:
            self.weight += torch.mm(x.t(), g).t()
        elif need_weight:
            if self.weight.dtype == g.dtype:
                self.weight.addmm_(g.t(), x)
            else:
                self.weight += g.t() @ x
        if need_bias:
            self.bias += g.sum(0, dtype=self.bias.dtype)

    def result(self):
        """(input, weight, bias) gradients in their tensors' dtypes."""
        self.cast_buf = None
        return tuple(grad.to(dtype) if needed else grad
                     for grad, dtype, needed in zip((self.input, self.weight, self.bias), self.dtypes, self.needs))


def recomputed_grads(input, linear_weight, linear_bias, target, weight, lse, options, shard, chunk_size,
                     grad_acc_dtype, needs, g, h, grad_entropy=None, entropy=None):
    """The (input, weight, bias) gradients, None where `needs` says so, for
    per-row upstream gradients of the loss (g), the lse (h, or None) and the
    entropy (with the forward's entropy, or None): each chunk's logits are
    recomputed and the backward kernel makes their dloss/dlogits."""
    cdt = compute_dtype(input.dtype, input.device)
    w, b = cast(cdt, linear_weight, linear_bias)  # the kernels read the class weight as it is
    grads = Grads(input, linear_weight, linear_bias, cdt, chunk_size, grad_acc_dtype, *needs)

    def rows_of(t, rows):
        return None if t is None else t[rows]

    with torch.autocast(input.device.type, enabled=False):
        for start, stop, x, logits in chunks(input, w, b, cdt, chunk_size):
            rows = slice(start, stop)
            grad = ops.ce_backward(g[rows], rows_of(h, rows), logits, target[rows], weight, lse[rows],
                                   *options.op_args(), rows_of(grad_entropy, rows), rows_of(entropy, rows), *shard)
            grads.add(grad, x, w, start, stop)
    return tuple(grad if need else None for grad, need in zip(grads.result(), needs))
