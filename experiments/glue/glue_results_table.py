#!/usr/bin/env python
"""Turn the runs of experiments/glue/glue_experiments.py into markdown tables: dev scores, mean ± std over seeds.

    python experiments/glue/glue_results_table.py runs/glue [--output table.md]

Reads every `run_config.json` + `all_results.json` under the folder. Prints

1. one table per task: a row per method and learning rate, the task's GLUE metrics (×100) as mean ± sample standard
   deviation (n − 1) over seeds, and the number of seeds;
2. a summary: per task and method, the learning rate with the best mean (as GLUE papers report a per-task best
   learning rate) — with the caveat that picking it on the dev set flatters every method alike.

Runs without results (unfinished, failed) are listed at the end, not silently dropped.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a file: the repository root, for `experiments`

#: Task -> (metric key, column title) in the order GLUE reports them.
TASK_METRICS = {
    "rte": [("eval_accuracy", "accuracy")],
    "mrpc": [("eval_accuracy", "accuracy"), ("eval_f1", "F1")],
    "cola": [("eval_matthews_correlation", "Matthews corr.")],
    "sst2": [("eval_accuracy", "accuracy")],
    "wnli": [("eval_accuracy", "accuracy")],
}
TASK_TITLES = {"rte": "RTE", "mrpc": "MRPC", "cola": "CoLA", "sst2": "SST-2", "wnli": "WNLI"}


def load_runs(root: Path) -> tuple[list[dict], list[Path]]:
    """(finished runs: their config with `results` added, folders of runs without results)."""
    runs, missing = [], []
    for config_path in sorted(root.rglob("run_config.json")):
        config = json.loads(config_path.read_text())
        results_path = config_path.parent / "all_results.json"
        if results_path.is_file():
            config["results"] = json.loads(results_path.read_text())
            runs.append(config)
        else:
            missing.append(config_path.parent)
    return runs, missing


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else 0.0)


def fmt(values: list[float]) -> str:
    mean, std = mean_std([100 * v for v in values])
    return f"{mean:.1f} ± {std:.1f}"


def _method_order(method: str) -> tuple[int, str]:
    return (0 if method == "baseline" else 1, method)


def method_label(run: dict) -> str:
    if run["method"] == "baseline":
        return "baseline (β = 0)"
    label = f"LBE (α₀ = {run['lbe_alpha']:g}, α_min = {run['lbe_alpha_min']:g}, β = {run['lbe_beta']:g}"
    args = run.get("args", [])
    if "--lbe_ignore_padding" in args:  # `glue_experiments.py --padding` compares the two
        ignore = args[args.index("--lbe_ignore_padding") + 1].lower() == "true"
        label += ", real tokens only" if ignore else ", every position"
    return label + ")"


def tables(runs: list[dict]) -> str:
    groups: dict[tuple[str, str, float], list[dict]] = defaultdict(list)
    for run in runs:
        groups[(run["task"], run["method"], run["learning_rate"])].append(run)
    lines: list[str] = []
    best: dict[str, list[str]] = defaultdict(list)
    for task in [t for t in TASK_METRICS if any(key[0] == t for key in groups)]:
        metrics = TASK_METRICS[task]
        lines += [f"### {TASK_TITLES[task]} (dev)", ""]
        lines.append("| method | learning rate | " + " | ".join(title for _, title in metrics) + " | seeds |")
        lines.append("| --- | --- | " + " | ".join("---" for _ in metrics) + " | --- |")
        keys = sorted((k for k in groups if k[0] == task), key=lambda k: (_method_order(k[1]), k[2]))
        per_method: dict[str, list[tuple[float, float, str, int]]] = defaultdict(list)
        for key in keys:
            group = groups[key]
            columns = []
            for metric, _ in metrics:
                values = [run["results"][metric] for run in group if metric in run["results"]]
                columns.append(fmt(values) if values else "–")
            seeds = sorted(run["seed"] for run in group)
            lines.append(
                f"| {method_label(group[0])} | {key[2]:g} | " + " | ".join(columns) + f" | {len(seeds)} ({', '.join(map(str, seeds))}) |"
            )
            first = [run["results"][metrics[0][0]] for run in group if metrics[0][0] in run["results"]]
            if first:
                mean, std = mean_std(first)
                per_method[method_label(group[0])].append((mean, std, f"{key[2]:g}", len(first)))
        lines.append("")
        for label, options in per_method.items():
            mean, std, lr, n = max(options)
            best[task].append(f"| {TASK_TITLES[task]} | {label} | {lr} | {100 * mean:.1f} ± {100 * std:.1f} | {n} |")
    lines += [
        "### Best learning rate per method (first metric of each task)",
        "",
        "| task | method | learning rate | score | seeds |",
        "| --- | --- | --- | --- | --- |",
    ]
    for task_lines in best.values():
        lines += task_lines
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs_dir", help="The --output_dir of experiments/glue/glue_experiments.py.")
    parser.add_argument("--output", help="Also write the markdown here.")
    parser.add_argument(
        "--json", help="Also write every run (settings, results, logged LBE metrics) and where they ran as JSON here."
    )
    args = parser.parse_args(argv)
    runs, missing = load_runs(Path(args.runs_dir))
    if not runs:
        print(f"No finished runs (run_config.json + all_results.json) under {args.runs_dir}.", file=sys.stderr)
        return 1
    text = tables(runs)
    if missing:
        text += "\nRuns without results (unfinished or failed): " + ", ".join(str(p) for p in missing) + "\n"
    nan = [r for r in runs if any(isinstance(v, float) and math.isnan(v) for v in r["results"].values())]
    if nan:
        text += f"\n{len(nan)} run(s) reported NaN metrics.\n"
    print(text, end="")
    if args.output:
        Path(args.output).write_text(text, encoding="utf-8")
    if args.json:
        Path(args.json).write_text(json.dumps(_record(runs, args.runs_dir), indent=1), encoding="utf-8")
    return 0


def _record(runs: list[dict], runs_dir: str) -> dict:
    """The runs with the LBE metrics each logged (from its trainer_state.json), and the machine and code they ran on
    (read at table time: run the table on the machine and commit that ran the sweep)."""
    from experiments.provenance import portable_path, provenance

    for run in runs:
        # the data files as a reader elsewhere can use them (relative to the repository or `path/to/<name>`)
        run["args"] = [portable_path(os.path.abspath(w)) if os.sep in w and os.path.exists(w) else w
                       for w in run.get("args", [])]
        state = Path(run["output_dir"]) / "trainer_state.json"
        if state.is_file():
            history = json.loads(state.read_text())["log_history"]
            run["lbe_logs"] = [
                {k: v for k, v in entry.items() if k in ("step", "task_loss", "lbe_loss", "batch_entropy_mean", "batch_entropy_min")}
                for entry in history if "lbe_loss" in entry
            ]
    return {"runs_dir": runs_dir, **provenance(sys.argv), "runs": runs}


if __name__ == "__main__":
    sys.exit(main())
