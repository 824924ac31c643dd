"""One training run of a family experiment: `BatchEntropyTrainer` on a model, without (β = 0) or with LBE, and what
it records (task loss, per-layer batch-entropies, learned targets α, wall time). β = 0 is the plain `Trainer` run:
the same losses and updates, the entropies still measured, so both arms log the same figures."""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import transformers
from transformers import PrinterCallback
from torch import nn
from torch.utils.data import Dataset

from hf_batch_entropy import BatchEntropyConfig, BatchEntropyTrainer
from experiments.denormals import FlushDenormalsCallback
from experiments.provenance import weights_checksum

from .data import DATASETS


@dataclass
class Recipe:
    """The optimization recipe shared by every run of an experiment (AdamW, linear warm-up then cosine decay)."""

    max_steps: int
    batch_size: int
    learning_rate: float
    lbe_alpha: float
    lbe_alpha_min: float
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    logs: int = 5  # logging windows per run: the recorded entropies are the last window's means


def add_common_arguments(parser: argparse.ArgumentParser, *, steps: int, batch_size: int, learning_rate: float,
                         train_samples: int, test_samples: int, alpha: float, alpha_min: float) -> None:
    """The flags every family experiment has (data, seeds, recipe, outputs), with that experiment's defaults."""
    parser.add_argument("--dataset", choices=DATASETS, default="digits", help="8×8 digits (bundled) or MNIST (offline)")
    parser.add_argument("--train_samples", type=int, default=train_samples, help="training images (a fixed subset)")
    parser.add_argument("--test_samples", type=int, default=test_samples, help="test images (a fixed subset)")
    parser.add_argument("--seeds", default="0,1,2", help="model seeds, comma-separated")
    parser.add_argument("--max_steps", type=int, default=steps, help="optimizer steps per run")
    parser.add_argument("--batch_size", type=int, default=batch_size)
    parser.add_argument("--learning_rate", type=float, default=learning_rate)
    parser.add_argument("--lbe_alpha", type=float, default=alpha, help="initial target α₀ of every layer")
    parser.add_argument("--lbe_alpha_min", type=float, default=alpha_min, help="floor of the targets")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: the runs share the CPU)")
    parser.add_argument("--output", default=None, help="results JSON (default: none written)")
    parser.add_argument("--plot", default=None, help="picture (PNG) of the results (default: none)")


def parse_floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def parse_ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def recipe_from(args: argparse.Namespace) -> Recipe:
    return Recipe(max_steps=args.max_steps, batch_size=args.batch_size, learning_rate=args.learning_rate,
                  lbe_alpha=args.lbe_alpha, lbe_alpha_min=args.lbe_alpha_min)


def quiet() -> None:
    """Trainer's per-window prints and warnings off: the experiments print one line per run."""
    transformers.logging.set_verbosity_error()
    logging.getLogger("hf_batch_entropy").setLevel(logging.ERROR)


def train(model: nn.Module, train_dataset: Dataset, *, seed: int, beta: float, recipe: Recipe,
          target_modules=None, eval_dataset: Dataset | None = None,
          compute_metrics: Callable | None = None) -> tuple[BatchEntropyTrainer, dict]:
    """Train `model` for `recipe.max_steps` steps with LBE weight `beta` on `target_modules` (None: the trainer's
    default, the model's hidden states). Returns the trainer (for evaluation) and the run's record:

        seed, beta, train_s (wall seconds of `train()`), task_loss (last logging window's mean task loss),
        entropies (last window's mean batch-entropy per regularized layer, nats), layers (their names),
        init_checksum (Σ|w| over the parameters before training, float64: runs that start from the same weights
        have the same one), alpha (learned targets α_l at the end), eval (`trainer.evaluate()` metrics when `eval_dataset` is given),
        lbe_share (the LBE term over the task loss, lbe_loss / task_loss, in the first and in the last logging window:
        how much the term weighs at the start and at the end; 0 without LBE), entropies_first (the first window's
        mean batch-entropy per regularized layer).
    """
    init_checksum = weights_checksum(model)
    with tempfile.TemporaryDirectory() as out:
        args = BatchEntropyConfig(
            output_dir=os.path.join(out, "run"), max_steps=recipe.max_steps,
            per_device_train_batch_size=recipe.batch_size, per_device_eval_batch_size=256,
            learning_rate=recipe.learning_rate, lr_scheduler_type="cosine", warmup_steps=recipe.warmup_ratio,
            weight_decay=recipe.weight_decay, logging_steps=max(1, recipe.max_steps // recipe.logs),
            save_strategy="no", report_to="none", disable_tqdm=True, use_cpu=not torch.cuda.is_available(),
            seed=seed, data_seed=seed,
            lbe_beta=beta, lbe_alpha=recipe.lbe_alpha, lbe_alpha_min=recipe.lbe_alpha_min,
            lbe_target_modules=target_modules, lbe_log_per_layer=True,
        )
        trainer = BatchEntropyTrainer(model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                                      compute_metrics=compute_metrics, callbacks=[FlushDenormalsCallback()])
        trainer.remove_callback(PrinterCallback)  # one line per run instead (the logs are kept in log_history)
        start = time.perf_counter()
        trainer.train()
        train_s = time.perf_counter() - start
        metrics = trainer.evaluate() if eval_dataset is not None else {}
    windows = [e for e in trainer.state.log_history if "batch_entropy/layer_0" in e]
    first, last = windows[0], windows[-1]
    n = trainer.regularizer.num_layers

    def share(window: dict) -> float:
        task = window.get("task_loss", window.get("loss"))
        return round(window.get("lbe_loss", 0.0) / task, 6) if task else 0.0

    record = {
        "seed": seed,
        "beta": beta,
        "init_checksum": init_checksum,
        "train_s": round(train_s, 2),
        "task_loss": last.get("task_loss", last.get("loss")),
        "entropies": [round(last[f"batch_entropy/layer_{i}"], 4) for i in range(n)],
        "layers": list(trainer.regularizer.layer_names),
        "alpha": [round(a, 4) for a in trainer.regularizer.alpha.detach().cpu().tolist()],
        "lbe_share": {"first": share(first), "last": share(last), "first_step": first.get("step"),
                      "last_step": last.get("step")},
        "entropies_first": [round(first[f"batch_entropy/layer_{i}"], 4) for i in range(n)],
        "eval": {k: v for k, v in metrics.items() if k.startswith("eval_") and "runtime" not in k
                 and "per_second" not in k},
    }
    return trainer, record


def recipe_record(recipe: Recipe) -> dict:
    return asdict(recipe)
