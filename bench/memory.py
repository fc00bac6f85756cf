"""Peak memory of a block of code, on CUDA and on the CPU.

CUDA: the caching allocator's peak over the block. CPU: there is no
allocator counter, and the process's RSS high-water mark misses reused pages,
so a dispatch mode counts the storage of every tensor an op returns from its
creation until it is freed: the peak of live tensor bytes created in the
block (temporaries an op frees before returning are not seen).
"""
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class _LiveTensorBytes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.live, self.now, self.peak = {}, 0, 0

    def _free(self, key):
        self.now -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self.live:
                    self.live[key] = storage.nbytes()
                    self.now += storage.nbytes()
                    self.peak = max(self.peak, self.now)
                    weakref.finalize(storage, self._free, key)
        return out


class PeakMemory:
    """`with PeakMemory(device) as mem: ...`, then `mem.mb` (MiB over the start)."""

    def __init__(self, device):
        self.device = device

    def __enter__(self):
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self._mode = _LiveTensorBytes().__enter__()
        return self

    def __exit__(self, *exc):
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.mb = (torch.cuda.max_memory_allocated() - self.base) / 2**20
        else:
            self._mode.__exit__(*exc)
            self.mb = self._mode.peak / 2**20
