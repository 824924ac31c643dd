"""The classifier experiments' job (ResNet, ViT): one model per seed, trained at every β of a grid from the same
initial weights, test accuracy and per-layer batch-entropies, the summary over seeds, the JSON and the picture."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from transformers import set_seed

from .data import classification_datasets, load_images
from .report import fmt, mean_std, write_json
from .runs import parse_floats, parse_ints, quiet, recipe_from, recipe_record, train


def accuracy(prediction) -> dict:
    return {"accuracy": float(np.mean(prediction.predictions.argmax(-1) == prediction.label_ids))}


def plot_grid(path: str, runs: list[dict], betas: list[float], title: str, layer_label: str) -> None:
    """Left: test accuracy per β (mean ± std, each seed a dot); right: batch-entropy per regularized layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_acc, ax_h) = plt.subplots(1, 2, figsize=(10, 3.8))
    for i, beta in enumerate(betas):
        accs = [100 * r["eval"]["eval_accuracy"] for r in runs if r["beta"] == beta]
        ax_acc.scatter([i] * len(accs), accs, color="tab:gray", s=12, zorder=3)
        ax_acc.errorbar([i], [np.mean(accs)], yerr=[np.std(accs, ddof=1) if len(accs) > 1 else 0], fmt="o",
                        color="tab:blue", capsize=4)
        h = np.mean([r["entropies"] for r in runs if r["beta"] == beta], axis=0)
        ax_h.plot(range(len(h)), h, marker=".", label=f"β = {beta:g}")
    ax_acc.set_xticks(range(len(betas)), [f"β = {b:g}" for b in betas])
    ax_acc.set_ylabel("test accuracy (%)")
    ax_acc.set_title("accuracy: mean ± std over seeds (dots: seeds)", fontsize=10)
    ax_h.set_xlabel(layer_label)
    ax_h.set_ylabel("batch-entropy (nats)")
    ax_h.set_title("batch-entropy per layer, last training window", fontsize=10)
    ax_h.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_grid(args: argparse.Namespace, build: Callable[[int], nn.Module], target_modules, *, experiment: str,
             model_record: dict, name: str, layer_label: str, argv: list[str] | None = None) -> dict:
    """Every (β, seed) run of `build(image_size)` with LBE on `target_modules`; prints one line per run, writes
    `args.output` (JSON, its command from `argv`, default the process's) and `args.plot` (PNG) when given, and
    returns the payload."""
    torch.set_num_threads(args.threads)
    quiet()
    split = load_images(args.dataset, args.train_samples, args.test_samples)
    train_ds, test_ds = classification_datasets(split)
    betas, seeds = parse_floats(args.betas), parse_ints(args.seeds)
    recipe = recipe_from(args)
    runs = []
    start = time.perf_counter()
    for beta in betas:
        for seed in seeds:
            set_seed(seed)  # the same initial weights for every β at a seed
            model = build(split.image_size)
            _, record = train(model, train_ds, seed=seed, beta=beta, recipe=recipe, target_modules=target_modules,
                              eval_dataset=test_ds, compute_metrics=accuracy)
            runs.append(record)
            print(f"[{experiment}] β {beta:g} seed {seed}: test accuracy {100 * record['eval']['eval_accuracy']:.2f}% "
                  f"({record['train_s']:.0f} s, {len(record['entropies'])} layers measured)", flush=True)
    summary = {f"{beta:g}": mean_std([r["eval"]["eval_accuracy"] for r in runs if r["beta"] == beta])
               for beta in betas}
    for beta, s in summary.items():
        print(f"[{experiment}] β {beta}: test accuracy {fmt(s, 100, 2)} %", flush=True)
    payload = {
        "experiment": experiment,
        "data": {"dataset": args.dataset, **split.describe()},
        "model": model_record,
        "recipe": recipe_record(recipe),
        "seeds": seeds,
        "betas": betas,
        "summary_accuracy": summary,
        "runs": runs,
        "wall_s": round(time.perf_counter() - start, 1),
    }
    if args.output:
        write_json(args.output, payload, f"experiments.{experiment}", argv, threads=args.threads)
    if args.plot:
        plot_grid(args.plot, runs, betas, f"{name} on {args.dataset} ({len(split.train_y)} training images, "
                                          f"{args.max_steps} steps)", layer_label)
    return payload
