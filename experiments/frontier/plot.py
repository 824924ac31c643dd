"""The frontier's pictures (matplotlib, imported when a picture is drawn): test accuracy against depth with the
ceiling, and the per-layer batch-entropy over training as heat maps."""

from __future__ import annotations

import logging

import numpy as np

from .arguments import DEAD_ENTROPY, RUNS

# Same logger name as the job's other log lines (see runs.py).
logger = logging.getLogger("train_vanilla")


def run_title(run: dict) -> str:
    """A picture panel's title: what the run is (kind, β, depth), then its test accuracy and seed."""
    kind = {"baseline": "without LBE (β = 0)", "lbe": f"with LBE (β = {run['lbe_beta']:g})",
            "ceiling": "ceiling: He init, no LBE"}.get(run["run"], run["run"])
    return f"{kind}, depth {run['depth']}\ntest accuracy {100 * run['test_accuracy']:.1f} % (seed {run['seed_index']})"


def _heatmap_panels(fig, axes, records: list[tuple[str, dict]]) -> None:
    """Per-layer batch-entropy (colour, log scale) of every layer (y) over training steps (x), one axis per
    `(title, record)`."""
    from matplotlib.colors import LogNorm
    from matplotlib.ticker import MaxNLocator

    values = np.concatenate([np.asarray(rec["entropies"]).ravel() for _, rec in records])
    positive = values[values > 0]
    vmax = float(positive.max()) if positive.size else 1.0
    # Down to the "dead" threshold: a nearly dead network's few alive layers (1e-1 … 1e-12) still get colours.
    vmin = max(float(positive.min()) if positive.size else DEAD_ENTROPY, DEAD_ENTROPY, vmax * 1e-16)
    image = None
    for ax, (title, rec) in zip(axes, records):
        grid = np.clip(np.asarray(rec["entropies"]).T, vmin, None)  # (layers, logged steps)
        steps = rec["steps"]
        first = steps[0] - (steps[1] - steps[0] if len(steps) > 1 else steps[0])
        image = ax.imshow(grid, aspect="auto", origin="lower", cmap="viridis", norm=LogNorm(vmin=vmin, vmax=vmax),
                          interpolation="nearest", extent=(first, steps[-1], 0.5, grid.shape[0] + 0.5))
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("training step")
        ax.set_ylabel("layer measured by LBE (input → output)")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    fig.colorbar(image, ax=list(axes), label="batch-entropy (nats per unit, log scale)")


def plot_entropy_heatmaps(results: list[dict], records: dict[str, dict], path: str) -> bool:
    """One panel per run of the first seed: batch-entropy (log colour) of every layer over training steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [r for r in results if records[r["name"]]["entropies"] and r["seed_index"] == 0]
    if not panels:
        logger.warning("No per-layer entropies were logged (lbe_log_per_layer off, or fewer steps than logging_steps): no picture.")
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 5.0), squeeze=False, constrained_layout=True)
    _heatmap_panels(fig, axes[0], [(run_title(r), records[r["name"]]) for r in panels])
    fig.suptitle(f"{panels[0]['model']}\nper-layer batch-entropy over training", fontsize=11)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_frontier(summary: list[dict], results: list[dict], records: dict[str, dict], path: str) -> None:
    """Left: test accuracy against depth (log x), baseline and LBE, mean ± std over seeds, the ceiling as a band.
    Right: per-layer batch-entropy over training of the deepest baseline/LBE pair of the first seed (log colours)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    deepest = max(s["depth"] for s in summary if s["run"] != "ceiling")
    pair = [r for r in results if r["depth"] == deepest and r["seed_index"] == 0 and r["run"] in RUNS
            and records[r["name"]]["entropies"]]
    fig = plt.figure(figsize=(6 + 5 * len(pair), 5.6), constrained_layout=True)
    grid = fig.add_gridspec(1, 1 + len(pair), width_ratios=[1.2] + [1] * len(pair))
    ax = fig.add_subplot(grid[0, 0])
    styles = {"baseline": dict(color="tab:gray", marker="o", label="without LBE (β = 0)"),
              "lbe": dict(color="tab:blue", marker="s", label="with LBE")}
    for kind, style in styles.items():
        rows = sorted((s for s in summary if s["run"] == kind), key=lambda s: s["depth"])
        if rows:
            ax.errorbar([s["depth"] for s in rows], [100 * s["test_accuracy_mean"] for s in rows],
                        yerr=[100 * s["test_accuracy_std"] for s in rows], capsize=4, **style)
    ceiling = next((s for s in summary if s["run"] == "ceiling"), None)
    if ceiling is not None:
        mean, std = 100 * ceiling["test_accuracy_mean"], 100 * ceiling["test_accuracy_std"]
        ax.axhline(mean, color="tab:green", ls="--", label=f"ceiling: {ceiling['depth']} layers, He init ({mean:.1f}%)")
        ax.axhspan(mean - std, mean + std, color="tab:green", alpha=0.15)
    ax.axhline(10, color="k", ls=":", lw=1, label="chance (10%)")
    ax.set_xscale("log")
    depths = sorted({s["depth"] for s in summary if s["run"] != "ceiling"})
    from matplotlib.ticker import NullFormatter

    ax.set_xticks(depths)
    ax.set_xticklabels([str(d) for d in depths])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_ylim(0, 100)
    ax.set_xlabel("depth (hidden layers, log scale)")
    ax.set_ylabel("test accuracy (%)")
    seeds = max(s["seeds"] for s in summary)
    ax.set_title(f"trainability frontier ({seeds} seed{'s' if seeds > 1 else ''}"
                 f"{', mean ± std' if seeds > 1 else ''})", fontsize=10)
    # Below the axes, off the curves (inside, any corner covers a curve or the ceiling band for some ladder).
    handles, labels = ax.get_legend_handles_labels()
    order = sorted(range(len(labels)), key=lambda i: ("LBE" not in labels[i], i))  # the two curves first
    ax.legend([handles[i] for i in order], [labels[i] for i in order], fontsize=8, loc="upper center",
              bbox_to_anchor=(0.5, -0.13), ncol=2, frameon=False)
    if pair:
        axes = [fig.add_subplot(grid[0, 1 + i]) for i in range(len(pair))]
        _heatmap_panels(fig, axes, [(run_title(r), records[r["name"]]) for r in pair])
    first = results[0]
    model = first["model"].replace(f"depth {first['depth']} ", "")
    fig.suptitle(f"{model}: {first['steps']} steps, lr {first['learning_rate']:g} {first['lr_scheduler_type']}",
                 fontsize=11)
    fig.savefig(path, dpi=110)
    plt.close(fig)
