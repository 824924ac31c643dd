"""Layerwise batch-entropy regularization for any PyTorch model: a deep plain MLP on scikit-learn's 8×8 digits, its
ReLU outputs regularized through forward hooks (`lbe_target_modules`).

    python examples/vision_mlp.py                 # depth 30 with LBE: it learns
    python examples/vision_mlp.py --lbe_beta 0    # the same run without LBE: it stays at chance (10 %)
"""

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

from hf_batch_entropy import BatchEntropyConfig, BatchEntropyTrainer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository's research code, not installed
from experiments.denormals import FlushDenormalsCallback  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--depth", type=int, default=30, help="hidden layers")
parser.add_argument("--lbe_beta", type=float, default=0.5, help="weight of the LBE term (0: plain Trainer)")
parser.add_argument("--max_steps", type=int, default=600, help="optimizer steps of batch 128")
parser.add_argument("--output_dir", default="runs/vision-mlp-lbe", help="where the model and α are saved")
cli = parser.parse_args()


class MLP(nn.Module):
    """A vanilla MLP: Linear + ReLU layers, no skip connections, no normalization. Any nn.Module that returns a dict
    with "loss" (given "labels") and "logits" trains with Trainer, and with BatchEntropyTrainer."""

    def __init__(self, depth: int, width: int = 64, num_classes: int = 10):
        super().__init__()
        layers = [nn.Linear(64, width), nn.ReLU()]
        for _ in range(depth - 1):
            layers += [nn.Linear(width, width), nn.ReLU()]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, num_classes)

    def forward(self, pixel_values, labels=None):
        logits = self.head(self.body(pixel_values))
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return {"loss": loss, "logits": logits}


x, y = load_digits(return_X_y=True)
x = (x - x.mean(0)) / (x.std(0) + 1e-6)
x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.2, random_state=0, stratify=y)
to_rows = lambda xs, ys: [{"pixel_values": torch.tensor(a, dtype=torch.float32), "labels": int(b)} for a, b in zip(xs, ys)]

torch.manual_seed(0)
args = BatchEntropyConfig(
    output_dir=cli.output_dir,
    learning_rate=1e-3,
    per_device_train_batch_size=128,
    max_steps=cli.max_steps,
    logging_steps=100,
    report_to="none",
    lbe_beta=cli.lbe_beta,
    lbe_alpha=2.0,                  # from scratch: start the targets high, the floor low
    lbe_alpha_min=0.2,
    lbe_target_modules=[nn.ReLU],   # or names ("body.1"), suffixes, or "re:<regex>", as PEFT's target_modules
    dataloader_drop_last=True,
)


def accuracy(prediction):
    return {"accuracy": float(np.mean(prediction.predictions.argmax(-1) == prediction.label_ids))}


trainer = BatchEntropyTrainer(model=MLP(cli.depth), args=args, train_dataset=to_rows(x_train, y_train),
                              eval_dataset=to_rows(x_test, y_test), compute_metrics=accuracy,
                              callbacks=[FlushDenormalsCallback()])  # CPU: dead deep layers make slow subnormals
trainer.train()
print(f"depth {cli.depth}, lbe_beta {cli.lbe_beta}: test accuracy {trainer.evaluate()['eval_accuracy']:.3f}")
if cli.lbe_beta > 0:
    print(f"{trainer.regularizer.num_layers} ReLU outputs regularized; learned targets α from "
          f"{trainer.regularizer.alpha.min().item():.2f} to {trainer.regularizer.alpha.max().item():.2f}")
else:
    print(f"{trainer.regularizer.num_layers} ReLU outputs measured, none regularized (lbe_beta 0: plain Trainer)")
trainer.accelerator.end_training()  # launched on several processes: ends the process group (ZeRO-3 needs it)
