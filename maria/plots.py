"""The one plotting helper: every PNG the project writes (loss curves, benchmark curves) is a
line plot of named series, written beside its JSON."""

from __future__ import annotations

from pathlib import Path


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt, *plt.subplots(figsize=(6, 4))


def _save(plt, fig, ax, png) -> Path:
    ax.grid(alpha=0.3, which="both")
    return _write(plt, fig, png)


def _write(plt, fig, png) -> Path:
    fig.tight_layout()
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return png


def bar_plot(png: str | Path, values: dict[str, float], ylabel: str, title: str) -> Path:
    """One bar per named measurement (e.g. a pipeline against its bounds)."""
    plt, fig, ax = _figure()
    bars = ax.bar(list(values), list(values.values()), color="tab:blue")
    ax.bar_label(bars, fmt="%.0f", fontsize=8)
    ax.set(ylabel=ylabel, title=title)
    ax.tick_params(axis="x", labelsize=8)
    return _save(plt, fig, ax, png)


def line_plot(
    png: str | Path,
    series: dict[str, tuple[list, list]],
    xlabel: str,
    ylabel: str,
    title: str,
    logx: bool = False,
    logy: bool = False,
    hlines: dict[str, float] | None = None,
    annotate: dict[str, list[str]] | None = None,
    styles: dict[str, dict] | None = None,
) -> Path:
    """series: label -> (xs, ys); hlines: label -> y; annotate: label -> one text per point;
    styles: label -> matplotlib line keywords (e.g. one colour per method, one dash per batch size)."""
    plt, fig, ax = _figure()
    for label, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o", ms=3, label=label, **(styles or {}).get(label, {}))
        for x, y, text in zip(xs, ys, (annotate or {}).get(label, [])):
            ax.annotate(text, (x, y), fontsize=7)
    for label, y in (hlines or {}).items():
        ax.axhline(y, color="gray", ls=":", lw=1, label=label)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    ax.legend(fontsize=7 if len(series) > 6 else 8, ncol=2 if len(series) > 6 else 1)
    return _save(plt, fig, ax, png)


def bar_panels(png: str | Path, panels: dict[str, dict[str, float]], title: str, fmt: str = "%.3g") -> Path:
    """Several small bar charts side by side, one per measured quantity (title -> {bar label: value}):
    a comparison whose quantities have different units (bytes, rates, losses) in one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.6), squeeze=False)
    for ax, (name, values) in zip(axes[0], panels.items()):
        bars = ax.bar(list(values), [v if v is not None else 0.0 for v in values.values()], color=[f"C{i}" for i in range(len(values))])
        ax.bar_label(bars, labels=["-" if v is None else fmt % v for v in values.values()], fontsize=7)
        ax.set_title(name, fontsize=8)
        ax.tick_params(axis="x", labelsize=7, rotation=20)
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(title, fontsize=9)
    return _write(plt, fig, png)
