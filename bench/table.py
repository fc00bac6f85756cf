"""Prints a benchmark CSV as the README's markdown table (median ms; speed-up of `fused` over torch eager)."""
import csv
import sys


def table(csv_path):
    rows = list(csv.DictReader(open(csv_path)))
    ms = {(r["dtype"], r["n_rows"], r["n_classes"], r["provider"], r["mode"]): float(r["median_ms"]) for r in rows}
    providers = sorted({r["provider"] for r in rows}, key=lambda p: (not p.startswith("fused"), p))
    shapes = sorted({(r["dtype"], r["n_rows"], r["n_classes"]) for r in rows}, key=lambda s: (s[0], int(s[2])))
    lines = [f"Device: {rows[0]['device_name']}, torch {rows[0]['torch_version']}, {rows[0]['date']}. "
             "Median ms, forward / backward / forward+backward.", ""]
    lines.append("| dtype | N×C | " + " | ".join(providers) + " | fwd+bwd speed-up of fused over torch |")
    lines.append("|" + " --- |" * (len(providers) + 3))
    for dtype, n, c in shapes:
        cells = []
        for p in providers:
            cells.append(" / ".join(f"{ms[(dtype, n, c, p, m)]:.1f}" if (dtype, n, c, p, m) in ms else "–"
                                    for m in ("fwd", "bwd", "fwd+bwd")))
        fused, torch_ = ms.get((dtype, n, c, "fused", "fwd+bwd")), ms.get((dtype, n, c, "torch", "fwd+bwd"))
        speedup = f"{torch_ / fused:.1f}×" if fused and torch_ else "–"
        lines.append(f"| {dtype} | {n}×{c} | " + " | ".join(cells) + f" | {speedup} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(sys.argv[1]))
