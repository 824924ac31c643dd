"""One training run of the frontier and the pool that runs them: what a run records (per-layer batch-entropies,
evaluation curve, effective rank), its log files and compact log lines, the `VanillaTrainer` subclass, `Job`,
`run_job` (what a worker process executes), the per-process setup, and `plan_jobs` (every run, in the order they
start)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import sys
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import transformers
from transformers import PrinterCallback, ProgressCallback, TrainerCallback, set_seed

from hf_batch_entropy import BatchEntropyTrainer, batch_entropies
from experiments.denormals import FlushDenormalsCallback, flush_denormals
from experiments.models import build_vanilla_model
from experiments.provenance import weights_checksum

from .arguments import (
    DEAD_ENTROPY,
    RANK_LAYERS,
    DataArguments,
    ModelArguments,
    VanillaTrainingArguments,
    parse_arguments,
    parse_depths,
    parse_runs,
    scheduler_name,
)
from .data import data_source, load_data
from .workers import watch_parent

# The job's log lines (stdout, run.log) name their source "train_vanilla", as they did when all this was one script.
logger = logging.getLogger("train_vanilla")


def effective_rank(h: torch.Tensor) -> float:
    """exp of the entropy of the normalized squared singular values of the centred activations `h` (N, units):
    1.0 when the batch varies along one direction only, `min(N, units)` at most."""
    h = h.flatten(1).double()
    h = h - h.mean(0, keepdim=True)
    s = torch.linalg.svdvals(h) ** 2
    if float(s.sum()) == 0.0:
        return 0.0
    p = s / s.sum()
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


@torch.no_grad()
def hidden_states_of(model, dataset, batch_size: int, device: torch.device) -> list[torch.Tensor]:
    """The hidden states (one `(n, ...)` tensor per hidden layer) of the first `batch_size` examples of `dataset`."""
    n = min(batch_size, len(dataset))
    batch = torch.stack([dataset[i]["pixel_values"] for i in range(n)]).to(device)
    was_training = model.training
    model.eval()
    hidden = model(pixel_values=batch, output_hidden_states=True).hidden_states
    model.train(was_training)
    return list(hidden)


def effective_ranks(hidden: list[torch.Tensor]) -> dict[str, float]:
    """Effective rank of the hidden layers of `RANK_LAYERS` (1-based) that exist, keyed by layer number."""
    return {str(layer): round(effective_rank(hidden[layer - 1]), 3) for layer in RANK_LAYERS if layer <= len(hidden)}


class EntropyRecorder(TrainerCallback):
    """Keeps the per-layer batch-entropies the trainer logs (`batch_entropy/layer_<i>`, window-averaged) per step, and
    at every evaluation the test accuracy and loss, the seconds since training began, and the effective rank of a few
    layers over the first `rank_examples` test examples (a forward pass without the RNG: training is unchanged)."""

    def __init__(self, test_dataset=None, rank_examples: int = 512, label: str | None = None):
        self.steps: list[int] = []
        self.entropies: list[list[float]] = []
        self.evals: list[dict] = []
        self.test_dataset, self.rank_examples, self.label = test_dataset, rank_examples, label
        self.start, self.start_cpu = time.perf_counter(), time.process_time()

    def on_train_begin(self, args, state, control, **kwargs):
        self.start, self.start_cpu = time.perf_counter(), time.process_time()

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        layers = sorted(
            (int(k.rsplit("_", 1)[1]), v) for k, v in logs.items() if k.startswith("batch_entropy/layer_")
        )
        if layers:
            self.steps.append(state.global_step)
            self.entropies.append([v for _, v in layers])

    def on_evaluate(self, args, state, control, metrics=None, model=None, **kwargs):
        metrics = metrics or {}
        if "eval_accuracy" not in metrics:
            return
        entry = {"step": state.global_step, "accuracy": metrics["eval_accuracy"], "loss": metrics.get("eval_loss"),
                 "time_s": round(time.perf_counter() - self.start, 2),
                 "cpu_s": round(time.process_time() - self.start_cpu, 2)}
        if self.test_dataset is not None and model is not None:
            hidden = hidden_states_of(model, self.test_dataset, self.rank_examples, args.device)
            entry["effective_rank"] = effective_ranks(hidden)
            entry["alive_layers"] = int((batch_entropies(hidden) > DEAD_ENTROPY).sum())
        if self.evals and self.evals[-1]["step"] == entry["step"]:
            entry["time_s"] = self.evals[-1]["time_s"]  # the final evaluate() of the weights evaluated last in training
            entry["cpu_s"] = self.evals[-1]["cpu_s"]
            self.evals[-1] = entry
        else:
            self.evals.append(entry)
        if self.label is not None:
            print(f"[{self.label}] step {state.global_step}/{state.max_steps}: test accuracy "
                  f"{100 * entry['accuracy']:.1f}% ({entry['time_s']:.0f} s)", flush=True)


def _compact(logs: dict) -> dict:
    """The logs without the hundreds of per-layer entropies, plus a count of the layers that are alive."""
    layers = [v for k, v in logs.items() if k.startswith("batch_entropy/layer_")]
    short = {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in logs.items()
             if not k.startswith("batch_entropy/layer_") and k != "total_flos"}
    if layers:
        short["alive_layers"] = f"{sum(v > DEAD_ENTROPY for v in layers)}/{len(layers)}"
    return short


class CompactProgressCallback(ProgressCallback):
    """Trainer's tqdm bar, with compact log lines."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and self.training_bar is not None and logs:
            self.training_bar.write(str(_compact(logs)))


class CompactPrinterCallback(PrinterCallback):
    """Trainer's printer (used with --disable_tqdm), with compact log lines."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_local_process_zero and logs:
            print(_compact(logs))


class VanillaTrainer(BatchEntropyTrainer):
    """`BatchEntropyTrainer` that evaluates on every test example: `dataloader_drop_last` is meant for the training
    batches (a last batch of one example has no batch-entropy), but Trainer applies it to evaluation too, which would
    silently drop test examples (or all of them when the test set is smaller than the evaluation batch)."""

    def get_eval_dataloader(self, eval_dataset=None):
        drop_last = self.args.dataloader_drop_last
        self.args.dataloader_drop_last = False
        try:
            return super().get_eval_dataloader(eval_dataset)
        finally:
            self.args.dataloader_drop_last = drop_last

    def train(self, *args, **kwargs):
        self._num_parameters = self._clip_parameters = None
        return super().train(*args, **kwargs)

    # The hot path of a deep, narrow network: Trainer's per-step bookkeeping walks the ~1,500 submodules of a
    # depth-500 MLP several times per step. Both overrides below give the same numbers bit for bit.

    def floating_point_ops(self, inputs) -> int:
        """Trainer's estimate, 6 · input values · parameters, with the parameters counted once rather than every step
        (`num_parameters` walks every submodule: ~2.5 ms per depth-500 step)."""
        if getattr(self, "_num_parameters", None) is None:
            self._num_parameters = self.model.num_parameters(exclude_embeddings=True)
        main_input = getattr(self.model, "main_input_name", "input_ids")
        return 6 * inputs[main_input].numel() * self._num_parameters if main_input in inputs else 0

    def _clip_grad_norm(self, model):
        """`clip_grad_norm_` as Trainer does it, without the multiplication by 1.0 when the norm is below the limit
        (most steps here): torch multiplies all 1,002 gradients by the clamped factor every step, on the CPU one
        tensor at a time. The norm is torch's own (`get_total_norm`), and the gradients are scaled exactly as
        `clip_grads_with_norm_` scales them when the norm is above the limit."""
        if self.accelerator.num_processes > 1 or self.accelerator.scaler is not None or model is not self.model:
            return super()._clip_grad_norm(model)
        if getattr(self, "_clip_parameters", None) is None:  # listed once per train(): the walk costs ~1 ms a step
            self._clip_parameters = list(model.parameters())
        parameters = [p for p in self._clip_parameters if p.grad is not None]
        max_norm = float(self.args.max_grad_norm)
        total = torch.nn.utils.get_total_norm([p.grad for p in parameters], 2.0)
        # torch: clip_coef = max_norm / (total + 1e-6), clamped at 1; a factor of exactly 1 leaves the gradients as they are.
        if float(torch.clamp(max_norm / (total + 1e-6), max=1.0)) != 1.0:
            torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, total)
        return total


def compute_accuracy(eval_pred) -> dict[str, float]:
    logits, labels = eval_pred
    logits = logits[0] if isinstance(logits, tuple) else logits
    return {"accuracy": float((np.asarray(logits).argmax(-1) == np.asarray(labels)).mean())}


@dataclass(frozen=True)
class Job:
    """One training run: `kind` 'baseline' (β = 0), 'lbe' or 'ceiling' (shallow, He-initialized, β = 0), at `depth`,
    with seed number `seed_index` (training seed `--seed + i`, split seed `--split_seed + i`)."""

    kind: str
    depth: int
    seed_index: int

    @property
    def name(self) -> str:
        return f"{self.kind}_depth{self.depth}_seed{self.seed_index}"


def he_initialize(model: torch.nn.Module) -> None:
    """He (Kaiming) normal weights for ReLU, std √(2/fan_in), and zero biases: the well-initialized ceiling."""
    for module in model.modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
            torch.nn.init.zeros_(module.bias)


def reference_target_modules(arch: str, depth: int) -> list[str]:
    """The layers the paper's reference implementation regularizes: the MLP's hidden layers 2…depth−1 (its FNN-500
    regularizes the 498 middle ReLU outputs), the CNN's layers without the first convolution (`conv_in`)."""
    if arch == "mlp":
        if depth < 3:
            raise ValueError("--lbe_layers reference leaves no layer to regularize below depth 3.")
        return [f"layers.{i}" for i in range(1, depth - 1)]
    return [f"layers.{i}" for i in range(1, depth)] + ["fc"]


def setup_process(model_args: ModelArguments, training_args: VanillaTrainingArguments) -> None:
    """Threads and subnormal flushing for this process (the main one or a worker)."""
    if training_args.device.type != "cpu":
        return
    if model_args.flush_denormal:
        # Deep vanilla networks produce subnormal floats, on which CPU arithmetic is slower (1.1-2.8x, experiments/frontier/vanilla.md).
        # Flushing them to zero changes values only below 1.2e-38. The trainers' callback repeats it every step.
        flush_denormals()
    torch.set_num_threads(resolve_threads(model_args))


def resolve_threads(model_args: ModelArguments) -> int:
    return model_args.torch_threads or (1 if model_args.width <= 256 else torch.get_num_threads())


def run_job(job: Job, argv: list[str], in_worker: bool = False) -> tuple[dict, dict]:
    """Train one run; returns its result entry and its entropy record `{"steps": [...], "entropies": [[...]]}`.

    Re-parses `argv` (the expanded command line) so that it runs the same in a worker process as in this one.
    """
    model_args, data_args, training_args = parse_arguments(argv)
    if in_worker:
        setup_process(model_args, training_args)
        transformers.utils.logging.set_verbosity_error()
    run_dir = os.path.join(training_args.output_dir, job.name)
    os.makedirs(run_dir, exist_ok=True)
    beta = training_args.lbe_beta if job.kind == "lbe" else 0.0
    with run_log(os.path.join(run_dir, "run.log"), data_args.verbose):
        return _run_job(job, model_args, data_args, training_args, run_dir, beta, in_worker)


def _run_job(job: Job, model_args: ModelArguments, data_args: DataArguments, training_args, run_dir: str, beta: float,
             in_worker: bool) -> tuple[dict, dict]:
    seed = training_args.seed + job.seed_index
    split_seed = data_args.split_seed + job.seed_index
    train_ds, test_ds, num_labels = load_data(dataclasses.replace(data_args, split_seed=split_seed))
    sample = train_ds[0]["pixel_values"]
    channels, size = sample.shape[0], sample.shape[-1]

    targets = training_args.lbe_target_modules
    if job.kind == "lbe" and model_args.lbe_layers == "reference":
        targets = reference_target_modules(model_args.arch, job.depth)
    args = dataclasses.replace(training_args, output_dir=run_dir, lbe_beta=beta, seed=seed, data_seed=None,
                               lbe_target_modules=targets)
    # Same seed before building the model: the baseline and the LBE run of a depth and seed start from the same weights.
    set_seed(seed)
    init = {}
    if model_args.initialization != "default" and job.kind != "ceiling":
        init = dict(initialization=model_args.initialization, init_gain=model_args.init_gain,
                    init_bias_std=model_args.init_bias_std)
    model = build_vanilla_model(model_args.arch, job.depth, model_args.width, num_channels=channels, image_size=size,
                                num_labels=num_labels, activation=model_args.activation, **init)
    if job.kind == "ceiling":
        he_initialize(model)
    # Fingerprint of the initial weights: equal for the baseline and the LBE run of a depth and seed.
    init_checksum = weights_checksum(model)
    label = f"{job.kind} depth {job.depth} seed {job.seed_index}"
    recorder = EntropyRecorder(test_ds, data_args.entropy_batch_size,
                               label=label if in_worker and data_args.verbose else None)
    callbacks = [recorder] + ([FlushDenormalsCallback()] if model_args.flush_denormal else [])
    callbacks.append(LogFileCallback(os.path.join(run_dir, "trainer_log.jsonl")))
    trainer = VanillaTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=test_ds,
                             compute_metrics=compute_accuracy, callbacks=callbacks)
    # The log dicts are in trainer_log.jsonl; stdout gets one line per run unless --verbose, which prints them
    # (compact) with Trainer's progress bar, or without it in a worker process (bars of parallel runs interleave).
    bar = trainer.pop_callback(ProgressCallback)
    trainer.pop_callback(PrinterCallback)
    if data_args.verbose:
        trainer.add_callback(CompactProgressCallback if bar is not None and not in_worker else CompactPrinterCallback)
    logger.info(f"=== {label}: lbe_beta={beta}, {model_args.arch} width {model_args.width}, seed {seed}, "
                f"split seed {split_seed}" + (": β = 0, the batch-entropies are measured and logged, the loss is not "
                                              "regularized" if beta == 0 else ""))
    # warmup_stable_decay with num_stable_steps (the frontier's schedule) warns that Trainer also passes the total.
    warnings.filterwarnings("ignore", message="Both num_training_steps and num_stable_steps are specified")
    start, start_cpu = time.perf_counter(), time.process_time()
    train_output = trainer.train()
    train_time, train_cpu = time.perf_counter() - start, time.process_time() - start_cpu
    metrics = trainer.evaluate()
    wall = time.perf_counter() - start
    hidden = hidden_states_of(trainer.model, test_ds, data_args.entropy_batch_size, args.device)
    entropies = batch_entropies(hidden).tolist()
    task_logs = [h["task_loss"] for h in trainer.state.log_history if "task_loss" in h]
    result = {
        "run": job.kind, "name": job.name,
        "model": f"vanilla {model_args.arch.upper()} depth {job.depth} width {model_args.width} "
                 f"{model_args.activation} on {data_args.dataset}",
        "arch": model_args.arch, "depth": job.depth, "width": model_args.width,
        "activation": model_args.activation, "dataset": data_args.dataset, "data_source": data_source(data_args),
        "init": "he_normal" if job.kind == "ceiling" else ("pytorch_default" if model.config.initialization == "default"
                                                           else model.config.initialization),
        "init_gain": model.config.init_gain, "init_bias_std": model.config.init_bias_std,
        "lbe_beta": beta, "lbe_alpha": args.lbe_alpha, "lbe_alpha_min": args.lbe_alpha_min,
        "lbe_alpha_learning_rate": args.lbe_alpha_learning_rate,
        "lbe_layers": model_args.lbe_layers if job.kind == "lbe" else None,
        "learning_rate": args.learning_rate, "lr_scheduler_type": scheduler_name(args),
        "batch_size": args.per_device_train_batch_size, "seed_index": job.seed_index, "seed": seed,
        "split_seed": split_seed, "init_checksum": init_checksum,
        "steps": trainer.state.global_step, "epochs": trainer.state.epoch,
        "test_accuracy": metrics["eval_accuracy"], "test_loss": metrics["eval_loss"],
        "train_task_loss": task_logs[-1] if task_logs else None,
        "train_loss": train_output.training_loss,
        "num_layers": len(entropies),
        # Layers whose batch-entropy the trainer measured and logged; LBE regularizes them only when β > 0.
        "measured_layers": len(recorder.entropies[-1]) if recorder.entropies else None,
        "regularized_layers": (len(recorder.entropies[-1]) if recorder.entropies else None) if beta > 0 else 0,
        "entropy_min": min(entropies), "entropy_mean": float(np.mean(entropies)),
        "alive_layers": int(sum(h > DEAD_ENTROPY for h in entropies)),
        "effective_rank_end": effective_ranks(hidden),
        "entropies_end": entropies,
        "eval_curve": recorder.evals,
        "train_time_s": train_time, "train_cpu_s": train_cpu, "wall_time_s": wall,
        "device": str(args.device), "torch_threads": torch.get_num_threads(),
        "flush_denormal": bool(model_args.flush_denormal and args.device.type == "cpu"),
    }
    return result, {"steps": recorder.steps, "entropies": recorder.entropies}


def _worker_init(threads: int, verbose: bool = False, parent_pid: int | None = None) -> None:
    # First: a worker whose job is gone ends (however the job was stopped; see workers.py).
    if parent_pid is not None:
        watch_parent(parent_pid)
    # Before torch starts its thread pool in the worker: one thread per worker process.
    torch.set_num_threads(threads)
    # Warnings (and with --verbose every log line) of a run in a worker reach stdout as in the main process.
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%H:%M:%S",
                        level=logging.INFO, handlers=[logging.StreamHandler(sys.stdout)], force=True)
    logging.getLogger().handlers[0].setLevel(logging.INFO if verbose else logging.WARNING)


class LogFileCallback(TrainerCallback):
    """Every Trainer log dict (losses, LBE metrics, per-layer batch-entropies, evaluations) with its step, one JSON
    object per line: the per-step record that --verbose also prints."""

    def __init__(self, path: str):
        self.path = path
        open(path, "w").close()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": state.global_step, **logs}, default=float) + "\n")


@contextlib.contextmanager
def run_log(path: str, verbose: bool):
    """While one run trains: every log line (INFO and up) also goes to its `run.log`; stdout keeps only warnings
    unless --verbose."""
    root = logging.getLogger()
    handler = logging.FileHandler(path, mode="w", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s - %(levelname)s - %(name)s - %(message)s", "%H:%M:%S"))
    quieted = [] if verbose else [(h, h.level) for h in root.handlers]
    for h, level in quieted:
        h.setLevel(max(level, logging.WARNING))
    root_level = root.level
    root.setLevel(logging.INFO)
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        handler.close()
        root.setLevel(root_level)
        for h, level in quieted:
            h.setLevel(level)


def plan_jobs(model_args: ModelArguments, data_args: DataArguments, workers: int = 1) -> list[Job]:
    """Every run, in the order they start.

    One worker: the table's order (the ceiling, then depth by depth, each seed's baseline and LBE run together). The
    order cannot change the total time of one process running everything in turn, and this one gives the first
    results in seconds. Several workers: the runs of the shallowest depth and the ceilings first (seconds each, so
    that the first progress lines and a first time estimate come within seconds), then the others longest first
    (deepest, LBE before baseline; the longest-processing-time rule), because the total time is then set by the last
    run to finish: a depth-500 run started last would keep one worker busy for minutes while the others sit idle (on
    the frontier a depth-500 run takes ~15 times a depth-10 one). Running the short runs first costs the total at
    most one short run.
    """
    depths = parse_depths(model_args.depths)
    runs = parse_runs(data_args.runs)
    jobs = [Job(kind, depth, i) for depth in depths for i in range(data_args.num_seeds) for kind in runs]
    if model_args.ceiling and len(depths) > 1:
        jobs = [Job("ceiling", model_args.ceiling_depth, i) for i in range(data_args.num_seeds)] + jobs
    if workers > 1:
        short = [j for j in jobs if j.kind == "ceiling" or j.depth == min(depths)]
        rest = [j for j in jobs if j not in short]
        jobs = short + sorted(rest, key=lambda j: (-j.depth, j.kind != "lbe", j.seed_index))
    return jobs
