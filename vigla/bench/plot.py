"""The resolution figure: throughput, peak memory and GMACs against image size, one line per model."""
from __future__ import annotations

from pathlib import Path

# (title, row path) per panel; log axes on both sides
_INFER_PANELS = [("inference img/s", ("infer", "img_per_s")),
                 ("inference peak MiB", ("infer", "peak_mib")),
                 ("GMACs / image", ("gmacs",))]
_TRAIN_PANELS = [("train img/s", ("train", "img_per_s")),
                 ("train peak MiB", ("train", "peak_mib"))]


def _value(row: dict, path: tuple[str, ...]):
    value = row
    for key in path:
        value = value.get(key) if isinstance(value, dict) else None
    return value


def _failed_sizes(rows: list[dict], path: tuple[str, ...]) -> list[int]:
    return [r["img_size"] for r in rows
            if len(path) > 1 and isinstance(r.get(path[0]), dict) and r[path[0]].get("status") != "ok"]


def plot_results(result: dict, path: Path) -> None:
    """Write the figure for ``result`` (the bench JSON) to ``path`` (PNG). Failed points (OOM,
    error) are left out and named in the legend."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullLocator

    rows = result["rows"]
    has_train = any(r.get("train") for r in rows)
    panels = [_INFER_PANELS] + ([_TRAIN_PANELS] if has_train else [])
    fig, axes = plt.subplots(len(panels), 3, figsize=(15, 4.2 * len(panels)), squeeze=False)
    models = list(dict.fromkeys(r["model"] for r in rows))
    sizes = sorted({r["img_size"] for r in rows})
    for i, panel_row in enumerate(panels):
        for j in range(3):
            ax = axes[i][j]
            if j >= len(panel_row):
                ax.axis("off")
                continue
            title, key = panel_row[j]
            plotted = False
            for model in models:
                mrows = sorted((r for r in rows if r["model"] == model), key=lambda r: r["img_size"])
                # log axes: a zero (e.g. no measurable CPU RSS growth) cannot be drawn
                pts = [(r["img_size"], _value(r, key)) for r in mrows if (_value(r, key) or 0) > 0]
                failed = _failed_sizes(mrows, key)
                label = model + (f" (failed at {', '.join(map(str, failed))})" if failed else "")
                ax.plot(*(zip(*pts) if pts else ([], [])), marker="o", label=label)
                plotted |= bool(pts)
            ax.set_xscale("log", base=2)
            if plotted:
                ax.set_yscale("log")
            else:
                ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center")
            ax.set_xticks(sizes, [str(s) for s in sizes])
            ax.xaxis.set_minor_locator(NullLocator())
            ax.set_xlabel("image size (px)")
            ax.set_title(title)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
    s = result["settings"]
    env = result["environment"]
    fig.suptitle(f"{env['device']} | amp {s['amp']} | compile {s['compile']} | "
                 f"channels_last {s['channels_last']} | {result['timestamp']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
