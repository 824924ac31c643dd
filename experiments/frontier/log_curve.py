"""The curve of a `scripts/train_vanilla.py` run read back from its `trainer_log.jsonl`, for a run stopped before it
wrote `results.json` (which the job writes only at its end): every evaluation (test accuracy and loss) and every
training log window (alive layers on the training batch, mean and minimum batch-entropy, gradient norm, task loss,
LBE term), with the command and commit given on the command line and, where a CPU-time log is given (lines
`<unix time> <hh:mm:ss> cpu_s=<process CPU seconds> "step": <last logged step>`, e.g. from polling
/proc/<pid>/stat), the process CPU seconds against the steps.

    python experiments/frontier/log_curve.py runs/cnn500/lbe_depth500_seed0 --out experiments/frontier/results/x.json \
        --command "python scripts/train_vanilla.py ..." --commit 1c3bf2b... --cpu_log runs/cnn500.cpu

Not part of the package or the tests.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from experiments.provenance import portable_path, provenance  # noqa: E402

DEAD_ENTROPY = 1e-13  # as experiments.frontier.arguments.DEAD_ENTROPY (hf_batch_entropy.diagnosis.DEFAULT_THRESHOLD)


def read_curve(folder: str) -> tuple[list[dict], list[dict]]:
    evals, windows = [], []
    with open(os.path.join(folder, "trainer_log.jsonl")) as f:
        for line in f:
            logs = json.loads(line)
            layers = [v for k, v in logs.items() if k.startswith("batch_entropy/layer_")]
            if "eval_accuracy" in logs:
                evals.append({"step": logs.get("step"), "accuracy": logs["eval_accuracy"],
                              "loss": logs.get("eval_loss")})
            elif layers:
                windows.append({"step": logs.get("step"), "alive_layers": sum(v > DEAD_ENTROPY for v in layers),
                                "num_layers": len(layers), "batch_entropy_mean": logs.get("batch_entropy_mean"),
                                "batch_entropy_min": logs.get("batch_entropy_min"),
                                "grad_norm": logs.get("grad_norm"), "task_loss": logs.get("task_loss"),
                                "lbe_loss": logs.get("lbe_loss"), "learning_rate": logs.get("learning_rate")})
    return evals, windows


def read_cpu_log(path: str) -> list[dict]:
    points = []
    with open(path) as f:
        for line in f:
            words = line.split()
            if len(words) < 3 or not words[2].startswith("cpu_s="):
                continue
            step = int(words[-1]) if words[-2] == '"step":' else None
            points.append({"unix_time": int(words[0]), "cpu_s": float(words[2][len("cpu_s="):]), "last_logged_step": step})
    return points


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", help="the run's folder (holding trainer_log.jsonl and run.log)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--command", required=True, help="the command of the run, as run")
    parser.add_argument("--commit", required=True, help="the commit the run ran at")
    parser.add_argument("--cpu_log", default=None)
    parser.add_argument("--note", default="")
    args = parser.parse_args()
    evals, windows = read_curve(args.folder)
    record = {
        "run": {"command": args.command, "commit": args.commit, "folder": os.path.basename(os.path.normpath(args.folder))},
        "collected_by": provenance(),
        "note": args.note,
        "eval_curve": evals,
        "train_windows": windows,
    }
    with open(os.path.join(args.folder, "run.log")) as f:
        record["run_log"] = [portable_path(line.rstrip("\n")) for line in f][:20]
    if args.cpu_log:
        record["cpu_curve"] = read_cpu_log(args.cpu_log)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(record, f, indent=1)
        f.write("\n")
    print(f"wrote {args.out}: {len(evals)} evaluations, {len(windows)} training windows")


if __name__ == "__main__":
    main()
