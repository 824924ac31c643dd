"""The frontier job's command line: `main(argv)` parses and checks the flags, runs every job (in this process or in a
pool of worker processes), writes results.json after each run with its provenance, draws the picture and prints the
table. `scripts/train_vanilla.py` and `python -m experiments.frontier` call it."""

from __future__ import annotations

import concurrent.futures
import json
import logging
import multiprocessing
import os
import sys
import time
from collections.abc import Sequence

import transformers

from experiments.provenance import provenance as record_provenance

from .arguments import UsageError, expand_preset, parse_arguments
from .data import SOURCES, check_data_source
from .plot import plot_entropy_heatmaps, plot_frontier
from .report import Progress, _duration, format_frontier_table, format_table, interpret, summarize
from .runs import Job, _worker_init, plan_jobs, resolve_threads, run_job, setup_process
from .workers import terminate_workers

# Same logger name as the job's other log lines (see runs.py).
logger = logging.getLogger("train_vanilla")

# The checkout the job runs from (its commit goes into results.json): the repository root holding this package.
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The documented entry point, relative to REPO: results.json records `python scripts/train_vanilla.py <flags>`, the
# command that reproduces it, whether the job ran through the script or `main` was called in-process (the tests).
SCRIPT = os.path.join("scripts", "train_vanilla.py")


def provenance(argv: list[str], expanded: list[str], program: Sequence[str] = (SCRIPT,)) -> dict:
    """What produced a results.json (`experiments.provenance`: the command line as typed, the commit and whether
    tracked files differed from it, the library versions, the machine), plus the command line with the preset's flags
    expanded (`argv`). `program` is what `python` ran: the script (default) or `("-m", "experiments.frontier")`."""
    return {**record_provenance([*program, *argv], packages=["scikit-learn"], repo=REPO), "argv": expanded}


def usage_error(message: str) -> None:
    """Exit as argparse does on bad input: one line on stderr, status 2."""
    sys.stderr.write(f"train_vanilla.py: error: {message} (--help lists every flag)\n")
    raise SystemExit(2)


def main(argv: list[str] | None = None, program: Sequence[str] = (SCRIPT,)) -> dict:
    """Run the frontier job for the command line `argv` (default `sys.argv[1:]`; a single `.json` path is a file of
    flags) and return what it writes to results.json. `program` is how the command is recorded (see `provenance`).
    Bad input exits with status 2 and one line on stderr, as argparse does."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) == 1 and argv[0].endswith(".json"):
        with open(argv[0]) as f:
            argv = [x for k, v in json.load(f).items() for x in (f"--{k}", v if isinstance(v, str) else json.dumps(v))]
    try:  # every check of the command line, before anything loads
        expanded = expand_preset(argv)
        model_args, data_args, training_args = parse_arguments(expanded)
        source = check_data_source(data_args)  # data that cannot be had here: one line saying how to get it
    except UsageError as err:
        usage_error(str(err))

    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%H:%M:%S",
                        level=logging.INFO, handlers=[logging.StreamHandler(sys.stdout)], force=True)
    transformers.utils.logging.set_verbosity_warning()
    meta = provenance(argv, expanded, program)
    meta["data_source"] = {"name": source, "what": SOURCES[source]}

    cpu = training_args.device.type == "cpu"
    if cpu:
        # Trainer imports DeepSpeed whenever it is installed (accelerate's unwrap_model), and DeepSpeed, left to detect
        # an accelerator, warns that it falls back to the CPU in every process. This job runs on the CPU: say so, and the
        # workers inherit it.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    threads = resolve_threads(model_args) if cpu else None
    # Auto: one single-thread worker per logical CPU. On a quiet 2-vCPU AMD EPYC VM two workers ran the frontier in
    # 4.9 min; one worker took 10.4 min while another job held the second vCPU (experiments/frontier/vanilla.md). On a machine busy
    # with other jobs they gain nothing.
    workers = data_args.workers or ((os.cpu_count() or 1) if cpu and threads == 1 else 1)
    workers = max(1, min(workers, len(plan_jobs(model_args, data_args))))
    jobs = plan_jobs(model_args, data_args, workers)
    meta["machine"].update(torch_threads_per_run=threads, workers=workers)
    if cpu:
        setup_process(model_args, training_args)
        logger.info(f"CPU: {threads} PyTorch thread(s) per run (--torch_threads), {workers} worker process(es) "
                    f"(--workers); subnormal floats {'flushed to zero' if model_args.flush_denormal else 'kept'}.")
    logger.info(f"{len(jobs)} runs: depths {model_args.depths}, runs {data_args.runs}, {data_args.num_seeds} seed(s)"
                + (f", ceiling depth {model_args.ceiling_depth}" if any(j.kind == "ceiling" for j in jobs) else "")
                + ("" if data_args.verbose else f"; each run's logs go to {training_args.output_dir}/<run>/ "
                   "(--verbose prints them)"))
    os.makedirs(training_args.output_dir, exist_ok=True)
    results_path = os.path.join(training_args.output_dir, "results.json")

    start = time.perf_counter()
    results, records = [], {}
    progress = Progress(jobs, workers)

    def finished(job: Job, result: dict, record: dict) -> None:
        results.append(result)
        records[job.name] = record
        print(progress.line(job, result), flush=True)
        write()

    def write() -> dict:
        ordered = sorted(results, key=lambda r: ({"ceiling": 0, "baseline": 1, "lbe": 2}[r["run"]], r["depth"],
                                                 r["seed_index"]))
        report = {"meta": {**meta, "total_wall_time_s": time.perf_counter() - start}, "summary": summarize(ordered),
                  "runs": ordered}
        # Written after every run so that a long job interrupted later keeps what was measured.
        with open(results_path, "w") as f:
            json.dump(report, f, indent=1)
        return report

    if workers == 1:
        for job in jobs:
            finished(job, *run_job(job, expanded))
    else:
        context = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked OpenMP pool
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context, initializer=_worker_init,
                                                    initargs=(threads or 1, data_args.verbose, os.getpid())) as pool:
            try:
                futures = {pool.submit(run_job, job, expanded, True): job for job in jobs}
                for future in concurrent.futures.as_completed(futures):
                    finished(futures[future], *future.result())
            except BaseException:  # Ctrl-C included: stop the workers' runs rather than wait for them
                pool.shutdown(wait=False, cancel_futures=True)
                terminate_workers()
                raise
    report = write()
    ordered = report["runs"]
    depths = sorted({r["depth"] for r in ordered if r["run"] != "ceiling"})
    if len(depths) > 1:
        picture = os.path.join(training_args.output_dir, "frontier.png")
        plot_frontier(report["summary"], ordered, records, picture)
    else:
        picture = os.path.join(training_args.output_dir, "batch_entropy.png")
        if not plot_entropy_heatmaps(ordered, records, picture):
            picture = None
    print(f"\ntotal wall time {_duration(report['meta']['total_wall_time_s'])} ({workers} worker(s))")
    print(f"results: {results_path}" + (f"\npicture: {picture}" if picture else "")
          + f"\nper-run logs: {os.path.join(training_args.output_dir, '<run>', 'trainer_log.jsonl')} and run.log")
    print()
    if len(depths) == 1 and data_args.num_seeds == 1:
        print(format_table(ordered))
    else:
        print(format_frontier_table(report["summary"]))
        print("\n" + interpret(report["summary"], training_args.max_steps))
    return report
