"""Top-1 vs MAdds: the paper's points (hollow) and ours (filled), one colour per operator."""

from __future__ import annotations

from pathlib import Path


def plot_top1_vs_madds(doc: dict, results: list[dict], path: str | Path) -> Path:
    """Write a PNG; rows without MAdds or top-1 are left out. Returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ops = list(dict.fromkeys(r["op"] for r in results))
    colors = {op: plt.get_cmap("tab10")(i % 10) for i, op in enumerate(ops)}
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for op in ops:
        mine = [r for r in results if r["op"] == op]
        paper = [(r["paper_madds_m"], r["paper_top1"]) for r in mine
                 if r.get("paper_madds_m") is not None and r.get("paper_top1") is not None]
        ours = [(r["ours_madds_m"], r["ours_top1_mean"], r.get("ours_top1_std") or 0.0) for r in mine
                if r.get("ours_madds_m") is not None and r.get("ours_top1_mean") is not None]
        if paper:
            x, y = zip(*paper)
            ax.scatter(x, y, facecolors="none", edgecolors=[colors[op]], s=45, label=f"{op} (paper)")
        if ours:
            x, y, e = zip(*ours)
            ax.errorbar(x, y, yerr=e, fmt="o", color=colors[op], ms=5, label=f"{op} (ours)")
    ax.set_xlabel("MAdds (M, batch 1, incl. routing and kernel aggregation)")
    ax.set_ylabel("top-1 (%)")
    ax.set_title(f"{doc.get('paper')}: top-1 vs MAdds")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="best")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
