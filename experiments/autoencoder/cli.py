"""Autoencoders without and with LBE: `DenseAutoencoderModel` (the paper's vanilla fully connected autoencoder: depth
layers per half, a linear code, a sigmoid output, PyTorch's default init) at several depths, trained on the mean
squared reconstruction error without LBE (β = 0) and with it, seeds each, scored on the test images by the
reconstruction error and SSIM (torchmetrics).

    python -m experiments.autoencoder --dataset mnist --output experiments/autoencoder/results/autoencoder_mnist.json \\
        --plot experiments/autoencoder/results/autoencoder_mnist.png

What LBE regularizes: the model's hidden states, i.e. every encoder layer's output, the code and every decoder layer's
output (2·depth + 1 layers), as the paper's reference autoencoder does. The task loss is the MSE (≥ 0), so the term
β·mean_l(lbe_l)·MSE is ≥ 0 and shrinks with the reconstruction error.

The floor a collapsed autoencoder sits on is its best constant output, the mean training image: its test MSE and
SSIM are recorded as `mean_image`.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from transformers import set_seed

from experiments.families.data import PixelDataset, load_images
from experiments.families.report import fmt, mean_std, write_json
from experiments.families.runs import add_common_arguments, parse_ints, quiet, recipe_from, recipe_record, train
from experiments.models import DenseAutoencoderConfig, DenseAutoencoderModel


def ssim_kernel(image_size: int) -> int:
    """SSIM's Gaussian window (σ 1.5): the standard 11 on MNIST's 28×28; 3 on 8×8 digits, where an 11-wide window
    leaves no valid position."""
    return 11 if image_size >= 22 else 3


def scores(reconstruction: torch.Tensor, target: torch.Tensor) -> dict:
    """Test MSE (mean over pixels and images) and SSIM (torchmetrics, data range 1, mean over images)."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    ssim = structural_similarity_index_measure(reconstruction, target, data_range=1.0,
                                               kernel_size=ssim_kernel(target.shape[-1]))
    return {"mse": float(((reconstruction - target) ** 2).mean()), "ssim": float(ssim)}


@torch.no_grad()
def reconstruct(model: DenseAutoencoderModel, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    model.eval()
    device = next(model.parameters()).device
    return torch.cat([model(pixel_values=images[i : i + batch_size].to(device)).reconstruction.cpu()
                      for i in range(0, len(images), batch_size)])


def plot(path: str, runs: list[dict], depths: list[int], betas: list[float], floor: dict, title: str) -> None:
    """SSIM and MSE against depth, without and with LBE (mean ± std over seeds), with the mean-image floor."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key, label in zip(axes, ("ssim", "mse"), ("test SSIM", "test MSE")):
        for beta in betas:
            stats = [mean_std([r["test"][key] for r in runs if r["depth"] == d and r["beta"] == beta]) for d in depths]
            ax.errorbar(depths, [s["mean"] for s in stats], yerr=[s["std"] for s in stats], marker="o", capsize=3,
                        label="without LBE" if beta == 0 else f"LBE β = {beta:g}")
        ax.axhline(floor[key], color="gray", linestyle=":", label="mean image (collapse)")
        ax.set_xscale("log")
        ax.set_xticks(depths, [str(d) for d in depths])
        ax.set_xlabel("depth (hidden layers per half)")
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser, steps=500, batch_size=64, learning_rate=1e-3, train_samples=5000, test_samples=2000,
                         alpha=2.0, alpha_min=0.5)
    parser.add_argument("--depths", default="1,10,25,50", help="hidden layers per half, comma-separated")
    parser.add_argument("--lbe_beta", type=float, default=0.5, help="β of the LBE arm (the other arm has β = 0)")
    parser.add_argument("--width", type=int, default=128, help="units per hidden layer")
    parser.add_argument("--code_size", type=int, default=10, help="size of the code")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    quiet()
    split = load_images(args.dataset, args.train_samples, args.test_samples)
    train_ds = PixelDataset(split.train_x)
    mean_image = split.train_x.mean(0, keepdim=True).expand_as(split.test_x)
    floor = scores(mean_image, split.test_x)
    depths, seeds, betas = parse_ints(args.depths), parse_ints(args.seeds), [0.0, args.lbe_beta]
    recipe = recipe_from(args)
    runs = []
    start = time.perf_counter()
    for depth in depths:
        for beta in betas:
            for seed in seeds:
                set_seed(seed)  # the same initial weights with and without LBE
                config = DenseAutoencoderConfig(depth=depth, width=args.width, code_size=args.code_size,
                                                image_size=split.image_size)
                trainer, record = train(DenseAutoencoderModel(config), train_ds, seed=seed, beta=beta, recipe=recipe)
                record = {"depth": depth, **record, "test": scores(reconstruct(trainer.model, split.test_x),
                                                                   split.test_x)}
                runs.append(record)
                print(f"[autoencoder] depth {depth} β {beta:g} seed {seed}: test SSIM {record['test']['ssim']:.3f}, "
                      f"MSE {record['test']['mse']:.4f} ({record['train_s']:.0f} s)", flush=True)
    summary = {}
    for depth in depths:
        for beta in betas:
            chosen = [r for r in runs if r["depth"] == depth and r["beta"] == beta]
            summary[f"depth {depth}, beta {beta:g}"] = {
                "ssim": mean_std([r["test"]["ssim"] for r in chosen]),
                "mse": mean_std([r["test"]["mse"] for r in chosen]),
            }
            print(f"[autoencoder] depth {depth}, β {beta:g}: SSIM {fmt(summary[f'depth {depth}, beta {beta:g}']['ssim'], 1, 3)}",
                  flush=True)
    payload = {
        "experiment": "autoencoder",
        "data": {"dataset": args.dataset, **split.describe()},
        "model": {"class": "DenseAutoencoderModel", "width": args.width, "code_size": args.code_size,
                  "depths": depths, "loss": "mean squared error (>= 0), sigmoid output, pixels in [0, 1]",
                  "regularized": "hidden_states: every encoder layer, the code, every decoder layer (2·depth + 1)"},
        "metrics": {"ssim": f"torchmetrics structural_similarity_index_measure, data_range 1, Gaussian window "
                            f"{ssim_kernel(split.image_size)} (σ 1.5)", "mse": "mean over pixels and test images"},
        "recipe": recipe_record(recipe),
        "seeds": seeds,
        "betas": betas,
        "mean_image": floor,
        "summary": summary,
        "runs": runs,
        "wall_s": round(time.perf_counter() - start, 1),
    }
    if args.output:
        write_json(args.output, payload, "experiments.autoencoder", argv, threads=args.threads)
    if args.plot:
        plot(args.plot, runs, depths, betas, floor, f"Autoencoder (width {args.width}, code {args.code_size}) on "
             f"{args.dataset}, {len(split.train_y)} training images, {args.max_steps} steps")
    return payload
