"""Residual networks without and with LBE: Transformers' `ResNetForImageClassification` built from a config (no
download), LBE on the output of every residual block through module targets on the block class, over a β grid and
seeds, on MNIST or digits.

    python -m experiments.resnet --dataset mnist --output experiments/resnet/results/resnet_mnist.json --plot experiments/resnet/results/resnet_mnist.png

A ResNet's `hidden_states` are one per stage (the embedding and each stage's output), so LBE's default would see 4
tensors; a user who wants each residual block regularized names the block class, as here:
`lbe_target_modules=[ResNetBasicLayer]`. `--plain` removes every shortcut: the plain network of equal depth (same
convolutions and batch norms), the paper's point of comparison.
"""

from __future__ import annotations

import argparse

from torch import nn
from transformers import ResNetConfig, ResNetForImageClassification
from transformers.models.resnet.modeling_resnet import ResNetBasicLayer

from experiments.families.classify import run_grid
from experiments.families.runs import add_common_arguments, parse_ints


class NoShortcut(nn.Module):
    """In place of a block's shortcut: adds nothing (a 0-dim zero that broadcasts), so the block is
    `act(layer(x))`, a plain network's block with the same convolutions and batch norms."""

    def forward(self, hidden_state):
        return hidden_state.new_zeros(())


def build_resnet(blocks_per_stage: int, widths: list[int], num_labels: int = 10,
                 plain: bool = False) -> ResNetForImageClassification:
    """A basic-block ResNet for 1-channel images: Transformers' 7×7/2 stem and 3×3/2 max-pool (28×28 → 7×7),
    `len(widths)` stages of `blocks_per_stage` blocks (two 3×3 convolutions with batch norm, identity or 1×1 projection
    shortcut; each stage after the first halves the size), global average pooling, a linear classifier: 2·stages·blocks
    + 2 weight layers (the paper's ResNet has 74). `plain`: every shortcut removed (`NoShortcut`), the plain network
    of equal depth."""
    config = ResNetConfig(num_channels=1, embedding_size=widths[0], hidden_sizes=widths,
                          depths=[blocks_per_stage] * len(widths), layer_type="basic", num_labels=num_labels)
    model = ResNetForImageClassification(config)
    if plain:
        for block in model.modules():
            if isinstance(block, ResNetBasicLayer):
                block.shortcut = NoShortcut()
    return model


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser, steps=300, batch_size=64, learning_rate=1e-3, train_samples=5000, test_samples=2000,
                         alpha=0.5, alpha_min=0.5)
    parser.add_argument("--betas", default="0,0.001,0.01", help="LBE weights β (0: without LBE), comma-separated")
    parser.add_argument("--blocks_per_stage", type=int, default=3, help="residual blocks in each stage")
    parser.add_argument("--widths", default="16,32,64", help="channels of each stage (the stem has the first)")
    parser.add_argument("--plain", action="store_true", help="remove every shortcut: the plain network of equal depth")
    args = parser.parse_args(argv)
    widths = parse_ints(args.widths)
    depth = 2 * args.blocks_per_stage * len(widths) + 2
    model_record = {"class": "ResNetForImageClassification", "layer_type": "basic", "depth": depth,
                    "blocks_per_stage": args.blocks_per_stage, "widths": widths,
                    "lbe_target_modules": ["ResNetBasicLayer"], "shortcuts": not args.plain}
    return run_grid(args, lambda image_size: build_resnet(args.blocks_per_stage, widths, plain=args.plain),
                    [ResNetBasicLayer], experiment="resnet", model_record=model_record,
                    name=f"{'Plain' if args.plain else 'ResNet'}-{depth}",
                    argv=argv, layer_label="residual block")
