#!/usr/bin/env python
# coding=utf-8
r"""Train a vanilla deep network (no skip connections, no normalization, no dropout) with and without layerwise
batch-entropy regularization (LBE), the headline experiment of Peer et al., TMLR 2022.

The same network, from the same initialization, is trained twice through `BatchEntropyTrainer`:

- `baseline`: `lbe_beta = 0`, i.e. plain cross-entropy (the trainer still measures and logs the batch-entropies);
- `lbe`:      L = L_task + β·mean_l((H_l − max(α_min, |α_l|))²)·L_task.

It prints a side-by-side table (test accuracy, task loss, per-layer batch-entropy min/mean at the end, wall time) and
writes into `--output_dir`:

- `results.json`: one entry per run (settings, final metrics, per-layer entropies at the end, evaluation curve);
- `batch_entropy.png`: per-layer batch-entropy over training, layer × step, one panel per run: the picture in which
  information flow returns layer by layer under LBE and stays at 0 without it.

Default: a ReLU MLP of depth 500 and width 64 on scikit-learn's bundled 8×8 digits (no download), which runs on two
CPU cores in a few minutes. Examples:

    python scripts/train_vanilla.py                                  # the headline run (digits, depth 500)
    python scripts/train_vanilla.py --arch cnn --depth 100 --width 8 --output_dir vanilla_cnn
    python scripts/train_vanilla.py --dataset mnist --depth 500 --width 1000 ...   # the paper's setting, on a GPU
    python scripts/train_vanilla.py --help                           # every flag, explained

Every `BatchEntropyConfig` / `TrainingArguments` flag is accepted (`--learning_rate`, `--max_steps`,
`--num_train_epochs`, `--lbe_beta`, `--lbe_alpha`, ...); the defaults below are the tuned ones (see docs/vanilla.md).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import transformers
from torch.utils.data import Dataset
from transformers import HfArgumentParser, PrinterCallback, ProgressCallback, TrainerCallback, set_seed

from hf_batch_entropy import BatchEntropyConfig, BatchEntropyTrainer, batch_entropies
from hf_batch_entropy.denormals import FlushDenormalsCallback, flush_denormals
from hf_batch_entropy.diagnosis import DEFAULT_THRESHOLD
from hf_batch_entropy.models import build_vanilla_model

logger = logging.getLogger("train_vanilla")

# A layer whose batch-entropy is below this (nats per unit) is counted as "dead" in the table and the logs: its
# activations are numerically the same for every example of the batch. Same threshold as `hf_batch_entropy.diagnose`.
DEAD_ENTROPY = DEFAULT_THRESHOLD

RUNS = ("baseline", "lbe")

DEFAULT_SCHEDULER_KWARGS = {"power": 2.0}


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
    depth: int = field(default=500, metadata={"help": "Number of hidden layers (MLP) or convolutional layers (CNN)."})
    width: int = field(default=64, metadata={"help": "Units per hidden layer (MLP) or channels per convolution (CNN)."})
    activation: str = field(default="relu", metadata={"help": "Activation, a key of transformers ACT2FN (relu, gelu, tanh...)."})
    flush_denormal: bool = field(
        default=True,
        metadata={"help": "On CPU, flush subnormal floats to zero on every thread (hf_batch_entropy.denormals). Deep vanilla networks "
                  "produce subnormal activations and gradients, on which CPU arithmetic is slower (measured 1.1-2.8x for "
                  "a forward+backward of the depth-500 MLP at widths 64-256); see "
                  "docs/vanilla.md for the measurement. No effect on GPU."},
    )
    torch_threads: int = field(
        default=0,
        metadata={"help": "CPU threads for PyTorch. 0 (auto): 1 for networks of width <= 256, whose matrices are too "
                  "small to split across threads (and a second thread stalls every step whenever another process "
                  "holds the other core: measured 2-10x slower on a shared 2-core machine), else PyTorch's default."},
    )


@dataclass
class DataArguments:
    """The data and which runs to do."""

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
    split_seed: int = field(default=42, metadata={"help": "Seed of the fixed train/test split (stratified for digits)."})
    image_size: int | None = field(
        default=None,
        metadata={"help": "Resize images to this square size (default: keep the dataset's size; required for image "
                  "folders with mixed sizes)."},
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Truncate the training set (quick runs)."})
    max_test_samples: int | None = field(default=None, metadata={"help": "Truncate the test set (quick runs)."})
    runs: str = field(
        default="baseline,lbe",
        metadata={"help": "Comma-separated runs to do: 'baseline' (lbe_beta=0) and/or 'lbe' (the --lbe_* settings)."},
    )
    entropy_batch_size: int = field(
        default=512,
        metadata={"help": "Test examples used to measure the final per-layer batch-entropies reported in the table."},
    )


@dataclass
class VanillaTrainingArguments(BatchEntropyConfig):
    """`BatchEntropyConfig` with defaults tuned for the depth-500 digits run (see docs/vanilla.md)."""

    output_dir: str | None = field(default="vanilla_output", metadata={"help": "Where results.json and the PNG go."})
    learning_rate: float = field(default=2e-3, metadata={"help": "Peak Adam learning rate (network weights and α)."})
    lr_scheduler_type: str = field(
        default="polynomial",
        metadata={"help": "Learning-rate schedule. Default: polynomial decay of power 2, lr·(1 − t)², i.e. a high rate "
                  "while LBE revives the layers front to back, then a falling one while the task is learned."},
    )
    lr_scheduler_kwargs: dict | str | None = field(
        default_factory=lambda: dict(DEFAULT_SCHEDULER_KWARGS),
        metadata={"help": "Extra scheduler arguments (JSON). The default {\"power\": 2.0} applies to the polynomial "
                  "schedule only and is dropped for other --lr_scheduler_type values."},
    )
    max_steps: int = field(default=1500, metadata={"help": "Optimizer steps per run (overrides num_train_epochs)."})
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

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean: torch.Tensor, std: torch.Tensor):
        self.images, self.labels = images, labels
        self.mean, self.std = mean.view(-1, 1, 1), std.view(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
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


class EntropyRecorder(TrainerCallback):
    """Keeps the per-layer batch-entropies the trainer logs (`batch_entropy/layer_<i>`, window-averaged) per step."""

    def __init__(self):
        self.steps: list[int] = []
        self.entropies: list[list[float]] = []
        self.evals: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        layers = sorted(
            (int(k.rsplit("_", 1)[1]), v) for k, v in logs.items() if k.startswith("batch_entropy/layer_")
        )
        if layers:
            self.steps.append(state.global_step)
            self.entropies.append([v for _, v in layers])
        if "eval_accuracy" in logs:
            entry = {"step": state.global_step, "accuracy": logs["eval_accuracy"], "loss": logs.get("eval_loss")}
            if self.evals and self.evals[-1]["step"] == entry["step"]:
                self.evals[-1] = entry  # the final evaluate() of the same weights as the last in-training one
            else:
                self.evals.append(entry)


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


def scheduler_name(args) -> str:
    """`"linear"`, `"polynomial"`, ...: TrainingArguments turns the flag into a `SchedulerType` enum after parsing."""
    return getattr(args.lr_scheduler_type, "value", str(args.lr_scheduler_type))


def compute_accuracy(eval_pred) -> dict[str, float]:
    logits, labels = eval_pred
    logits = logits[0] if isinstance(logits, tuple) else logits
    return {"accuracy": float((np.asarray(logits).argmax(-1) == np.asarray(labels)).mean())}


@torch.no_grad()
def final_entropies(model, dataset, batch_size: int, device: torch.device) -> list[float]:
    """Per-layer batch-entropy of the trained model over one batch of (up to `batch_size`) test examples."""
    n = min(batch_size, len(dataset))
    batch = torch.stack([dataset[i]["pixel_values"] for i in range(n)]).to(device)
    was_training = model.training
    model.eval()
    hidden = model(pixel_values=batch, output_hidden_states=True).hidden_states
    model.train(was_training)
    return batch_entropies(list(hidden)).tolist()


def plot_entropy_heatmaps(results: list[dict], recorders: dict[str, EntropyRecorder], path: str) -> None:
    """One panel per run: batch-entropy (colour) of every layer (y) over training steps (x)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [r for r in results if recorders[r["run"]].entropies]
    if not panels:
        logger.warning("No per-layer entropies were logged (lbe_log_per_layer off, or fewer steps than logging_steps): no picture.")
        return
    vmax = max(max(max(row) for row in recorders[r["run"]].entropies) for r in panels)
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 5.0), squeeze=False, constrained_layout=True)
    image = None
    for ax, r in zip(axes[0], panels):
        rec = recorders[r["run"]]
        grid = np.asarray(rec.entropies).T  # (layers, logged steps)
        steps = rec.steps
        first = steps[0] - (steps[1] - steps[0] if len(steps) > 1 else steps[0])
        image = ax.imshow(
            grid, aspect="auto", origin="lower", cmap="viridis", vmin=0.0, vmax=vmax, interpolation="nearest",
            extent=(first, steps[-1], 0.5, grid.shape[0] + 0.5),
        )
        ax.set_title(f"{r['run']} (β={r['lbe_beta']:g}): test acc {100 * r['test_accuracy']:.1f}%")
        ax.set_xlabel("training step")
        ax.set_ylabel("hidden layer (input → output)")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    fig.colorbar(image, ax=axes[0].tolist(), label="batch-entropy (nats per unit)")
    fig.suptitle(f"{results[0]['model']}\nper-layer batch-entropy over training", fontsize=11)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def format_table(results: list[dict]) -> str:
    rows = [
        ("run", lambda r: r["run"]),
        ("lbe_beta", lambda r: f"{r['lbe_beta']:g}"),
        ("test accuracy", lambda r: f"{100 * r['test_accuracy']:.1f}%"),
        ("test task loss", lambda r: f"{r['test_loss']:.4f}"),
        ("train task loss (last log)", lambda r: "-" if r["train_task_loss"] is None else f"{r['train_task_loss']:.4f}"),
        ("entropy min (end)", lambda r: f"{r['entropy_min']:.4f}"),
        ("entropy mean (end)", lambda r: f"{r['entropy_mean']:.4f}"),
        (f"alive layers (H > {DEAD_ENTROPY:g})", lambda r: f"{r['alive_layers']}/{r['num_layers']}"),
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


def run_one(name: str, model_args: ModelArguments, data_args: DataArguments, training_args: VanillaTrainingArguments,
            train_ds, test_ds, num_labels: int, image_shape: tuple[int, int]) -> tuple[dict, EntropyRecorder]:
    beta = 0.0 if name == "baseline" else training_args.lbe_beta
    args = dataclasses.replace(training_args, output_dir=os.path.join(training_args.output_dir, name), lbe_beta=beta)
    # Same seed before building the model: both runs start from the same initialization.
    set_seed(args.seed)
    channels, size = image_shape
    model = build_vanilla_model(model_args.arch, model_args.depth, model_args.width, num_channels=channels,
                                image_size=size, num_labels=num_labels, activation=model_args.activation)
    # Fingerprint of the initial weights: equal across runs, to show that they start from the same network.
    init_checksum = float(sum(p.detach().double().abs().sum() for p in model.parameters()))
    recorder = EntropyRecorder()
    callbacks = [recorder] + ([FlushDenormalsCallback()] if model_args.flush_denormal else [])
    trainer = VanillaTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=test_ds,
                             compute_metrics=compute_accuracy, callbacks=callbacks)
    if trainer.pop_callback(ProgressCallback) is not None:
        trainer.add_callback(CompactProgressCallback)
    if trainer.pop_callback(PrinterCallback) is not None:
        trainer.add_callback(CompactPrinterCallback)
    logger.info(f"=== run {name}: lbe_beta={beta}, {model_args.arch} depth {model_args.depth} width {model_args.width}")
    start = time.perf_counter()
    train_output = trainer.train()
    train_time = time.perf_counter() - start
    metrics = trainer.evaluate()
    wall = time.perf_counter() - start
    entropies = final_entropies(trainer.model, test_ds, data_args.entropy_batch_size, args.device)
    task_logs = [h["task_loss"] for h in trainer.state.log_history if "task_loss" in h]
    result = {
        "run": name,
        "model": f"vanilla {model_args.arch.upper()} depth {model_args.depth} width {model_args.width} "
                 f"{model_args.activation} on {data_args.dataset}",
        "arch": model_args.arch, "depth": model_args.depth, "width": model_args.width,
        "activation": model_args.activation, "dataset": data_args.dataset,
        "lbe_beta": beta, "lbe_alpha": args.lbe_alpha, "lbe_alpha_min": args.lbe_alpha_min,
        "lbe_alpha_learning_rate": args.lbe_alpha_learning_rate,
        "learning_rate": args.learning_rate, "lr_scheduler_type": scheduler_name(args),
        "batch_size": args.per_device_train_batch_size, "seed": args.seed,
        "init_checksum": init_checksum,
        "steps": trainer.state.global_step, "epochs": trainer.state.epoch,
        "test_accuracy": metrics["eval_accuracy"], "test_loss": metrics["eval_loss"],
        "train_task_loss": task_logs[-1] if task_logs else None,
        "train_loss": train_output.training_loss,
        "num_layers": len(entropies),
        "entropy_min": min(entropies), "entropy_mean": float(np.mean(entropies)),
        "alive_layers": int(sum(h > DEAD_ENTROPY for h in entropies)),
        "entropies_end": entropies,
        "eval_curve": recorder.evals,
        "train_time_s": train_time, "wall_time_s": wall,
        "device": str(args.device), "torch_threads": torch.get_num_threads(),
        "flush_denormal": bool(model_args.flush_denormal and args.device.type == "cpu"),
    }
    return result, recorder


def main(argv: list[str] | None = None) -> list[dict]:
    parser = HfArgumentParser((ModelArguments, DataArguments, VanillaTrainingArguments))
    if argv is None and len(sys.argv) == 2 and sys.argv[1].endswith(".json"):
        model_args, data_args, training_args = parser.parse_json_file(os.path.abspath(sys.argv[1]))
    else:
        model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)

    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%H:%M:%S",
                        level=logging.INFO, handlers=[logging.StreamHandler(sys.stdout)])
    transformers.utils.logging.set_verbosity_warning()

    runs = [r.strip() for r in data_args.runs.split(",") if r.strip()]
    unknown = [r for r in runs if r not in RUNS]
    if not runs or unknown:
        raise ValueError(f"--runs must list 'baseline' and/or 'lbe', got {data_args.runs!r}.")
    if scheduler_name(training_args) != "polynomial" and (
        training_args.lr_scheduler_kwargs == DEFAULT_SCHEDULER_KWARGS
    ):
        # Our default kwargs belong to the default polynomial schedule; another schedule would reject `power`.
        training_args.lr_scheduler_kwargs = {}
    if training_args.per_device_train_batch_size < 2:
        raise ValueError("Batch-entropy is a statistic over the batch: --per_device_train_batch_size must be >= 2.")

    if model_args.flush_denormal and training_args.device.type == "cpu":
        # Deep vanilla networks produce subnormal floats, on which CPU arithmetic is slower (1.1-2.8x, docs/vanilla.md).
        # Flushing them to zero changes values only below 1.2e-38. The trainers' callback repeats it every step.
        flush_denormals()
        logger.info("CPU: flushing subnormal floats to zero on every thread (--flush_denormal False to keep them).")

    if training_args.device.type == "cpu":
        threads = model_args.torch_threads or (1 if model_args.width <= 256 else torch.get_num_threads())
        torch.set_num_threads(threads)
        logger.info(f"CPU: {threads} PyTorch thread(s) (--torch_threads).")

    train_ds, test_ds, num_labels = load_data(data_args)
    sample = train_ds[0]["pixel_values"]
    image_shape = (sample.shape[0], sample.shape[-1])
    logger.info(f"data: {data_args.dataset}, {len(train_ds)} train / {len(test_ds)} test images of shape "
                f"{tuple(sample.shape)}, {num_labels} classes")
    os.makedirs(training_args.output_dir, exist_ok=True)

    results, recorders = [], {}
    for name in runs:
        result, recorder = run_one(name, model_args, data_args, training_args, train_ds, test_ds, num_labels,
                                   image_shape)
        results.append(result)
        recorders[name] = recorder
        # Written after every run so that a long run interrupted later keeps what was measured.
        with open(os.path.join(training_args.output_dir, "results.json"), "w") as f:
            json.dump(results, f, indent=1)

    png = os.path.join(training_args.output_dir, "batch_entropy.png")
    plot_entropy_heatmaps(results, recorders, png)
    table = format_table(results)
    print("\n" + table + "\n")
    print(f"results: {os.path.join(training_args.output_dir, 'results.json')}\npicture: {png}")
    return results


if __name__ == "__main__":
    main()
