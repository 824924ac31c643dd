"""Collect the evaluation curves of several `scripts/train_vanilla.py` output folders into one JSON (each run with the
`meta` of the job that wrote it: command, commit, versions, machine) and draw them: test accuracy and alive layers
against training steps and against the run's CPU seconds.

    python experiments/frontier/collect_curves.py --out experiments/frontier/results/vanilla_depth500_screens.json \
        --png experiments/frontier/results/vanilla_depth500_screens.png --title "depth 500, width 64, one seed" runs/scr/*/

Not part of the package or the tests.
"""

from __future__ import annotations

import argparse
import json
import os


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", help="output folders holding a results.json")
    parser.add_argument("--out", required=True)
    parser.add_argument("--png", default=None)
    parser.add_argument("--title", default="")
    parser.add_argument("--note", default="", help="stored in the JSON (e.g. the measurement condition)")
    args = parser.parse_args()
    entries = []
    for folder in args.folders:
        path = os.path.join(folder, "results.json")
        if not os.path.isfile(path):
            continue
        with open(path) as f:
            report = json.load(f)
        for run in report["runs"]:
            entries.append({
                "label": os.path.basename(os.path.normpath(folder)) + ("" if len(report["runs"]) == 1 else f"/{run['name']}"),
                "meta": report["meta"],
                "run": {k: v for k, v in run.items() if k != "entropies_end"},
            })
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"note": args.note, "screens": entries}, f, indent=1)
    print(f"wrote {args.out}: {len(entries)} runs")
    if args.png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 3, figsize=(17, 4.8), constrained_layout=True)
        for entry in entries:
            curve = entry["run"]["eval_curve"]
            steps = [0] + [e["step"] for e in curve]
            acc = [10.0] + [100 * e["accuracy"] for e in curve]
            line, = axes[0].plot(steps, acc, marker=".", label=entry["label"])
            if all("cpu_s" in e for e in curve):
                axes[1].plot([0] + [e["cpu_s"] for e in curve], acc, marker=".", color=line.get_color())
            if all("alive_layers" in e for e in curve):
                axes[2].plot([e["step"] for e in curve], [e["alive_layers"] for e in curve], marker=".",
                             color=line.get_color())
        axes[0].set_xlabel("training step")
        axes[1].set_xlabel("CPU seconds of the run (one thread)")
        for ax in axes[:2]:
            ax.set_ylabel("test accuracy (%)")
            ax.axhline(10, color="k", ls=":", lw=1)
            ax.set_ylim(0, 100 if max(100 * e["run"]["test_accuracy"] for e in entries) > 60 else 60)
        axes[2].set_xlabel("training step")
        axes[2].set_ylabel("alive layers (batch-entropy > 1e-13, 360-512 test examples)")
        axes[0].legend(fontsize=7)
        fig.suptitle(args.title, fontsize=11)
        fig.savefig(args.png, dpi=100)
        print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
