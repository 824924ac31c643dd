"""What the logged batch-entropies look like in healthy and in dead networks: the picture of docs/metrics.md.

    python experiments/entropy_metrics/run.py --output experiments/entropy_metrics/results/entropy_metrics.json \
        --plot docs/entropy_metrics.png

Four short CPU runs with `lbe_log_per_layer=True` (about a minute on 2 cores), each read back from
`trainer.state.log_history` as a user would:

- the quickstart's 4-layer BERT (random tokens, 120 steps) with `lbe_beta=0` (measured only) and with `lbe_beta=0.5`;
- a vanilla ReLU MLP of depth 30, width 64 (PyTorch's default initialization, no normalization) on scikit-learn's 8x8
  digits, 300 steps, without LBE and with the settings the diagnosis suggests for dead layers (β 0.5, α₀ 2,
  α_min 0.2).

The JSON holds every logged `batch_entropy_mean`, `batch_entropy_min` and `batch_entropy/layer_<i>`, the test accuracy
of the MLPs and the provenance (command, commit, versions, machine).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a file: the repository root, for `experiments`

import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification

from experiments.provenance import provenance
from hf_batch_entropy import BatchEntropyConfig, BatchEntropyTrainer


def per_layer(history: list[dict]) -> list[dict]:
    """The logged entries with LBE's metrics: step, mean, min and each layer's batch-entropy."""
    rows = []
    for entry in history:
        if "batch_entropy_mean" not in entry:
            continue
        layers = sorted((int(k.rsplit("_", 1)[1]), v) for k, v in entry.items() if k.startswith("batch_entropy/layer_"))
        rows.append({"step": entry["step"], "batch_entropy_mean": entry["batch_entropy_mean"],
                     "batch_entropy_min": entry["batch_entropy_min"], "lbe_alpha_mean": entry["lbe_alpha_mean"],
                     "task_loss": entry["task_loss"], "layers": [v for _, v in layers]})
    return rows


def bert_run(beta: float, out: str) -> dict:
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=1000, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128, num_labels=2,
    ))
    tokens = torch.randint(1, 1000, (256, 16), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": row, "labels": int(row[0]) % 2} for row in tokens]
    args = BatchEntropyConfig(output_dir=out, max_steps=120, per_device_train_batch_size=32, learning_rate=1e-3,
                              logging_steps=5, report_to="none", save_strategy="no", lbe_beta=beta,
                              lbe_log_per_layer=True)
    trainer = BatchEntropyTrainer(model=model, args=args, train_dataset=data)
    trainer.train()
    return {"model": "BERT, 4 layers, hidden 64 (the quickstart's)", "lbe_beta": beta,
            "layer_names": ["embeddings"] + [f"layer {i}" for i in range(1, 5)],
            "logs": per_layer(trainer.state.log_history)}


class MLP(nn.Module):
    """A vanilla ReLU MLP: no skip connections, no normalization, PyTorch's default initialization."""

    def __init__(self, depth: int, width: int):
        super().__init__()
        layers, size = [], 64
        for _ in range(depth):
            layers += [nn.Linear(size, width), nn.ReLU()]
            size = width
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, 10)

    def forward(self, pixel_values, labels=None):
        logits = self.head(self.body(pixel_values))
        loss = None if labels is None else nn.functional.cross_entropy(logits, labels)
        return {"loss": loss, "logits": logits}


def mlp_run(beta: float, out: str, depth: int = 30) -> dict:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train, test = order[:1437], order[1437:]
    torch.manual_seed(0)
    model = MLP(depth, 64)
    settings = {"lbe_alpha": 2.0, "lbe_alpha_min": 0.2} if beta else {}
    args = BatchEntropyConfig(output_dir=out, max_steps=300, per_device_train_batch_size=128, learning_rate=1e-3,
                              max_grad_norm=1.0, logging_steps=10, report_to="none", save_strategy="no",
                              lbe_beta=beta, lbe_target_modules=[nn.ReLU], lbe_log_per_layer=True, **settings)
    data = [{"pixel_values": x[i], "labels": int(y[i])} for i in train]
    trainer = BatchEntropyTrainer(model=model, args=args, train_dataset=data)
    trainer.train()
    with torch.no_grad():
        accuracy = float((model.eval()(x[test])["logits"].argmax(-1) == y[test]).float().mean())
    return {"model": f"vanilla ReLU MLP, depth {depth}, width 64, 8x8 digits", "lbe_beta": beta,
            "lbe_alpha": settings.get("lbe_alpha", 0.5), "lbe_alpha_min": settings.get("lbe_alpha_min", 0.5),
            "test_accuracy": accuracy, "layer_names": [f"ReLU {i}" for i in range(1, depth + 1)],
            "logs": per_layer(trainer.state.log_history)}


def plot(runs: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    titles = {"bert_beta0": "BERT-4, lbe_beta=0 (measured only)", "bert_beta0.5": "BERT-4, lbe_beta=0.5",
              "mlp30_beta0": "MLP depth 30, without LBE", "mlp30_beta0.5": "MLP depth 30, LBE (β 0.5, α₀ 2, α_min 0.2)"}
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), sharex="row")
    for ax, (key, title) in zip(axes.flat, titles.items()):
        logs = runs[key]["logs"]
        steps = [r["step"] for r in logs]
        layers = list(zip(*[r["layers"] for r in logs]))
        cmap = plt.get_cmap("viridis")
        for i, series in enumerate(layers):
            ax.plot(steps, [max(v, 1e-12) for v in series], color=cmap(i / max(len(layers) - 1, 1)), lw=0.9)
        ax.plot(steps, [r["batch_entropy_mean"] for r in logs], "k--", lw=1.8, label="batch_entropy_mean")
        ax.plot(steps, [max(r["batch_entropy_min"], 1e-12) for r in logs], "r:", lw=2, label="batch_entropy_min")
        ax.set_yscale("log")
        ax.set_ylim(1e-12, 10)
        if "test_accuracy" in runs[key]:
            title += f": test acc. {runs[key]['test_accuracy']:.0%}"
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel("batch-entropy (nats), per layer")
        ax.grid(alpha=0.3)
    axes[0, 0].legend(loc="lower right", fontsize=8)
    fig.text(0.5, 0.005, "one line per layer (colour: input side dark, output side yellow); below ~1e-6 a layer "
             "carries almost nothing", ha="center", fontsize=9)
    fig.tight_layout(rect=(0, 0.02, 1, 1))
    fig.savefig(path, dpi=72)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True, help="the JSON")
    parser.add_argument("--plot", default=None, help="the PNG")
    cli = parser.parse_args()
    torch.set_num_threads(1)
    runs, seconds = {}, {}
    with tempfile.TemporaryDirectory() as out:
        for key, run in [("bert_beta0", lambda: bert_run(0.0, out)), ("bert_beta0.5", lambda: bert_run(0.5, out)),
                         ("mlp30_beta0", lambda: mlp_run(0.0, out)), ("mlp30_beta0.5", lambda: mlp_run(0.5, out))]:
            start = time.process_time()
            runs[key] = run()
            seconds[key] = time.process_time() - start
            last = runs[key]["logs"][-1]
            print(f"{key}: step {last['step']}, batch_entropy_mean {last['batch_entropy_mean']:.3g}, "
                  f"batch_entropy_min {last['batch_entropy_min']:.3g} ({seconds[key]:.0f} CPU s)", flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(cli.output)), exist_ok=True)
    with open(cli.output, "w") as f:
        json.dump({"meta": provenance(sys.argv, packages=("scikit-learn", "matplotlib"), threads=1),
                   "cpu_time_s": seconds, "runs": runs}, f, indent=1)
    if cli.plot:
        plot(runs, cli.plot)


if __name__ == "__main__":
    main()
