"""Step time and peak memory of `BatchEntropyTrainer` against plain `transformers.Trainer` (`scripts/benchmark.py`).

The method, the cases and the commands are in the script's docstring and experiments/benchmark/benchmarks.md.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import random
import statistics
import sys
import tempfile
import time

import torch
from transformers import PrinterCallback, Trainer, TrainingArguments
from transformers.utils import logging as hf_logging

from hf_batch_entropy import BatchEntropyConfig, BatchEntropyTrainer
from experiments.provenance import cpu_model, provenance
from experiments.denormals import FlushDenormalsCallback, flush_denormals

from . import compiled_estimator
from .cases import ALL_CASES, CPU_CASES, CUDA_CASES, Case, TensorDictDataset, get_case
from .measure import CLOCKS, CpuPeakMemory, StepTimer, cuda_peak_memory

VARIANTS = {
    "trainer": "transformers.Trainer",
    "lbe": "BatchEntropyTrainer",
    "lbe_unfused": "BatchEntropyTrainer (lbe_fused=False)",
    "lbe_sync": "BatchEntropyTrainer (lbe_sync_entropy=True)",
    "lbe_all_positions": "BatchEntropyTrainer (lbe_ignore_padding=False)",
    "lbe_compiled": "BatchEntropyTrainer, estimator compiled with torch.compile (compiled_estimator.py)",
}
# Per `lbe_compiled` turn: the seconds its first calls took (compile included), recorded in the JSON.
COMPILE_RECORD: list[dict[str, float]] = []
WORLD_SIZE = int(os.environ.get("WORLD_SIZE", "1"))
RANK = int(os.environ.get("RANK", "0"))


def log(*args, **kwargs) -> None:
    if RANK == 0:
        print(*args, **kwargs, flush=True)


def run_turn(case: Case, variant: str, master: torch.nn.Module, data: TensorDictDataset, opts, max_steps: int) -> list[float]:
    """Train a fresh copy of the model (initial weights) with one trainer for `max_steps`; return the step times."""
    cuda = opts.device == "cuda"
    model = copy.deepcopy(master)
    common = dict(
        output_dir=opts.workdir,
        per_device_train_batch_size=opts.batch_size or case.batch_size,
        max_steps=max_steps,
        learning_rate=1e-4,
        logging_steps=10_000,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        use_cpu=not cuda,
        bf16=opts.bf16,
        torch_compile=opts.torch_compile,
        seed=0,
    )
    timer = StepTimer(cuda, opts.clock)
    # The flush runs every step on CPU (a no-op on CUDA), before the timer starts: callbacks run in list order.
    callbacks = [FlushDenormalsCallback(), timer]
    if variant == "trainer":
        trainer = Trainer(model=model, args=TrainingArguments(**common), train_dataset=data, callbacks=callbacks)
    else:
        args = BatchEntropyConfig(
            **common, lbe_fused=(variant != "lbe_unfused"), lbe_sync_entropy=(variant == "lbe_sync"),
            lbe_ignore_padding=(variant != "lbe_all_positions"),
        )
        trainer = BatchEntropyTrainer(model=model, args=args, train_dataset=data, callbacks=callbacks)
    trainer.remove_callback(PrinterCallback)  # no log lines between the turns
    restore = compiled_estimator.install() if variant == "lbe_compiled" else None
    try:
        trainer.train()
    finally:
        if restore is not None:
            COMPILE_RECORD.append(restore())
    del trainer, model
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return timer.times


def bench_case(case: Case, opts) -> dict:
    torch.manual_seed(0)
    master = case.build_model()  # stays on the CPU; every turn trains a deep copy of it
    num_params = sum(p.numel() for p in master.parameters())
    max_steps = opts.warmup + opts.steps
    data = case.build_data((opts.batch_size or case.batch_size) * max_steps * WORLD_SIZE)
    variants = opts.variants
    times: dict[str, list[float]] = {v: [] for v in variants}
    peaks: dict[str, list[int]] = {v: [] for v in variants}
    cuda = opts.device == "cuda"
    for r in range(opts.rounds):
        order = variants if r % 2 == 0 else variants[::-1]
        for variant in order:
            t0 = time.perf_counter()
            if cuda:
                with cuda_peak_memory() as mem:
                    step_times = run_turn(case, variant, master, data, opts, max_steps)
                peaks[variant].append(mem["peak_bytes"])
            else:
                step_times = run_turn(case, variant, master, data, opts, max_steps)
            times[variant].extend(step_times[opts.warmup :])
            log(
                f"  [{case.name}] round {r + 1}/{opts.rounds} {variant:12s} median {statistics.median(step_times[opts.warmup:]):.4f} s/step"
                f"  ({time.perf_counter() - t0:.1f} s)",
            )
    if not cuda and WORLD_SIZE == 1 and opts.cpu_memory is not None and opts.cpu_memory.available:
        opts.cpu_memory.enter_measuring_mode()
        for r in range(opts.memory_repeats):
            for variant in variants if r % 2 == 0 else variants[::-1]:
                with opts.cpu_memory.measure() as mem:
                    run_turn(case, variant, master, data, opts, min(max_steps, opts.memory_steps))
                peaks[variant].append(mem["peak_bytes"])
    result = {
        "case": case.name,
        "description": case.description,
        "batch_size": opts.batch_size or case.batch_size,
        "world_size": WORLD_SIZE,
        "num_parameters": num_params,
        "variants": {},
    }
    for variant in variants:
        med = statistics.median(times[variant])
        result["variants"][variant] = {
            "trainer": VARIANTS[variant],
            "median_step_s": med,
            # The fastest step: under contention from other jobs (a shared CPU), the least disturbed figure.
            "min_step_s": min(times[variant]),
            "step_times_s": times[variant],
            "iqr_step_s": _iqr(times[variant]),
            # CUDA: the largest of the turns (exact); CPU: the median of the memory turns (RSS is noisy, ±5-10%).
            "peak_memory_bytes": (max(peaks[variant]) if cuda else int(statistics.median(peaks[variant])))
            if peaks[variant]
            else None,
            "peak_memory_bytes_all": peaks[variant],
        }
    base = result["variants"]["trainer"]
    for variant in variants:
        v = result["variants"][variant]
        v["time_ratio"] = v["median_step_s"] / base["median_step_s"]
        # Paired by round: this trainer's turn and `Trainer`'s turn of the same round ran next to each other, so the
        # median of the rounds' ratios is not moved by a round in which the machine was slow for one turn, as the
        # ratio of the pooled medians is. The intervals resample whole rounds.
        v["time_ratio_ci95"] = _round_bootstrap_ci(base["step_times_s"], v["step_times_s"], opts.steps, pooled=True)
        v["round_time_ratios"] = _round_ratios(base["step_times_s"], v["step_times_s"], opts.steps)
        v["paired_time_ratio"] = statistics.median(v["round_time_ratios"])
        v["paired_time_ratio_ci95"] = _round_bootstrap_ci(base["step_times_s"], v["step_times_s"], opts.steps,
                                                          pooled=False)
        v["min_time_ratio"] = v["min_step_s"] / base["min_step_s"]
        v["memory_ratio"] = (
            v["peak_memory_bytes"] / base["peak_memory_bytes"]
            if v["peak_memory_bytes"] and base["peak_memory_bytes"]
            else None
        )
    return result


def _rounds(times: list[float], steps: int) -> list[list[float]]:
    return [times[i : i + steps] for i in range(0, len(times), steps)]


def _round_ratios(base: list[float], other: list[float], steps: int) -> list[float]:
    """Per round: the median step of `other`'s turn over the median step of `base`'s turn."""
    return [statistics.median(o) / statistics.median(b) for b, o in zip(_rounds(base, steps), _rounds(other, steps))]


def _round_bootstrap_ci(base: list[float], other: list[float], steps: int, pooled: bool,
                        resamples: int = 2000) -> list[float] | None:
    """95 % interval from a bootstrap over rounds (draw as many rounds as were run, with replacement, each round's two
    turns together; seeded, so the same step times give the same interval) of `median(other) / median(base)` over
    the drawn rounds' steps (`pooled`), or of the median of the drawn rounds' ratios. `None` with fewer than 3
    rounds."""
    base_rounds, other_rounds = _rounds(base, steps), _rounds(other, steps)
    n = len(base_rounds)
    if n < 3:
        return None
    ratios_by_round = None if pooled else _round_ratios(base, other, steps)
    rng = random.Random(0)
    ratios = []
    for _ in range(resamples):
        picks = [rng.randrange(n) for _ in range(n)]
        if pooled:
            ratios.append(statistics.median(t for i in picks for t in other_rounds[i])
                          / statistics.median(t for i in picks for t in base_rounds[i]))
        else:
            ratios.append(statistics.median(ratios_by_round[i] for i in picks))
    ratios.sort()
    return [ratios[int(0.025 * resamples)], ratios[int(0.975 * resamples) - 1]]


def _iqr(xs: list[float]) -> list[float]:
    if len(xs) < 4:
        return [min(xs), max(xs)]
    q = statistics.quantiles(xs, n=4)
    return [q[0], q[2]]


def print_table(results: list[dict], header: str) -> str:
    lines = [header, ""]
    lines.append("| case | trainer | s/step (median) | IQR | ratio | paired ratio (95 % interval) | s/step (min) | ratio "
                 "| peak MiB | ratio |")
    lines.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for res in results:
        for variant, v in res["variants"].items():
            mem = f"{v['peak_memory_bytes'] / 2**20:.0f}" if v["peak_memory_bytes"] else "n/a"
            mem_ratio = f"{v['memory_ratio']:.3f}" if v["memory_ratio"] else "n/a"
            iqr = f"{v['iqr_step_s'][0]:.3f}–{v['iqr_step_s'][1]:.3f}"
            interval = v["paired_time_ratio_ci95"]
            paired = f"{v['paired_time_ratio']:.3f}" + ("" if interval is None else f" ({interval[0]:.3f}–{interval[1]:.3f})")
            lines.append(
                f"| {res['case']} | {v['trainer']} | {v['median_step_s']:.4f} | {iqr} | {v['time_ratio']:.3f} | {paired} "
                f"| {v['min_step_s']:.4f} | {v['min_time_ratio']:.3f} | {mem} | {mem_ratio} |"
            )
    text = "\n".join(lines)
    log(text)
    return text


def main(argv: list[str] | None = None) -> dict:
    # The program users run: scripts/benchmark.py (argparse's default), or the module.
    prog = "python -m experiments.benchmark" if os.path.basename(sys.argv[0]) == "__main__.py" else None
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--cases", nargs="+", choices=ALL_CASES, help="default: minilm mlp256 on CPU, bert-base mlp1000 on CUDA")
    parser.add_argument("--bf16", action="store_true", help="bf16 mixed precision (autocast) for both trainers")
    parser.add_argument("--torch_compile", action="store_true", help="torch_compile=True for both trainers")
    parser.add_argument("--steps", type=int, default=6, help="measured optimizer steps per turn (default 6)")
    parser.add_argument("--warmup", type=int, default=2, help="steps dropped at the start of every turn (default 2)")
    parser.add_argument(
        "--rounds", type=int, default=2,
        help="turns per trainer, alternating (default 2); from 3 rounds on, the ratio gets a 95 %% interval from a "
        "bootstrap over rounds",
    )
    parser.add_argument("--memory_steps", type=int, default=3, help="steps of each CPU memory turn (default 3)")
    parser.add_argument(
        "--memory_repeats", type=int, default=3, help="CPU memory turns per trainer, alternating; median (default 3)"
    )
    parser.add_argument(
        "--variants",
        nargs="+",
        default=["trainer", "lbe"],
        choices=list(VARIANTS),
        help="what to compare: trainer (plain Trainer, the baseline), lbe (fused, the default), lbe_unfused, "
        "lbe_sync (synchronized batch-entropy; launch several processes with accelerate launch or torchrun), "
        "lbe_all_positions (entropies over every position, no padding mask: what the mask costs)",
    )
    parser.add_argument("--batch_size", type=int, help="per-device batch size (default: the case's)")
    parser.add_argument("--output", help="write the results as JSON here")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads on CPU (default: torch's choice)")
    parser.add_argument(
        "--clock", choices=sorted(CLOCKS), default="wall",
        help="what a step's time is: wall time (default), or this process's CPU time (CPU only; with --threads 1 it "
        "is the step's compute, which other jobs on a shared machine barely move, while its wall time can grow 5-10×)",
    )
    parser.add_argument("--note", default="", help="recorded in the JSON (e.g. what else ran on the host)")
    opts = parser.parse_args(argv)
    for flag, low in (("steps", 1), ("rounds", 1), ("memory_steps", 1), ("memory_repeats", 1), ("warmup", 0),
                      ("batch_size", 2), ("threads", 1)):
        value = getattr(opts, flag)
        if value is not None and value < low:  # one line, as argparse's own errors would be without the usage
            print(f"{parser.prog}: error: argument --{flag}: must be >= {low}, got {value}", file=sys.stderr)
            raise SystemExit(2)
    if "trainer" not in opts.variants:
        opts.variants = ["trainer"] + opts.variants
    if opts.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda, but CUDA is not available.")
    if opts.device == "cuda" and opts.clock == "cpu":
        raise SystemExit("--clock cpu measures CPU work: on CUDA the step's time is the GPU's, use --clock wall.")
    opts.cases = opts.cases or list(CPU_CASES if opts.device == "cpu" else CUDA_CASES)
    hf_logging.set_verbosity_error()
    opts.cpu_memory = None
    flushed_pool = None
    if opts.device == "cpu":
        if opts.threads:
            torch.set_num_threads(opts.threads)
        flushed_pool = flush_denormals()
        opts.cpu_memory = CpuPeakMemory()
        if not opts.cpu_memory.available:
            log("CPU peak memory is not measured here (needs Linux /proc/self/clear_refs and glibc).")
    if opts.device == "cuda":
        device_name = torch.cuda.get_device_name()
    else:
        device_name = f"{cpu_model()} ({os.cpu_count()} cores)"
    meta = {
        **provenance(sys.argv, torch_threads=torch.get_num_threads(), world_size=WORLD_SIZE),
        "device": opts.device,
        "device_name": device_name,
        "flush_denormal": opts.device == "cpu",
        "flush_denormal_openmp_pool": flushed_pool,
        "bf16": opts.bf16,
        "torch_compile": opts.torch_compile,
        "steps": opts.steps,
        "warmup": opts.warmup,
        "rounds": opts.rounds,
        "clock": opts.clock,
        "note": opts.note,
        # The CPU kernel sets in force (another CPU's kernels: e.g. MKL_ENABLE_INSTRUCTIONS=AVX2), and the host's load.
        "cpu_kernel_env": {k: os.environ[k] for k in ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS",
                                                      "ONEDNN_MAX_CPU_ISA") if k in os.environ},
        "load_average_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    log(
        f"{device_name}; torch {torch.__version__}, {torch.get_num_threads()} threads, {WORLD_SIZE} process(es); "
        f"bf16={opts.bf16} compile={opts.torch_compile}"
    )
    results = []
    with tempfile.TemporaryDirectory() as workdir:
        opts.workdir = workdir
        for name in opts.cases:
            case = get_case(name)
            log(f"{case.name}: {case.description}")
            results.append(bench_case(case, opts))
            _write(opts.output, {"meta": meta, "results": results, "complete": False})  # partial results, per case
    table = print_table(
        results,
        f"\n{device_name}, {WORLD_SIZE} process(es), {'bf16' if opts.bf16 else 'fp32'}"
        f"{', torch.compile' if opts.torch_compile else ''}; "
        f"ratio = BatchEntropyTrainer / Trainer",
    )
    meta["load_average_at_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    if COMPILE_RECORD:
        meta["lbe_compiled_turns"] = COMPILE_RECORD
    out = {"meta": meta, "results": results, "table": table, "complete": True}
    if _write(opts.output, out):
        log(f"wrote {opts.output}")
    return out


def _write(path: str | None, data: dict) -> bool:
    if not path or RANK != 0:
        return False
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f, indent=2)
    return True
