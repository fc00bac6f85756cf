"""The mutation check of the emulated CUDA tests: injects typical GPU bugs,
one at a time, into a copy of csrc/ (its CUDA kernel files), builds the three emulated
drivers of each copy, runs every case of tests/test_cuda_emulated.py through
them and reports which check caught the bug: the emulation itself, ASan,
UBSan, TSan, a launch error, or the comparison with float64 PyTorch.

    python tools/cuda_emu/mutate.py [NAME ...]   # make mutate; exits 1 if a bug went uncaught

Minutes per bug on 2 cores (three builds, then three runs side by side).
The table goes to stdout and build/mutants/report.csv.
"""
import concurrent.futures
import csv
import pathlib
import shutil
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

import emulated as E  # noqa: E402
import test_cuda_emulated as T  # noqa: E402

OUT = ROOT / "build" / "mutants"

# (name, the bug, the text in csrc/cuda (once), its replacement)
MUTANTS = [
    ("no_syncwarp", "the in-place warp rows' __syncwarp before their writes is missing",
     "      if constexpr (Walker::syncs_warp()) __syncwarp();\n", ""),
    ("no_syncthreads", "the block reduce reads the warps' partials with no __syncthreads after their writes",
     "      if (threadIdx.x % 32 == 0) warp_parts[warp] = p;\n      __syncthreads();\n",
     "      if (threadIdx.x % 32 == 0) warp_parts[warp] = p;\n"),
    ("divergent_syncthreads", "half the block skips the reduce's second __syncthreads",
     "      if (threadIdx.x % 32 == 0) warp_parts[warp] = p;\n      __syncthreads();\n",
     "      if (threadIdx.x % 32 == 0) warp_parts[warp] = p;\n      if (threadIdx.x < G / 2) __syncthreads();\n"),
    ("tail_overrun", "the scalar tail of a row reads one element past its end",
     "    for (int64_t j = body + nvec * kVec + lane; j < end; j += G) f(j, scalar(z[j]));",
     "    for (int64_t j = body + nvec * kVec + lane; j <= end; j += G) f(j, scalar(z[j]));"),
    ("short_row_cache", "the in-place row cache is launched 16 bytes short",
     "    const int smem = cached ? static_cast<int>(row_bytes) : 0;",
     "    const int smem = cached ? static_cast<int>(row_bytes) - 16 : 0;"),
    ("shared_index", "the warps' partials are stored one slot too far",
     "      if (threadIdx.x % 32 == 0) warp_parts[warp] = p;",
     "      if (threadIdx.x % 32 == 0) warp_parts[warp + 1] = p;"),
    ("misaligned_vector", "the vector body starts at 8-byte instead of 16-byte alignment",
     "    const int64_t body = begin + static_cast<int64_t>(((16 - (addr & 15)) & 15) / sizeof(T));",
     "    const int64_t body = begin + static_cast<int64_t>(((16 - (addr & 15)) & 7) / sizeof(T));"),
    ("no_smem_optin", "rows cached past 48 KB are launched without the shared-memory opt-in",
     "    if (cached) allow_row_cache<T, PHASE, TR, STATS>(smem, cache_bytes);\n", ""),
    ("shuffle_exited_lanes", "lanes past a short row's classes exit before the warp's shuffles",
     "  process_row<T, PHASE, TR, STATS>(p, r, r < p.rows, walk);\n}",
     "  if (static_cast<int64_t>(threadIdx.x % G) >= p.classes) return;\n"
     "  process_row<T, PHASE, TR, STATS>(p, r, r < p.rows, walk);\n}"),
    ("wrong_rescale", "the online softmax rescales the running sum by exp(new - old)",
     "    if (cm > p.m) {\n      p.s *= exp_acc(p.m - cm);", "    if (cm > p.m) {\n      p.s *= exp_acc(cm - p.m);"),
    ("argmax_tie", "the merge of two partials keeps the later argmax on a tie",
     "  if (ia < 0 || (ib >= 0 && (beats(vb, va) || (tie && ib < ia)))) return ib;",
     "  if (ia < 0 || (ib >= 0 && (beats(vb, va) || (tie && ib > ia)))) return ib;"),
    ("split_overlap", "split chunks overlap by one column",
     "  const int64_t end = begin + chunk < p.classes ? begin + chunk : p.classes;",
     "  const int64_t end = begin + chunk + 1 < p.classes ? begin + chunk + 1 : p.classes;"),
    ("scale_skip", "scale_grad_ skips every stride-0 grad_output, not only a 1",
     "  if (p.grad_output_stride == 0 && g[0] == acc_t(1)) return;", "  if (p.grad_output_stride == 0) return;"),
]


def mutate(name, old, new):
    """A copy of csrc/ with the bug; returns its directory."""
    root = OUT / name
    shutil.rmtree(root / "csrc", ignore_errors=True)
    shutil.copytree(ROOT / "csrc", root / "csrc")
    hits = [p for p in sorted((root / "csrc" / "cuda").glob("*.cu*")) for _ in range(p.read_text().count(old))]
    if len(hits) != 1:
        raise SystemExit(f"{name}: the text to mutate occurs {len(hits)} times in csrc/cuda")
    hits[0].write_text(hits[0].read_text().replace(old, new))
    return root


def verdict(batch, cases):
    """What caught the bug in one build's run, or '' when nothing did."""
    if batch.returncode != 0:
        log = batch.log
        for marker, what in (("ThreadSanitizer", "TSan"), ("AddressSanitizer", "ASan"), ("runtime error:", "UBSan"),
                             ("fsce-emu error", "emulation")):
            if marker in log:
                line = next(x for x in log.splitlines() if marker in x)
                return f"{what}: {line.strip()[:110]}"
        if "the driver hung" in log:
            return "hang: " + log.strip().splitlines()[-1]
        return f"driver exit {batch.returncode}"
    for spec, got in zip(cases, batch.results):
        if got.error:
            return f"launch error in {spec.name}: {got.error[:80]}"
        try:
            T.check(spec, got)
        except AssertionError as e:
            return f"numbers in {spec.name}: {str(e).splitlines()[0][:80]}"
    return ""


def main(names):
    specs = list(T.SPECS.values())
    cases = [s.case() for s in specs]
    rows = []
    for name, bug, old, new in MUTANTS:
        if names and name not in names:
            continue
        root = mutate(name, old, new)
        E.build(csrc=root / "csrc", out=root / "emu")
        with concurrent.futures.ThreadPoolExecutor(len(E.VARIANTS)) as pool:
            batches = dict(zip(E.VARIANTS, pool.map(lambda v: E.run(cases, v, out=root / "emu", timeout=300),
                                                    E.VARIANTS)))
        row = {"mutant": name, "bug": bug, **{v: verdict(batches[v], specs) for v in E.VARIANTS}}
        row["caught"] = any(row[v] for v in E.VARIANTS)
        rows.append(row)
        print(f"{name}: {'caught' if row['caught'] else 'NOT CAUGHT'}", flush=True)
        for v in E.VARIANTS:
            print(f"    {v}: {row[v] or '-'}", flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    with open(OUT / "report.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["mutant", "bug", *E.VARIANTS, "caught"])
        writer.writeheader()
        writer.writerows(rows)
    return 0 if all(r["caught"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
