"""Draws a PNG from a benchmark CSV: forward+backward time per provider, per shape and dtype."""
import csv
import pathlib
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot(csv_path, mode="fwd+bwd"):
    csv_path = pathlib.Path(csv_path)
    rows = [r for r in csv.DictReader(open(csv_path)) if r["mode"] == mode]
    groups = sorted({(r["dtype"], int(r["n_rows"]), int(r["n_classes"])) for r in rows})
    providers = sorted({r["provider"] for r in rows})
    ms = {(r["dtype"], int(r["n_rows"]), int(r["n_classes"]), r["provider"]): float(r["median_ms"]) for r in rows}
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(groups)), 4.5))
    width = 0.8 / max(len(providers), 1)
    for i, provider in enumerate(providers):
        xs = [g + i * width for g in range(len(groups))]
        ax.bar(xs, [ms.get(key + (provider,), 0.0) for key in groups], width, label=provider)
    ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))])
    ax.set_xticklabels([f"{d}\n{n}x{c}" for d, n, c in groups])
    ax.set_ylabel(f"{mode} median time (ms), lower is better")
    return save_figure(fig, ax, rows, csv_path)


def save_figure(fig, ax, rows, csv_path):
    """Titles the plot with the CSV's device, torch version and date, and
    saves it beside the CSV as a PNG; returns the PNG's path."""
    first = rows[0] if rows else {"device_name": "?", "torch_version": "?", "date": "?"}
    ax.set_title(f"{first['device_name']}\ntorch {first['torch_version']}, {first['date']}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    png = pathlib.Path(csv_path).with_suffix(".png")
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


if __name__ == "__main__":
    print(plot(sys.argv[1]))
