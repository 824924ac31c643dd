"""Test accuracy against training steps for runs of several frontier results.json files, one curve per (file, run
kind) at one depth: the mean over the seeds, with a band of ± one sample standard deviation when there are several.
The pictures of docs/paper.md.

    python -m experiments.frontier.plot_curves --depth 500 --out docs/paper_cnn500.png \
        "default init=experiments/frontier/results/paper_cnn500.json" "delta-orthogonal, tanh=experiments/frontier/results/paper_cnn500_delta.json"

Each argument is `LABEL=PATH`; the legend reads "LABEL, without LBE" / "LABEL, with LBE" (and "ceiling"). `--alive` adds
a panel of the alive layers at each evaluation.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

KIND_NAMES = {"baseline": "without LBE", "lbe": "with LBE", "ceiling": "shallow ceiling"}


def curves(path: str, depth: int, metric: str = "accuracy") -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, int]]:
    """Per run kind at `depth`: steps, mean and std over the seeds of an evaluation's `metric` (the test accuracy in
    %, or the number of alive layers), number of seeds (the steps every seed evaluated)."""
    scale = 100 if metric == "accuracy" else 1
    with open(path) as f:
        runs = json.load(f)["runs"]
    out = {}
    for kind in ("ceiling", "baseline", "lbe"):
        chosen = [r for r in runs if r["run"] == kind and (r["depth"] == depth or kind == "ceiling")]
        if not chosen:
            continue
        by_step = [{e["step"]: scale * e[metric] for e in r["eval_curve"] if metric in e} for r in chosen]
        steps = sorted(set.intersection(*(set(c) for c in by_step)))
        acc = np.array([[c[s] for s in steps] for c in by_step])
        std = acc.std(0, ddof=1) if len(chosen) > 1 else np.zeros(len(steps))
        out[kind] = (np.array(steps), acc.mean(0), std, len(chosen))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", help="LABEL=PATH of a frontier results.json")
    parser.add_argument("--depth", type=int, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--title", default=None)
    parser.add_argument("--alive", action="store_true",
                        help="a second panel: the alive layers (batch-entropy above the dead threshold on the test "
                             "images) at each evaluation")
    args = parser.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = ["accuracy", "alive_layers"] if args.alive else ["accuracy"]
    fig, axes = plt.subplots(1, len(metrics), figsize=(7 * len(metrics), 4.2), squeeze=False)
    styles = {"baseline": "--", "lbe": "-", "ceiling": ":"}
    for metric, panel in zip(metrics, axes[0]):
        for i, item in enumerate(args.files):
            label, path = item.split("=", 1)
            color = f"C{i}"
            for kind, (steps, mean, std, n) in curves(path, args.depth, metric).items():
                if not len(steps):
                    continue
                name = f"{label}, {KIND_NAMES[kind]} ({n} seed{'s' if n > 1 else ''})"
                panel.plot(steps, mean, styles[kind], color=color, label=name, marker="o", markersize=3)
                if n > 1:
                    panel.fill_between(steps, mean - std, mean + std, color=color, alpha=0.15)
        panel.set_xlabel("training step")
        panel.grid(alpha=0.3)
    ax = axes[0][0]
    if args.alive:
        axes[0][1].set_ylabel("alive layers (test images)")
        axes[0][1].set_title("alive layers (mean ± std over seeds)")
    ax.axhline(10, color="grey", lw=0.8)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(args.title or f"depth {args.depth}: test accuracy (mean ± std over seeds)")
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    plt.close(fig)
    print(args.out)


if __name__ == "__main__":
    main()
