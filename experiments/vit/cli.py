"""Vision transformers without and with LBE: a small `ViTForImageClassification` built from a config (no download),
trained from scratch, LBE on its `hidden_states` (the patch embeddings and every encoder layer's output: the trainer's
default for a Transformers model, nothing to name), over a β grid and seeds, on MNIST or digits.

    python -m experiments.vit --dataset mnist --output experiments/vit/results/vit_mnist.json --plot experiments/vit/results/vit_mnist.png
"""

from __future__ import annotations

import argparse

from transformers import ViTConfig, ViTForImageClassification

from experiments.families.classify import run_grid
from experiments.families.runs import add_common_arguments


def build_vit(image_size: int, layers: int, hidden: int, heads: int, num_labels: int = 10) -> ViTForImageClassification:
    """A pre-norm ViT for 1-channel images: 16 patches (7×7 on 28×28 MNIST, 2×2 on 8×8 digits) plus the [CLS] token,
    `layers` encoder layers of width `hidden` with `heads` heads and an MLP of 2·hidden, the classifier on [CLS]."""
    if image_size % 4:
        raise ValueError(f"build_vit cuts images into 4×4 patches: image_size must be a multiple of 4, got {image_size}.")
    config = ViTConfig(image_size=image_size, patch_size=image_size // 4, num_channels=1, hidden_size=hidden,
                       num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=2 * hidden,
                       num_labels=num_labels)
    return ViTForImageClassification(config)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser, steps=300, batch_size=64, learning_rate=1e-3, train_samples=5000, test_samples=2000,
                         alpha=0.5, alpha_min=0.5)
    parser.add_argument("--betas", default="0,0.01,0.05", help="LBE weights β (0: without LBE), comma-separated")
    parser.add_argument("--layers", type=int, default=6, help="encoder layers")
    parser.add_argument("--hidden", type=int, default=64, help="hidden size")
    parser.add_argument("--heads", type=int, default=4, help="attention heads")
    args = parser.parse_args(argv)
    model_record = {"class": "ViTForImageClassification", "layers": args.layers, "hidden_size": args.hidden,
                    "heads": args.heads, "intermediate_size": 2 * args.hidden, "patches": 16,
                    "lbe_target_modules": None, "regularized": "hidden_states (embeddings + every layer)"}
    return run_grid(args, lambda image_size: build_vit(image_size, args.layers, args.hidden, args.heads), None,
                    experiment="vit", model_record=model_record, name=f"ViT ({args.layers} layers, width {args.hidden})",
                    argv=argv, layer_label="hidden state (0: patch embeddings)")
