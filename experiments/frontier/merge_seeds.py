"""Merge frontier results.json files that ran the same recipe with different seeds (one job per seed, e.g. on two
cores, or a seed added later) into one results.json: every run, the summary over the seeds (mean and sample std per
run kind and depth, `report.summarize`), and for each seed whether the runs without and with LBE started from the same
weights (`init_checksum`).

    python -m experiments.frontier.merge_seeds --out experiments/frontier/results/paper_cnn500_official.json \
        experiments/frontier/results/paper_cnn500_official_screen.json \
        experiments/frontier/results/paper_cnn500_official_lbe_seed1.json ...

Each run keeps the `meta` of the job that wrote it (command, commit, versions, machine) as `source_meta`, and the file
it came from as `source`; the merged file's own `meta` records this command. It stops with a one-line error when the
files differ in anything but the seeds (learning rate, β, steps, ...), or hold the same run twice. Not part of the
package or the tests.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from experiments.provenance import provenance

from .report import summarize

#: The settings every merged run of one kind and depth must share: the recipe, not the seed.
RECIPE_KEYS = (
    "arch", "depth", "width", "activation", "dataset", "init", "init_gain", "init_bias_std", "lbe_beta", "lbe_alpha",
    "lbe_alpha_min", "lbe_alpha_learning_rate", "lbe_layers", "learning_rate", "lr_scheduler_type", "batch_size",
    "steps",
)


def merge(paths: list[str]) -> tuple[list[dict], list[dict]]:
    """The runs of `paths` (seed_index renumbered 0, 1, ... in the order of the training seed, per run kind and
    depth) and, per seed, the pair check. Raises ValueError naming the file and setting that differ."""
    runs: list[dict] = []
    for path in paths:
        with open(path) as f:
            report = json.load(f)
        for run in report["runs"]:
            runs.append({**run, "source": path, "source_meta": report["meta"]})
    reference: dict[str, dict] = {}
    seen: set[tuple[str, int, int]] = set()
    for run in runs:
        key = (run["run"], run["depth"], run["seed"])
        if key in seen:
            raise ValueError(f"{run['source']}: run {run['run']} at depth {run['depth']} with seed {run['seed']} is "
                             "already in an earlier file; pass each seed once")
        seen.add(key)
        # A setting absent from a record (written before the script had it) is not compared.
        recipe = {k: run[k] for k in RECIPE_KEYS if k in run}
        first = reference.setdefault(run["run"], {**recipe, "source": run["source"]})
        differing = [k for k in recipe if k in first and first[k] != recipe[k]
                     and not (run["run"] != "lbe" and k.startswith("lbe_"))]
        if differing:
            k = differing[0]
            raise ValueError(f"{run['source']}: {k} = {recipe[k]!r}, but {first['source']} has {first[k]!r}; merge "
                             "only runs of one recipe that differ in the seed")
    for kind_depth in {(r["run"], r["depth"]) for r in runs}:
        group = sorted((r for r in runs if (r["run"], r["depth"]) == kind_depth), key=lambda r: r["seed"])
        for index, run in enumerate(group):
            run["seed_index"] = index
    pairs = []
    for seed in sorted({r["seed"] for r in runs}):
        checksums = {r["run"]: r.get("init_checksum") for r in runs if r["seed"] == seed and r["run"] != "ceiling"}
        if len(checksums) > 1:
            values = set(checksums.values())
            same = None if None in values else len(values) == 1
            pairs.append({"seed": seed, "init_checksums": checksums, "same_initial_weights": same})
    return sorted(runs, key=lambda r: (r["depth"], r["run"], r["seed_index"])), pairs


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", help="frontier results.json files of one recipe, different seeds")
    parser.add_argument("--out", required=True, help="the merged results.json to write")
    args = parser.parse_args(argv)
    try:
        runs, pairs = merge(args.files)
    except (OSError, ValueError, KeyError) as error:
        sys.stderr.write(f"merge_seeds: error: {error}\n")
        raise SystemExit(2) from None
    argv = sys.argv[1:] if argv is None else argv
    report = {
        "meta": provenance(["-m", "experiments.frontier.merge_seeds", *argv]),
        "sources": args.files,
        "summary": summarize(runs),
        "pairs": pairs,
        "runs": runs,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    for s in report["summary"]:
        print(f"{s['run']:>8} depth {s['depth']}: {100 * s['test_accuracy_mean']:.1f} ± {100 * s['test_accuracy_std']:.1f}% "
              f"over {s['seeds']} seed(s) {[round(100 * a, 1) for a in s['test_accuracy_per_seed']]}")
    for p in pairs:
        print(f"seed {p['seed']}: same initial weights: {p['same_initial_weights']}")
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
