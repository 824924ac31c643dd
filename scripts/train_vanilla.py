#!/usr/bin/env python
# coding=utf-8
r"""The trainability frontier of vanilla deep networks (no skip connections, no normalization, no dropout) with and
without layerwise batch-entropy regularization (LBE), the headline experiment of Peer et al., TMLR 2022.

For every depth of a ladder (default 10, 30, 100, 500) and every seed, the same network, from the same initialization,
is trained twice through `BatchEntropyTrainer`:

- `baseline`: `lbe_beta = 0`, i.e. plain cross-entropy (the trainer still measures and logs the batch-entropies);
- `lbe`:      L = L_task + β·mean_l((H_l − max(α_min, |α_l|))²)·L_task,

plus, once per seed, a shallow, well-initialized network (`ceiling`: depth 2, He-normal weights, zero biases, no
LBE) as the accuracy that this data and recipe allow. Seed i uses the training seed `--seed + i` (initialization and
batch order) and the split seed `--split_seed + i` (train/test split). Independent runs go to `--workers` processes
of one thread each.

It prints one line per run as it finishes (run k of N, run kind, depth, seed, test accuracy, seconds, estimated time
left for the job), then the table (test accuracy, mean ± std over the seeds, per depth) and what it means. It writes
into `--output_dir`:

- `results.json`: `meta` (the exact command, commit and whether the tree was dirty, library versions, machine),
  `summary` (per run kind and depth: mean and std of the test accuracy over the seeds) and `runs` (one entry per run:
  settings, final metrics, per-layer entropies at the end, and the evaluation curve against steps and wall time with
  the effective rank of a few layers);
- `frontier.png` (two depths or more): test accuracy against depth (log axis, error bars = std over seeds, the
  ceiling as a band), and the per-layer batch-entropy over training of the deepest pair (log colour scale);
- `batch_entropy.png` (a single depth): the per-layer batch-entropy over training of each run of the first seed;
- one folder per run (`lbe_depth500_seed0/`, ...) with `trainer_log.jsonl` (every Trainer log dict, one JSON object
  per line: losses, LBE metrics, per-layer batch-entropies) and `run.log` (the run's settings, which layers LBE
  measures, warnings). `--verbose` prints both on stdout as well.

Default (`--preset frontier`): ReLU MLPs of width 64 on scikit-learn's bundled 8×8 digits (no download), 3 seeds; the
README gives the measured time. Examples:

    python scripts/train_vanilla.py                                   # the frontier (digits, depths 10…500, 3 seeds)
    python scripts/train_vanilla.py --preset long                     # the depth-500 recipe that learns (one seed)
    python scripts/train_vanilla.py --preset depth50                  # the depth-50 recipe
    python scripts/train_vanilla.py --depths 500 --num_seeds 1        # one pair (baseline, LBE) at depth 500
    python scripts/train_vanilla.py --arch cnn --depth 150 --width 8 --num_seeds 1 --output_dir vanilla_cnn
    python scripts/train_vanilla.py --dataset mnist --depths 500 --width 1000 ...   # the paper's setting, on a GPU
    python scripts/train_vanilla.py --help                            # every flag, explained

A preset is a list of flags (`PRESETS` below) put in front of the command line's own, which override it. Every
`BatchEntropyConfig` / `TrainingArguments` flag is accepted (`--learning_rate`, `--max_steps`, `--lbe_beta`, ...).
See docs/vanilla.md for the measurements behind the defaults.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import json
import logging
import math
import multiprocessing
import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import transformers
from torch.utils.data import Dataset
from transformers import HfArgumentParser, PrinterCallback, ProgressCallback, TrainerCallback, set_seed
from transformers.activations import ACT2FN

from hf_batch_entropy import BatchEntropyConfig, BatchEntropyTrainer, batch_entropies
from hf_batch_entropy.denormals import FlushDenormalsCallback, flush_denormals
from hf_batch_entropy.diagnosis import DEFAULT_THRESHOLD
from hf_batch_entropy.models import build_vanilla_model
from hf_batch_entropy.provenance import provenance as record_provenance

logger = logging.getLogger("train_vanilla")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A layer whose batch-entropy is below this (nats per unit) is counted as "dead" in the table and the logs: its
# activations are numerically the same for every example of the batch. Same threshold as `hf_batch_entropy.diagnosis`.
DEAD_ENTROPY = DEFAULT_THRESHOLD

RUNS = ("baseline", "lbe")

# Hidden layers (1-based) whose effective rank is recorded at every evaluation (those that exist at a given depth).
RANK_LAYERS = (1, 2, 5, 10, 50, 100, 250, 500)

# Named recipes: flags put in front of the command line's (which override them). The dataclass defaults below are
# the `frontier` recipe, so `frontier` adds nothing. docs/vanilla.md has the measurements behind each.
PRESETS: dict[str, list[str]] = {
    "frontier": [],
    "long": ["--depths", "500", "--runs", "lbe", "--learning_rate", "1e-4", "--lr_scheduler_type", "cosine",
             "--max_steps", "4000", "--eval_steps", "400", "--logging_steps", "100"],
    "depth50": ["--depths", "50", "--runs", "lbe", "--learning_rate", "1e-4", "--lr_scheduler_type", "constant",
                "--max_steps", "15000", "--eval_steps", "1500", "--logging_steps", "100"],
}


# ----------------------------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class ModelArguments:
    """The vanilla network."""

    arch: str = field(
        default="mlp",
        metadata={"help": "Architecture: 'mlp' (Linear+activation layers on flattened images) or 'cnn' (3×3 same-padded "
                  "convolutions, then one fully connected hidden layer, as in the paper).", "choices": ["mlp", "cnn"]},
    )
    depth: int | None = field(
        default=None,
        metadata={"help": "One depth only: the same as --depths N (number of hidden layers of the MLP, convolutional "
                  "layers of the CNN)."},
    )
    depths: str = field(
        default="10,30,100,500",
        metadata={"help": "Comma-separated ladder of depths (hidden layers of the MLP, convolutional layers of the "
                  "CNN). Two depths or more draw the frontier; one depth is the single-pair run."},
    )
    width: int = field(default=64, metadata={"help": "Units per hidden layer (MLP) or channels per convolution (CNN)."})
    activation: str = field(default="relu", metadata={"help": "Activation, a key of transformers ACT2FN (relu, gelu, tanh...)."})
    lbe_layers: str = field(
        default="all",
        metadata={"help": "Which hidden layers LBE regularizes: 'all' (every hidden layer's output, the library's "
                  "default for a model that returns hidden_states) or 'reference' (the paper's reference "
                  "implementation: the MLP's layers 2…depth−1, i.e. not the first and the last hidden layer; the "
                  "CNN's layers without the first convolution).", "choices": ["all", "reference"]},
    )
    ceiling: bool = field(
        default=True,
        metadata={"help": "With two depths or more, also train a shallow, well-initialized network (--ceiling_depth "
                  "hidden layers, He-normal weights, zero biases, no LBE, same recipe) once per seed: the accuracy "
                  "this data and recipe allow, drawn as the frontier's ceiling."},
    )
    ceiling_depth: int = field(default=2, metadata={"help": "Hidden layers of the ceiling network."})
    flush_denormal: bool = field(
        default=True,
        metadata={"help": "On CPU, flush subnormal floats to zero on every thread (hf_batch_entropy.denormals). Deep vanilla networks "
                  "produce subnormal activations and gradients, on which CPU arithmetic is slower (measured 1.1-2.8x for "
                  "a forward+backward of the depth-500 MLP at widths 64-256); see "
                  "docs/vanilla.md for the measurement. No effect on GPU."},
    )
    torch_threads: int = field(
        default=0,
        metadata={"help": "CPU threads for PyTorch, per worker process. 0 (auto): 1 for networks of width <= 256, whose "
                  "matrices are too small to split across threads (and a second thread stalls every step whenever "
                  "another process holds the other core: measured 2-10x slower on a shared 2-core machine), else "
                  "PyTorch's default."},
    )


@dataclass
class DataArguments:
    """The data, the seeds, which runs to do and where."""

    preset: str = field(
        default="frontier",
        metadata={"help": "A named recipe, i.e. flags put in front of the command line's own (which override them): "
                  "'frontier' (the defaults: the depth ladder, 3 seeds), 'long' (depth 500, LBE, lr 1e-4 cosine, "
                  "4,000 steps: the recipe that learns), 'depth50' (depth 50, LBE, lr 1e-4 constant, 15,000 steps). "
                  "See PRESETS in this script; the README gives the measured times.",
                  "choices": sorted(PRESETS)},
    )
    dataset: str = field(
        default="digits",
        metadata={"help": "'digits': scikit-learn's bundled 8×8 digits (1,797 images, no download). Otherwise an "
                  "image-classification dataset loaded with datasets.load_dataset: a Hub name (mnist, fashion_mnist, "
                  "cifar10, ...) or a local folder of class subfolders (imagefolder)."},
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Hub dataset configuration, if any."})
    test_size: float = field(
        default=0.2,
        metadata={"help": "Fraction held out as the test set, for digits and for datasets without a 'test' split."},
    )
    split_seed: int = field(
        default=42,
        metadata={"help": "Seed of the train/test split (stratified for digits) of the first seed; seed i uses "
                  "split_seed + i."},
    )
    num_seeds: int = field(
        default=3,
        metadata={"help": "Seeds per run: seed i trains with --seed + i (initialization, batch order) on the split "
                  "--split_seed + i. Tables and plots show the mean ± std (sample std) over them."},
    )
    workers: int = field(
        default=0,
        metadata={"help": "Processes that train independent runs side by side, one thread each (with two or more the "
                  "longest runs start first; with one, the runs go in the table's order). 0 "
                  "(auto): one per two logical CPUs when each run uses one thread on the CPU, else 1 (on a 2-vCPU "
                  "machine two workers gave no more steps per second than one, docs/vanilla.md). 1 runs everything "
                  "in this process."},
    )
    image_size: int | None = field(
        default=None,
        metadata={"help": "Resize images to this square size (default: keep the dataset's size; required for image "
                  "folders with mixed sizes)."},
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Truncate the training set (quick runs)."})
    max_test_samples: int | None = field(default=None, metadata={"help": "Truncate the test set (quick runs)."})
    runs: str = field(
        default="baseline,lbe",
        metadata={"help": "Comma-separated runs per depth and seed: 'baseline' (lbe_beta=0) and/or 'lbe' (the "
                  "--lbe_* settings)."},
    )
    entropy_batch_size: int = field(
        default=512,
        metadata={"help": "Test examples used to measure the final per-layer batch-entropies reported in the table."},
    )
    verbose: bool = field(
        default=False,
        metadata={"help": "Also print every run's Trainer log dicts, progress bar and log lines on stdout. Without it "
                  "stdout has one line per finished run, then the table; the logs are in each run's folder "
                  "(trainer_log.jsonl, run.log) either way."},
    )


@dataclass
class VanillaTrainingArguments(BatchEntropyConfig):
    """`BatchEntropyConfig` with the frontier's defaults (see docs/vanilla.md)."""

    output_dir: str | None = field(default="vanilla_output", metadata={"help": "Where results.json and the PNG go."})
    learning_rate: float = field(default=2e-3, metadata={"help": "Peak Adam learning rate (network weights and α)."})
    lr_scheduler_type: str = field(
        default="polynomial",
        metadata={"help": "Learning-rate schedule. Default: polynomial decay of power 2, lr·(1 − t)² (the power is "
                  "set when --lr_scheduler_kwargs is not given): a high rate while LBE revives the layers front to "
                  "back, then a falling one while the task is learned."},
    )
    max_steps: int = field(default=400, metadata={"help": "Optimizer steps per run (overrides num_train_epochs)."})
    optim: str = field(default="adamw_torch_fused", metadata={"help": "Optimizer (fused AdamW: about a tenth faster steps on "
                       "CPU than the per-tensor loop over the 1,002 weight tensors)."})
    per_device_train_batch_size: int = field(default=128, metadata={"help": "Training batch size (batch-entropy is "
                                             "estimated over it: keep it ≥ 16)."})
    per_device_eval_batch_size: int = field(default=512, metadata={"help": "Evaluation batch size."})
    logging_steps: float = field(default=10, metadata={"help": "Log (and record per-layer entropies) every N steps."})
    eval_strategy: str = field(default="steps", metadata={"help": "Evaluate on the test set during training."})
    eval_steps: float | None = field(default=0.1, metadata={"help": "Evaluate every N steps (< 1: fraction of the run)."})
    save_strategy: str = field(default="no", metadata={"help": "Checkpointing (off: the runs are short)."})
    report_to: None | str | list[str] = field(default="none", metadata={"help": "Logging integrations."})
    dataloader_pin_memory: bool = field(default=False, metadata={"help": "Pin memory in data loaders (GPU only)."})
    dataloader_drop_last: bool = field(default=True, metadata={"help": "Drop the last incomplete batch (a batch of "
                                       "one example has no batch-entropy)."})
    lbe_beta: float = field(default=0.5, metadata={"help": "Weight β of the LBE term of the 'lbe' run (the baseline "
                            "uses 0)."})
    lbe_alpha: float = field(default=2.0, metadata={"help": "Initial entropy target α₀ of every layer (nats)."})
    lbe_alpha_min: float = field(default=0.2, metadata={"help": "Floor of the entropy targets (nats)."})
    lbe_log_per_layer: bool = field(default=True, metadata={"help": "Log every layer's batch-entropy (needed for "
                                    "the picture)."})


# ----------------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------------


class ImageTensorDataset(Dataset):
    """Images `(N, C, S, S)` (uint8 or float) and labels `(N,)`; normalized on access: `(x − mean_c) / std_c`."""

    # Sets up to this size (bytes as float32) are normalized once, up front, instead of at every access (~1 ms per
    # training batch of 128 digits); same values (elementwise float32 operations either way).
    PRECOMPUTE_BYTES = 256 * 2**20

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean: torch.Tensor, std: torch.Tensor):
        self.images, self.labels = images, labels
        self.mean, self.std = mean.view(-1, 1, 1), std.view(-1, 1, 1)
        self.normalized = None
        if images.numel() * 4 <= self.PRECOMPUTE_BYTES:
            self.normalized = (images.float() - self.mean) / self.std

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if self.normalized is not None:
            return {"pixel_values": self.normalized[i], "labels": self.labels[i]}
        x = (self.images[i].float() - self.mean) / self.std
        return {"pixel_values": x, "labels": self.labels[i]}


def _normalized_split(train_x, train_y, test_x, test_y) -> tuple[ImageTensorDataset, ImageTensorDataset]:
    # Per-channel statistics of the training set only, so the test set does not leak into the preprocessing.
    xf = train_x.float()
    mean = xf.mean(dim=(0, 2, 3))
    std = xf.std(dim=(0, 2, 3)).clamp_min(1e-6)
    return ImageTensorDataset(train_x, train_y, mean, std), ImageTensorDataset(test_x, test_y, mean, std)


def load_digits_split(test_size: float, seed: int) -> tuple[ImageTensorDataset, ImageTensorDataset, int]:
    """scikit-learn's 8×8 digits (values 0…16), a fixed stratified train/test split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32).view(-1, 1, 8, 8)
    y = torch.tensor(y, dtype=torch.long)
    idx_train, idx_test = train_test_split(np.arange(len(y)), test_size=test_size, random_state=seed, stratify=y.numpy())
    train, test = _normalized_split(x[idx_train], y[idx_train], x[idx_test], y[idx_test])
    return train, test, 10


def load_image_dataset(args: DataArguments, cache_dir: str | None = None):
    """An image-classification set through `datasets`: a Hub name or a local image folder → uint8 tensors."""
    import datasets

    if os.path.isdir(args.dataset):
        ds = datasets.load_dataset("imagefolder", data_dir=args.dataset, cache_dir=cache_dir)
    else:
        ds = datasets.load_dataset(args.dataset, args.dataset_config_name, cache_dir=cache_dir)
    if "train" not in ds:
        raise ValueError(f"Dataset {args.dataset!r} has no 'train' split (splits: {list(ds)}).")
    train = ds["train"]
    image_col = next((c for c, f in train.features.items() if isinstance(f, datasets.Image)), None)
    label_col = next((c for c, f in train.features.items() if isinstance(f, datasets.ClassLabel)), None)
    label_col = label_col or next((c for c in ("label", "labels", "fine_label") if c in train.column_names), None)
    if image_col is None or label_col is None:
        raise ValueError(
            f"Dataset {args.dataset!r} needs an Image column and a class-label column; it has {train.features}."
        )
    if "test" in ds:
        test = ds["test"]
    else:
        split = train.train_test_split(test_size=args.test_size, seed=args.split_seed, stratify_by_column=label_col
                                       if isinstance(train.features[label_col], datasets.ClassLabel) else None)
        train, test = split["train"], split["test"]
    if args.max_train_samples:
        train = train.select(range(min(args.max_train_samples, len(train))))
    if args.max_test_samples:
        test = test.select(range(min(args.max_test_samples, len(test))))
    first = train[0][image_col]
    mode = "L" if first.mode in ("L", "1", "I", "I;16", "F") else "RGB"
    size = args.image_size or first.size[0]
    if args.image_size is None and first.size[0] != first.size[1]:
        raise ValueError(f"Images are {first.size[0]}×{first.size[1]}; pass --image_size to resize them to a square.")

    def to_tensor(split) -> tuple[torch.Tensor, torch.Tensor]:
        images = []
        for img in split[image_col]:
            img = img.convert(mode)
            if img.size != (size, size):
                img = img.resize((size, size))
            arr = np.asarray(img, dtype=np.uint8)
            images.append(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1))
        return torch.from_numpy(np.stack(images)), torch.tensor(split[label_col], dtype=torch.long)

    train_x, train_y = to_tensor(train)
    test_x, test_y = to_tensor(test)
    feature = train.features[label_col]
    num_labels = feature.num_classes if isinstance(feature, datasets.ClassLabel) else int(train_y.max()) + 1
    train_ds, test_ds = _normalized_split(train_x, train_y, test_x, test_y)
    return train_ds, test_ds, num_labels


def load_data(args: DataArguments, cache_dir: str | None = None):
    if args.dataset == "digits":
        train, test, num_labels = load_digits_split(args.test_size, args.split_seed)
        if args.max_train_samples:
            train = torch.utils.data.Subset(train, range(min(args.max_train_samples, len(train))))
        if args.max_test_samples:
            test = torch.utils.data.Subset(test, range(min(args.max_test_samples, len(test))))
        return train, test, num_labels
    return load_image_dataset(args, cache_dir)


# ----------------------------------------------------------------------------------------------------------------------
# Recording and reporting
# ----------------------------------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------------------------------
# Recording
# ----------------------------------------------------------------------------------------------------------------------


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


def scheduler_name(args) -> str:
    """`"linear"`, `"cosine"`, ...: TrainingArguments turns the flag into a `SchedulerType` enum after parsing."""
    return getattr(args.lr_scheduler_type, "value", str(args.lr_scheduler_type))


def compute_accuracy(eval_pred) -> dict[str, float]:
    logits, labels = eval_pred
    logits = logits[0] if isinstance(logits, tuple) else logits
    return {"accuracy": float((np.asarray(logits).argmax(-1) == np.asarray(labels)).mean())}


# ----------------------------------------------------------------------------------------------------------------------
# Provenance
# ----------------------------------------------------------------------------------------------------------------------


def provenance(argv: list[str], expanded: list[str]) -> dict:
    """What produced a results.json (`hf_batch_entropy.provenance`: the command line as typed, the commit and whether
    tracked files differed from it, the library versions, the machine), plus the command line with the preset's flags
    expanded (`argv`)."""
    script = os.path.relpath(os.path.abspath(__file__), REPO)
    return {**record_provenance([script, *argv], packages=["scikit-learn"], repo=REPO), "argv": expanded}


# ----------------------------------------------------------------------------------------------------------------------
# One run
# ----------------------------------------------------------------------------------------------------------------------


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


class UsageError(ValueError):
    """Bad command-line input: `main` prints it as one line and exits with status 2, as argparse does."""


class OneLineParser(HfArgumentParser):
    """HfArgumentParser whose errors are one line (argparse prints the whole usage first: 135 lines here)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (--help lists every flag)\n")


def parse_arguments(argv: list[str]) -> tuple[ModelArguments, DataArguments, VanillaTrainingArguments]:
    """The three argument dataclasses from a command line whose preset flags are already expanded. A closed choice
    argparse cannot express (a comma-separated list, a path) raises `UsageError` (`check_arguments`)."""
    parser = OneLineParser((ModelArguments, DataArguments, VanillaTrainingArguments), prog="train_vanilla.py")
    try:
        model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    except ValueError as err:  # TrainingArguments.__post_init__ checks combinations of flags
        raise UsageError(str(err)) from err
    if model_args.depth is not None:
        model_args.depths = str(model_args.depth)
    if scheduler_name(training_args) == "polynomial" and not training_args.lr_scheduler_kwargs:
        training_args.lr_scheduler_kwargs = {"power": 2.0}  # the earlier default, lr·(1 − t)²
    check_arguments(model_args, data_args, training_args)
    return model_args, data_args, training_args


def parse_depths(depths: str) -> list[int]:
    try:
        values = sorted({int(d) for d in depths.split(",") if d.strip()})
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise UsageError(f"argument --depths: expected comma-separated integers >= 1, got {depths!r}")
    return values


def parse_runs(runs: str) -> list[str]:
    values = [r.strip() for r in runs.split(",") if r.strip()]
    bad = [r for r in values if r not in RUNS]
    if not values or bad:
        raise UsageError(f"argument --runs: invalid choice: {(bad or [runs])[0]!r} (choose from "
                         f"{', '.join(repr(r) for r in RUNS)}, comma-separated)")
    return values


def looks_like_path(name: str) -> bool:
    """A `--dataset` value that can only be a local folder: a Hub id is `name` or `owner/name`, never absolute, never
    starting with '.' or '~', never with two slashes or a backslash."""
    return (os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1 or "\\" in name
            or (os.sep != "/" and os.sep in name))


def check_arguments(model_args: ModelArguments, data_args: DataArguments, training_args) -> None:
    """Every closed choice and range of the command line, before anything loads; raises `UsageError` (one line)."""
    parse_depths(model_args.depths)
    runs = parse_runs(data_args.runs)
    if model_args.activation not in ACT2FN:
        raise UsageError(f"argument --activation: invalid choice: {model_args.activation!r} (choose from "
                         f"{', '.join(sorted(ACT2FN))})")
    for flag, value, low in (("--num_seeds", data_args.num_seeds, 1), ("--width", model_args.width, 1),
                             ("--ceiling_depth", model_args.ceiling_depth, 1), ("--workers", data_args.workers, 0),
                             ("--torch_threads", model_args.torch_threads, 0),
                             ("--entropy_batch_size", data_args.entropy_batch_size, 2),
                             ("--per_device_train_batch_size", training_args.per_device_train_batch_size, 2)):
        if value < low:
            why = " (batch-entropy is a statistic over the batch)" if "batch" in flag else ""
            raise UsageError(f"argument {flag}: must be >= {low}, got {value}{why}")
    if not 0 < data_args.test_size < 1:
        raise UsageError(f"argument --test_size: must lie between 0 and 1, got {data_args.test_size}")
    if model_args.lbe_layers == "reference" and training_args.lbe_target_modules is not None:
        raise UsageError("--lbe_layers reference and --lbe_target_modules both choose the layers: give one")
    if (model_args.lbe_layers == "reference" and model_args.arch == "mlp" and "lbe" in runs
            and min(parse_depths(model_args.depths)) < 3):
        raise UsageError("argument --lbe_layers: 'reference' leaves no MLP layer to regularize below depth 3")
    dataset = data_args.dataset
    if dataset != "digits" and not os.path.isdir(dataset):
        if os.path.exists(dataset):
            raise UsageError(f"argument --dataset: {dataset} is a file; give a folder of class subfolders, "
                             "'digits' or a Hub dataset name")
        if looks_like_path(dataset):
            raise UsageError(f"argument --dataset: no such folder: {dataset} (give a folder of class subfolders, "
                             "'digits' or a Hub dataset name)")


def expand_preset(argv: list[str]) -> list[str]:
    """`--preset NAME` (or `--preset=NAME`) → the preset's flags, then the command line (whose flags win)."""
    name = "frontier"
    for i, arg in enumerate(argv):
        if arg == "--preset" and i + 1 < len(argv):
            name = argv[i + 1]
        elif arg.startswith("--preset="):
            name = arg.split("=", 1)[1]
    if name not in PRESETS:
        raise UsageError(f"argument --preset: invalid choice: {name!r} (choose from "
                         f"{', '.join(repr(p) for p in sorted(PRESETS))})")
    return PRESETS[name] + list(argv)


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
        # Deep vanilla networks produce subnormal floats, on which CPU arithmetic is slower (1.1-2.8x, docs/vanilla.md).
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
    model = build_vanilla_model(model_args.arch, job.depth, model_args.width, num_channels=channels, image_size=size,
                                num_labels=num_labels, activation=model_args.activation)
    if job.kind == "ceiling":
        he_initialize(model)
    # Fingerprint of the initial weights: equal for the baseline and the LBE run of a depth and seed.
    init_checksum = float(sum(p.detach().double().abs().sum() for p in model.parameters()))
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
        "activation": model_args.activation, "dataset": data_args.dataset,
        "init": "he_normal" if job.kind == "ceiling" else "pytorch_default",
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


def _worker_init(threads: int, verbose: bool = False) -> None:
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


# ----------------------------------------------------------------------------------------------------------------------
# Summary, table, pictures
# ----------------------------------------------------------------------------------------------------------------------


def summarize(results: list[dict]) -> list[dict]:
    """Per run kind and depth: test accuracy mean and sample std over the seeds (std 0 for one seed), per-seed values,
    alive layers and wall time (means)."""
    groups: dict[tuple[str, int], list[dict]] = {}
    for r in results:
        groups.setdefault((r["run"], r["depth"]), []).append(r)
    order = {"ceiling": 0, "baseline": 1, "lbe": 2}
    summary = []
    for (kind, depth), runs in sorted(groups.items(), key=lambda kv: (kv[0][1], order.get(kv[0][0], 3))):
        acc = np.array([r["test_accuracy"] for r in sorted(runs, key=lambda r: r["seed_index"])])
        summary.append({
            "run": kind, "depth": depth, "seeds": len(runs),
            "test_accuracy_mean": float(acc.mean()), "test_accuracy_std": float(acc.std(ddof=1)) if len(acc) > 1 else 0.0,
            "test_accuracy_per_seed": acc.tolist(),
            "alive_layers_mean": float(np.mean([r["alive_layers"] for r in runs])), "num_layers": runs[0]["num_layers"],
            "wall_time_s_mean": float(np.mean([r["wall_time_s"] for r in runs])),
        })
    return summary


def _pct(mean: float, std: float, n: int) -> str:
    return f"{100 * mean:.1f}%" + (f" ± {100 * std:.1f}" if n > 1 else "")


def format_frontier_table(summary: list[dict]) -> str:
    """depth | ceiling / baseline / LBE accuracy (mean ± std over seeds) | alive layers | seconds per run."""
    kinds = [k for k in ("ceiling", "baseline", "lbe") if any(s["run"] == k for s in summary)]
    header = ["run", "depth", "seeds", "test accuracy", "alive layers (end)", "wall time / run"]
    cells = [header]
    for s in sorted(summary, key=lambda s: (kinds.index(s["run"]), s["depth"])):
        cells.append([s["run"], str(s["depth"]), str(s["seeds"]),
                      _pct(s["test_accuracy_mean"], s["test_accuracy_std"], s["seeds"]),
                      f"{s['alive_layers_mean']:.0f}/{s['num_layers']}", f"{s['wall_time_s_mean']:.0f} s"])
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in cells]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def interpret(summary: list[dict], steps: int | None = None) -> str:
    """One or two sentences on what the frontier shows, written from the numbers: where the baseline falls to chance
    (< 15% on ten classes), how deep LBE still learns, a depth where neither learns, and the ceiling."""
    by = {(s["run"], s["depth"]): s for s in summary}
    depths = sorted({s["depth"] for s in summary if s["run"] != "ceiling"})
    chance = 0.15
    budget = f"{steps} steps" if steps else "this budget"

    def acc(s: dict) -> str:
        return _pct(s["test_accuracy_mean"], s["test_accuracy_std"], s["seeds"])

    first = []
    dead = [d for d in depths if ("baseline", d) in by and by[("baseline", d)]["test_accuracy_mean"] < chance]
    if dead:
        first.append(f"Without LBE the network stays at chance (< {100 * chance:.0f}%) from depth {dead[0]} on")
    elif any(("baseline", d) in by for d in depths):
        first.append(f"Without LBE every depth up to {max(d for d in depths if ('baseline', d) in by)} learns")
    learns = [d for d in depths if ("lbe", d) in by and by[("lbe", d)]["test_accuracy_mean"] >= chance]
    rescued = [d for d in learns if d in dead]
    if rescued:
        first.append(f"with LBE it learns up to depth {rescued[-1]} ({acc(by[('lbe', rescued[-1])])})")
    elif learns:
        first.append(f"with LBE it learns up to depth {learns[-1]} ({acc(by[('lbe', learns[-1])])})")
    stuck = [d for d in dead if ("lbe", d) in by and by[("lbe", d)]["test_accuracy_mean"] < chance]
    sentence = "; ".join(first)
    if stuck:
        s = by[("lbe", stuck[-1])]
        sentence += (f", but at depth {stuck[-1]} neither learns within {budget} (LBE has revived "
                     f"{s['alive_layers_mean']:.0f} of its {s['num_layers']} layers by then)")
    sentence = (sentence + ".") if sentence else ""
    shallow = next((d for d in depths if ("baseline", d) in by and ("lbe", d) in by
                    and by[("baseline", d)]["test_accuracy_mean"] >= chance), None)
    if shallow is not None:
        sentence += " " + compare_at_depth(by[("baseline", shallow)], by[("lbe", shallow)])
    ceiling = next((s for s in summary if s["run"] == "ceiling"), None)
    if ceiling is not None:
        sentence += (f" A well-initialized {ceiling['depth']}-layer network reaches {acc(ceiling)} with the same "
                     f"recipe: the distance to it is what {budget} leave the deep networks.")
    return sentence.strip()


def compare_at_depth(baseline: dict, lbe: dict) -> str:
    """LBE against the baseline at a depth where the baseline learns (the frontier's depth 10): the difference of
    the means, judged against twice its standard error over the seeds (sqrt(s_b²/n_b + s_l²/n_l))."""
    depth, n = baseline["depth"], min(baseline["seeds"], lbe["seeds"])
    diff = 100 * (lbe["test_accuracy_mean"] - baseline["test_accuracy_mean"])
    text = (f"At depth {depth}, where the network learns without it, LBE gives "
            f"{_pct(lbe['test_accuracy_mean'], lbe['test_accuracy_std'], lbe['seeds'])} against "
            f"{_pct(baseline['test_accuracy_mean'], baseline['test_accuracy_std'], baseline['seeds'])} without: "
            f"{abs(diff):.1f} points {'lower' if diff < 0 else 'higher'}")
    if n < 2:
        return text + " (one seed: no spread to judge the difference by)."
    se2 = 2 * 100 * math.sqrt(baseline["test_accuracy_std"] ** 2 / baseline["seeds"]
                              + lbe["test_accuracy_std"] ** 2 / lbe["seeds"])
    if abs(diff) <= se2:
        return (text + f", within twice the standard error of the difference over {n} seeds ({se2:.1f} points): "
                "no clear difference.")
    return (text + f", more than twice the standard error of the difference over {n} seeds ({se2:.1f} points): "
            f"LBE {'costs' if diff < 0 else 'adds'} accuracy at this depth.")


def run_title(run: dict) -> str:
    """A picture panel's title: what the run is (kind, β, depth), then its test accuracy and seed."""
    kind = {"baseline": "without LBE (β = 0)", "lbe": f"with LBE (β = {run['lbe_beta']:g})",
            "ceiling": "ceiling: He init, no LBE"}.get(run["run"], run["run"])
    return f"{kind}, depth {run['depth']}\ntest accuracy {100 * run['test_accuracy']:.1f} % (seed {run['seed_index']})"


def _heatmap_panels(fig, axes, records: list[tuple[str, dict]]) -> None:
    """Per-layer batch-entropy (colour, log scale) of every layer (y) over training steps (x), one axis per
    `(title, record)`."""
    from matplotlib.colors import LogNorm
    from matplotlib.ticker import MaxNLocator

    values = np.concatenate([np.asarray(rec["entropies"]).ravel() for _, rec in records])
    positive = values[values > 0]
    vmax = float(positive.max()) if positive.size else 1.0
    # Down to the "dead" threshold: a nearly dead network's few alive layers (1e-1 … 1e-12) still get colours.
    vmin = max(float(positive.min()) if positive.size else DEAD_ENTROPY, DEAD_ENTROPY, vmax * 1e-16)
    image = None
    for ax, (title, rec) in zip(axes, records):
        grid = np.clip(np.asarray(rec["entropies"]).T, vmin, None)  # (layers, logged steps)
        steps = rec["steps"]
        first = steps[0] - (steps[1] - steps[0] if len(steps) > 1 else steps[0])
        image = ax.imshow(grid, aspect="auto", origin="lower", cmap="viridis", norm=LogNorm(vmin=vmin, vmax=vmax),
                          interpolation="nearest", extent=(first, steps[-1], 0.5, grid.shape[0] + 0.5))
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("training step")
        ax.set_ylabel("layer measured by LBE (input → output)")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    fig.colorbar(image, ax=list(axes), label="batch-entropy (nats per unit, log scale)")


def plot_entropy_heatmaps(results: list[dict], records: dict[str, dict], path: str) -> bool:
    """One panel per run of the first seed: batch-entropy (log colour) of every layer over training steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [r for r in results if records[r["name"]]["entropies"] and r["seed_index"] == 0]
    if not panels:
        logger.warning("No per-layer entropies were logged (lbe_log_per_layer off, or fewer steps than logging_steps): no picture.")
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 5.0), squeeze=False, constrained_layout=True)
    _heatmap_panels(fig, axes[0], [(run_title(r), records[r["name"]]) for r in panels])
    fig.suptitle(f"{panels[0]['model']}\nper-layer batch-entropy over training", fontsize=11)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_frontier(summary: list[dict], results: list[dict], records: dict[str, dict], path: str) -> None:
    """Left: test accuracy against depth (log x), baseline and LBE, mean ± std over seeds, the ceiling as a band.
    Right: per-layer batch-entropy over training of the deepest baseline/LBE pair of the first seed (log colours)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    deepest = max(s["depth"] for s in summary if s["run"] != "ceiling")
    pair = [r for r in results if r["depth"] == deepest and r["seed_index"] == 0 and r["run"] in RUNS
            and records[r["name"]]["entropies"]]
    fig = plt.figure(figsize=(6 + 5 * len(pair), 5.6), constrained_layout=True)
    grid = fig.add_gridspec(1, 1 + len(pair), width_ratios=[1.2] + [1] * len(pair))
    ax = fig.add_subplot(grid[0, 0])
    styles = {"baseline": dict(color="tab:gray", marker="o", label="without LBE (β = 0)"),
              "lbe": dict(color="tab:blue", marker="s", label="with LBE")}
    for kind, style in styles.items():
        rows = sorted((s for s in summary if s["run"] == kind), key=lambda s: s["depth"])
        if rows:
            ax.errorbar([s["depth"] for s in rows], [100 * s["test_accuracy_mean"] for s in rows],
                        yerr=[100 * s["test_accuracy_std"] for s in rows], capsize=4, **style)
    ceiling = next((s for s in summary if s["run"] == "ceiling"), None)
    if ceiling is not None:
        mean, std = 100 * ceiling["test_accuracy_mean"], 100 * ceiling["test_accuracy_std"]
        ax.axhline(mean, color="tab:green", ls="--", label=f"ceiling: {ceiling['depth']} layers, He init ({mean:.1f}%)")
        ax.axhspan(mean - std, mean + std, color="tab:green", alpha=0.15)
    ax.axhline(10, color="k", ls=":", lw=1, label="chance (10%)")
    ax.set_xscale("log")
    depths = sorted({s["depth"] for s in summary if s["run"] != "ceiling"})
    from matplotlib.ticker import NullFormatter

    ax.set_xticks(depths)
    ax.set_xticklabels([str(d) for d in depths])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_ylim(0, 100)
    ax.set_xlabel("depth (hidden layers, log scale)")
    ax.set_ylabel("test accuracy (%)")
    seeds = max(s["seeds"] for s in summary)
    ax.set_title(f"trainability frontier ({seeds} seed{'s' if seeds > 1 else ''}"
                 f"{', mean ± std' if seeds > 1 else ''})", fontsize=10)
    # Below the axes, off the curves (inside, any corner covers a curve or the ceiling band for some ladder).
    handles, labels = ax.get_legend_handles_labels()
    order = sorted(range(len(labels)), key=lambda i: ("LBE" not in labels[i], i))  # the two curves first
    ax.legend([handles[i] for i in order], [labels[i] for i in order], fontsize=8, loc="upper center",
              bbox_to_anchor=(0.5, -0.13), ncol=2, frameon=False)
    if pair:
        axes = [fig.add_subplot(grid[0, 1 + i]) for i in range(len(pair))]
        _heatmap_panels(fig, axes, [(run_title(r), records[r["name"]]) for r in pair])
    first = results[0]
    model = first["model"].replace(f"depth {first['depth']} ", "")
    fig.suptitle(f"{model}: {first['steps']} steps, lr {first['learning_rate']:g} {first['lr_scheduler_type']}",
                 fontsize=11)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def format_table(results: list[dict]) -> str:
    """The runs side by side (the single-depth report)."""
    rows = [
        ("run", lambda r: r["run"]),
        ("seed", lambda r: str(r["seed_index"])),
        ("lbe_beta", lambda r: f"{r['lbe_beta']:g}"),
        ("test accuracy", lambda r: f"{100 * r['test_accuracy']:.1f}%"),
        ("test task loss", lambda r: f"{r['test_loss']:.4f}"),
        ("train task loss (last log)", lambda r: "-" if r["train_task_loss"] is None else f"{r['train_task_loss']:.4f}"),
        ("entropy min (end)", lambda r: f"{r['entropy_min']:.4g}"),
        ("entropy mean (end)", lambda r: f"{r['entropy_mean']:.4g}"),
        (f"alive layers (H > {DEAD_ENTROPY:g})", lambda r: f"{r['alive_layers']}/{r['num_layers']}"),
        ("effective rank L1/L5/L10", lambda r: " / ".join(f"{r['effective_rank_end'][k]:.2f}" for k in ("1", "5", "10")
                                                          if k in r["effective_rank_end"])),
        ("steps", lambda r: str(r["steps"])),
        ("wall time", lambda r: f"{r['wall_time_s']:.1f} s"),
    ]
    cells = [[name] + [fmt(r) for r in results] for name, fmt in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in cells]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------------------


def plan_jobs(model_args: ModelArguments, data_args: DataArguments, workers: int = 1) -> list[Job]:
    """Every run, in the order they start.

    One worker: the table's order (the ceiling, then depth by depth, each seed's baseline and LBE run together). The
    order cannot change the total time of one process running everything in turn, and this one gives the first
    results in seconds. Several workers: longest first (deepest, LBE before baseline; the longest-processing-time
    rule), because the total time is then set by the last run to finish: a depth-500 run started last would keep one
    worker busy for minutes while the others sit idle (on the frontier a depth-500 run takes ~15 times a depth-10
    one). The progress lines (run k of N, time left) make either order readable.
    """
    depths = parse_depths(model_args.depths)
    runs = parse_runs(data_args.runs)
    jobs = [Job(kind, depth, i) for depth in depths for i in range(data_args.num_seeds) for kind in runs]
    if model_args.ceiling and len(depths) > 1:
        jobs = [Job("ceiling", model_args.ceiling_depth, i) for i in range(data_args.num_seeds)] + jobs
    if workers > 1:
        jobs = sorted(jobs, key=lambda j: (-j.depth, j.kind != "lbe", j.seed_index))
    return jobs


def usage_error(message: str) -> None:
    """Exit as argparse does on bad input: one line on stderr, status 2."""
    sys.stderr.write(f"train_vanilla.py: error: {message} (--help lists every flag)\n")
    raise SystemExit(2)


# Relative cost of a run, for the time-left estimate only: in the documented frontier a run took about 5 s plus 0.19 s
# per hidden layer (docs/results/vanilla_frontier_quiet.json), i.e. a fixed part worth ~25 layers.
def run_cost(job: Job) -> float:
    return job.depth + 25.0


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


class Progress:
    """The one line printed per finished run: run k of N, kind, depth, seed, test accuracy, seconds, and the time
    left for the job, estimated from the seconds per unit of `run_cost` of the runs done so far."""

    def __init__(self, jobs: list[Job], workers: int):
        self.total, self.workers = len(jobs), workers
        self.cost_left = sum(run_cost(j) for j in jobs)
        self.cost_done, self.seconds_done, self.done = 0.0, 0.0, 0
        self.start = time.perf_counter()

    def line(self, job: Job, result: dict) -> str:
        self.done += 1
        self.cost_left -= run_cost(job)
        self.cost_done += run_cost(job)
        self.seconds_done += result["wall_time_s"]
        width = len(str(self.total))
        head = (f"run {self.done:>{width}}/{self.total}  {job.kind:<8}  depth {job.depth:<4} seed {job.seed_index}  "
                f"test accuracy {100 * result['test_accuracy']:5.1f}%  {result['wall_time_s']:5.0f} s")
        if self.done == self.total:
            return f"{head}  (all done in {_duration(time.perf_counter() - self.start)})"
        left = self.seconds_done / self.cost_done * self.cost_left / self.workers
        return f"{head}  (about {_duration(left)} left)"


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) == 1 and argv[0].endswith(".json"):
        with open(argv[0]) as f:
            argv = [x for k, v in json.load(f).items() for x in (f"--{k}", v if isinstance(v, str) else json.dumps(v))]
    try:  # every check of the command line, before anything loads
        expanded = expand_preset(argv)
        model_args, data_args, training_args = parse_arguments(expanded)
    except UsageError as err:
        usage_error(str(err))

    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%H:%M:%S",
                        level=logging.INFO, handlers=[logging.StreamHandler(sys.stdout)], force=True)
    transformers.utils.logging.set_verbosity_warning()
    meta = provenance(argv, expanded)

    cpu = training_args.device.type == "cpu"
    threads = resolve_threads(model_args) if cpu else None
    # Auto: one worker per two logical CPUs. On the project's 2-vCPU machine two single-thread depth-500 runs side by
    # side took 275 ms per step each against 125-137 ms alone: no more steps per second than one (docs/vanilla.md).
    workers = data_args.workers or (max(1, (os.cpu_count() or 1) // 2) if cpu and threads == 1 else 1)
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
                                                    initargs=(threads or 1, data_args.verbose)) as pool:
            futures = {pool.submit(run_job, job, expanded, True): job for job in jobs}
            for future in concurrent.futures.as_completed(futures):
                finished(futures[future], *future.result())
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


if __name__ == "__main__":
    main()
    if torch.distributed.is_initialized():  # several processes: end cleanly (DeepSpeed ZeRO-3 aborts otherwise)
        torch.distributed.destroy_process_group()
