"""Issue 20's goals, a markdown table and a plot from a bench_cpu.py CSV.

    python bench/report_cpu.py bench/results/<name>-issue20.csv   # prints goals and table, redraws the PNG
"""
import csv
import pathlib
import sys

from plot import plt, save_figure

# ---- issue 20's goals, read back from the rows ----

GOALS = [  # (section, provider, baseline column, at least, what)
    ("ce", "fused", "speedup_vs_eager", 4.0, "default mode >= 4x eager"),
    ("ce", "fused", "speedup_vs_compile", 3.0, "default mode >= 3x torch.compile"),
    ("ce", "fused_inplace", "speedup_vs_compile", 4.0, "in-place >= 4x torch.compile"),
    ("spatial", "fused", "speedup_vs_eager", 2.0, "spatial >= 2x eager, fwd and fwd+bwd"),
    ("fp16", "fused", "speedup_vs_eager", 2.0, "fp16 >= 2x eager"),
    ("fp64", "fused", "speedup_vs_eager", 1.0, "float64 >= 1x eager"),
    ("linear", "fused", "speedup_vs_eager", 1.0, "linear_cross_entropy >= 1x F.linear_cross_entropy"),
]
TAIL_LIMIT = 1.15


def goals(rows):
    """(met, line) per goal: the worst row of each, and the tail at the largest bf16 cross-entropy shape."""
    out = []
    for section, provider, column, least, what in GOALS:
        mine = [r for r in rows if r["section"] == section and r["provider"] == provider]
        if not mine:
            continue
        worst = min(mine, key=lambda r: float(r[column]))
        out.append((float(worst[column]) >= least, f"{what}: worst {float(worst[column]):.2f}x at "
                    f"{worst['dtype']} {worst['shape']} {worst['mode']}"))
    bf16 = [r for r in rows if r["section"] == "ce" and r["provider"] == "fused" and r["dtype"] == "bf16"]
    if bf16:
        tail = max(bf16, key=lambda r: numel(r["shape"]))
        ratio = float(tail["mean_over_median"])
        out.append((ratio <= TAIL_LIMIT, f"tail: mean/median {ratio:.2f} (<= {TAIL_LIMIT}) at bf16 {tail['shape']}, "
                    f"median {tail['median_ms']} ms, p90 {tail['p90_ms']} ms; {tail['thp']}"))
    return out


def numel(shape):
    n = 1
    for d in shape.split("x"):
        n *= int(d)
    return n


def table(rows):
    """The README's markdown table: one line per measured row and mode, fused providers' speed-ups."""
    lines = [f"{rows[0]['device_name']} ({rows[0]['isa_flags']}; SIMD path {rows[0]['cpu_isa']}), "
             f"{rows[0]['threads']} threads, torch {rows[0]['torch_version']}, {rows[0]['date']}, THP "
             f"{rows[0]['thp']}. Median ms of {rows[0]['reps']} interleaved calls (mean/median of the fused "
             "default mode in brackets); speed-up = PyTorch's median over ours.", "",
             "| section | dtype | shape | mode | eager | compile | fused | in-place | fused vs eager | fused vs compile "
             "| in-place vs compile |", "|" + " --- |" * 11]
    by_key = {}
    for r in rows:
        by_key.setdefault((r["section"], r["dtype"], r["shape"], r["mode"]), {})[r["provider"]] = r
    for (section, dtype, shape, mode), got in by_key.items():
        def ms(p):
            return got[p]["median_ms"] if p in got else "–"
        fused, inplace = got.get("fused", {}), got.get("fused_inplace", {})
        cells = [section, dtype, shape.replace("x", "×"), mode, ms("eager"), ms("compile"),
                 f"{ms('fused')} ({float(fused['mean_over_median']):.2f})" if fused else "–", ms("fused_inplace"),
                 f"{fused['speedup_vs_eager']}×" if fused else "–",
                 f"{fused['speedup_vs_compile']}×" if fused.get("speedup_vs_compile") else "–",
                 f"{inplace['speedup_vs_compile']}×" if inplace.get("speedup_vs_compile") else "–"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(csv_path, rows):
    """Speed-up of each fused provider per row (log scale), a black tick at its goal."""
    least = {(s, p, c): g for s, p, c, g, _ in GOALS}
    bars = []
    for r in rows:
        for column in ("speedup_vs_eager", "speedup_vs_compile"):
            if r["provider"].startswith("fused") and r[column]:
                label = f"{r['section']} {r['dtype']} {r['shape']} {r['mode']}: {r['provider']} vs {column[11:]}"
                bars.append((label, float(r[column]), least.get((r["section"], r["provider"], column))))
    fig, ax = plt.subplots(figsize=(9, 0.22 * len(bars) + 1.5))
    ys = range(len(bars))
    ax.barh(ys, [b[1] for b in bars], color=["C2" if b[2] is None or b[1] >= b[2] else "C3" for b in bars])
    ax.scatter([b[2] for b in bars if b[2]], [y for y, b in zip(ys, bars) if b[2]], marker="|", s=120,
               color="black", label="goal", zorder=3)
    ax.set_yticks(list(ys))
    ax.set_yticklabels([b[0] for b in bars], fontsize=6)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.axvline(1.0, color="grey", linewidth=0.8)
    ax.set_xlabel("speed-up (PyTorch median / ours), higher is better; red: below its goal")
    return save_figure(fig, ax, rows, csv_path)


def report(csv_path):
    """Goals, table and plot of a CSV, as text."""
    rows = list(csv.DictReader(open(csv_path)))
    lines = ["Goals (issue 20):"] + [f"  [{'met' if met else 'NOT MET'}] {line}" for met, line in goals(rows)]
    return "\n".join(lines + ["", table(rows), "", f"CSV: {csv_path}", f"plot: {plot(pathlib.Path(csv_path), rows)}"])


if __name__ == "__main__":
    print(report(sys.argv[1]))
