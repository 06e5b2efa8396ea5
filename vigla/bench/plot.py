"""The resolution figure: throughput, peak memory and GMACs against image size, one line per model."""
from __future__ import annotations

from pathlib import Path

# (title, row path) per panel, three to a row; log axes on both sides. A panel is drawn when some
# row has its measurement (e.g. the train panels only with --train).
_PANELS = [("inference img/s", ("infer", "img_per_s")),
           ("inference peak MiB", ("infer", "peak_mib")),
           ("GMACs / image", ("gmacs",)),
           ("train img/s", ("train", "img_per_s")),
           ("train peak MiB", ("train", "peak_mib"))]


def _value(row: dict, path: tuple[str, ...]):
    value = row
    for key in path:
        value = value.get(key) if isinstance(value, dict) else None
    return value


def _failed_sizes(rows: list[dict], path: tuple[str, ...]) -> list[int]:
    return [r["img_size"] for r in rows
            if len(path) > 1 and isinstance(r.get(path[0]), dict) and r[path[0]].get("status") != "ok"]


def _draw_panel(ax, rows: list[dict], models: list[str], sizes: list[int], title: str,
                key: tuple[str, ...]) -> None:
    from matplotlib.ticker import NullLocator

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
    ax.set_xlim(min(sizes) / 1.3, max(sizes) * 1.3)  # also centres a single size
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel("image size (px)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)


def plot_results(result: dict, path: Path) -> None:
    """Write the figure for ``result`` (the bench JSON) to ``path`` (PNG). Failed points (OOM,
    error) are left out and named in the legend."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    panels = [p for p in _PANELS if any(r.get(p[1][0]) is not None for r in rows)] or _PANELS[2:3]
    ncols = min(3, len(panels))
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(max(5 * ncols, 8), 4.2 * nrows), squeeze=False)
    models = list(dict.fromkeys(r["model"] for r in rows))
    sizes = sorted({r["img_size"] for r in rows})
    for i, ax in enumerate(axes.flat):
        if i < len(panels):
            _draw_panel(ax, rows, models, sizes, *panels[i])
        else:
            ax.axis("off")
    s = result["settings"]
    env = result["environment"]
    title = (f"FLOPs only (counted by shape) | {result['timestamp']}" if s.get("flops_only") else
             f"{env['device']} | amp {s['amp']} | compile {s['compile']} | "
             f"channels_last {s['channels_last']} | {result['timestamp']}")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
