"""Rank probe for issue 3 (experiments/frontier/vanilla.md, "Third round"): a bare PyTorch loop over the same digits split, the same
vanilla MLP and the library's `batch_entropies`, with L = CE·(1 + β·mean_l (H_l − max(α_min, |α_l|))²) as in
`BatchEntropyRegularizer`, to try optimizers and estimators the Trainer does not offer. Every `--eval_every` steps it
prints the test accuracy, the number of layers alive on the training batch, the effective rank of the centred test
activations at layers 1, 5, 10, 50, 250, 500 (exp of the entropy of the normalized squared singular values), and, for
layers 1, 5, 10, 50, each unit's |mean| and spread over the test set and the share of ReLU outputs that are on.

    python experiments/frontier/rank_probe.py --opt adam --lr 2e-3 --sched const --steps 150 --eval_every 50
    python experiments/frontier/rank_probe.py --opt muon --lr 1e-2 --alr 2e-3 --steps 600 --eval_every 100
    python experiments/frontier/rank_probe.py --joint 1 --sched const --steps 150 --eval_every 25
    python experiments/frontier/rank_probe.py --precond 1e-2 --opt tadam --local 1 --sched const --steps 100 --eval_every 25

Not part of the package or the tests: an experiment, one thread, ~0.08 s per Adam step on the project machine.
"""

import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a file: the repository root, for `experiments`

import torch

from hf_batch_entropy import batch_entropies
from experiments.frontier import DEAD_ENTROPY, load_digits_split
from experiments.models import build_vanilla_model

RANK_LAYERS = (1, 5, 10, 50, 250, 500)
STATS_LAYERS = (1, 5, 10, 50)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--opt", default="adam", choices=["adam", "tadam", "muon", "muon_original"],
                   help="adam: fused AdamW; tadam: TensorAdam below; muon: torch.optim.Muon for the hidden weights "
                        "(lr adjusted to match AdamW's RMS; muon_original: Muon's own adjustment), Adam for the rest")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--alr", type=float, default=None, help="learning rate of α (default: --lr)")
    p.add_argument("--mlr", type=float, default=1.0, help="Muon's learning rate as a multiple of --lr")
    p.add_argument("--sched", default="poly2", choices=["poly2", "linear", "const"])
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--eval_every", type=int, default=100)
    p.add_argument("--depth", type=int, default=500)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--bs", type=int, default=128)
    p.add_argument("--beta", type=float, default=0.5)
    p.add_argument("--a0", type=float, default=2.0, help="α₀")
    p.add_argument("--amin", type=float, default=0.2, help="α_min")
    p.add_argument("--eps", type=float, default=1e-8)
    p.add_argument("--b1", type=float, default=0.9)
    p.add_argument("--b2", type=float, default=0.999)
    p.add_argument("--clip", type=float, default=1.0, help="global gradient-norm clipping (0: off)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--freeze_bias", type=int, default=0, help="1: hidden layers' biases are not trained")
    p.add_argument("--joint", type=int, default=0,
                   help="1: (1/2d)·log det(πe·C + I) of the batch covariance C instead of the mean per-unit entropy")
    p.add_argument("--precond", type=float, default=0.0,
                   help="δ > 0: hidden weight gradients G ← G·(Σ_in + δ·tr(Σ_in)/d·I)⁻¹, rescaled to ‖G‖")
    p.add_argument("--local", type=int, default=0, help="1: each layer's entropy from its own input, detached")
    return p.parse_args()


class TensorAdam(torch.optim.Optimizer):
    """Adam with one second-moment scalar per tensor (mean of g²): keeps the gradient's direction within a tensor."""

    def __init__(self, params, lr, betas=(0.9, 0.999), eps=1e-8):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for q in group["params"]:
                if q.grad is None:
                    continue
                state = self.state[q]
                if not state:
                    state.update(t=0, m=torch.zeros_like(q), v=torch.zeros((), dtype=q.dtype))
                state["t"] += 1
                t = state["t"]
                state["m"].mul_(b1).add_(q.grad, alpha=1 - b1)
                state["v"] = state["v"] * b2 + (1 - b2) * q.grad.pow(2).mean()
                m_hat, v_hat = state["m"] / (1 - b1**t), state["v"] / (1 - b2**t)
                q.add_(m_hat / (v_hat.sqrt() + group["eps"]), alpha=-group["lr"])


class OptimizerPair:
    """Two optimizers stepped as one (Muon for the hidden weights, Adam for the rest)."""

    def __init__(self, first: torch.optim.Optimizer, second: torch.optim.Optimizer):
        self.optimizers = (first, second)
        self.param_groups = first.param_groups + second.param_groups

    def step(self):
        for optimizer in self.optimizers:
            optimizer.step()

    def zero_grad(self, set_to_none: bool = True):
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)


def build_optimizer(a, model, params, alpha):
    betas, alpha_lr = (a.b1, a.b2), a.alr or a.lr
    if a.opt == "adam":
        groups = [{"params": params, "weight_decay": 0.0}, {"params": [alpha], "weight_decay": 0.0, "lr": alpha_lr}]
        return torch.optim.AdamW(groups, lr=a.lr, betas=betas, eps=a.eps, fused=True)
    if a.opt == "tadam":
        return TensorAdam(params + [alpha], lr=a.lr, betas=betas, eps=a.eps)
    hidden = {name for name, q in model.named_parameters() if q.dim() > 1 and "classifier" not in name}
    weights = [q for name, q in model.named_parameters() if name in hidden]
    rest = [q for name, q in model.named_parameters() if q.requires_grad and name not in hidden]
    # ε far below Muon's default: the dead layers' gradients are ~1e-20 and must still be orthogonalized, not zeroed.
    muon = torch.optim.Muon(weights, lr=a.lr * a.mlr, weight_decay=0.0, eps=1e-30,
                            adjust_lr_fn="match_rms_adamw" if a.opt == "muon" else "original")
    adam = torch.optim.Adam([{"params": rest}, {"params": [alpha], "lr": alpha_lr}], lr=a.lr, betas=betas, eps=a.eps)
    return OptimizerPair(muon, adam)


def lr_factor(a, step: int) -> float:
    done = step / a.steps
    return {"poly2": (1 - done) ** 2, "linear": 1 - done}.get(a.sched, 1.0)


def effective_rank(h: torch.Tensor) -> float:
    h = h - h.mean(0, keepdim=True)
    s = torch.linalg.svdvals(h.double()) ** 2
    p = s / s.sum()
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def joint_entropies(hs: list[torch.Tensor]) -> torch.Tensor:
    """(1/2d)·log det(πe·C + I) per layer, C the `(d, d)` batch covariance: the per-unit entropy of a joint Gaussian."""
    stacked = torch.stack([h.flatten(1) for h in hs]).double()
    centred = stacked - stacked.mean(1, keepdim=True)
    cov = centred.transpose(1, 2) @ centred / (stacked.shape[1] - 1)
    chol = torch.linalg.cholesky(math.pi * math.e * cov + torch.eye(cov.shape[-1], dtype=cov.dtype))
    return (torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1) / cov.shape[-1]).float()


@torch.no_grad()
def precondition(model, inputs: list[torch.Tensor], damping: float) -> None:
    """The input factor of K-FAC: G ← G·(Σ_in + δ·tr(Σ_in)/d·I)⁻¹ per hidden layer, rescaled to ‖G‖ so that only the
    direction changes (global clipping and Adam's moments see the same norms)."""
    for layer, x in zip(model.layers, inputs):
        xc = (x - x.mean(0)).double()
        cov = xc.T @ xc / len(xc)
        damped = cov + damping * cov.diagonal().mean().clamp_min(1e-300) * torch.eye(cov.shape[0], dtype=cov.dtype)
        grad = layer.dense.weight.grad
        pre = torch.linalg.solve(damped, grad.double().T).T
        pre = pre * (grad.double().norm() / pre.norm().clamp_min(1e-300))
        layer.dense.weight.grad = torch.nan_to_num(pre).to(grad.dtype)


def main():
    a = parse_args()
    torch.set_flush_denormal(True)
    torch.set_num_threads(1)
    torch.manual_seed(a.seed)
    train, test, num_labels = load_digits_split(0.2, 42)
    X = torch.stack([train[i]["pixel_values"] for i in range(len(train))])
    Y = torch.tensor([int(train[i]["labels"]) for i in range(len(train))])
    X_test = torch.stack([test[i]["pixel_values"] for i in range(len(test))])
    Y_test = torch.tensor([int(test[i]["labels"]) for i in range(len(test))])
    model = build_vanilla_model("mlp", a.depth, a.width, num_channels=1, image_size=8, num_labels=num_labels,
                                activation="relu")
    alpha = torch.nn.Parameter(torch.full((a.depth,), a.a0))
    if a.freeze_bias:
        for name, q in model.named_parameters():
            if name.endswith("bias") and "classifier" not in name:
                q.requires_grad_(False)
    params = [q for q in model.parameters() if q.requires_grad]
    opt = build_optimizer(a, model, params, alpha)
    base_lrs = [group["lr"] for group in opt.param_groups]

    generator = torch.Generator().manual_seed(a.seed)
    start, step = time.time(), 0
    while step < a.steps:
        perm = torch.randperm(len(X), generator=generator)
        for i in range(0, len(X) - a.bs + 1, a.bs):
            if step >= a.steps:
                break
            for group, base in zip(opt.param_groups, base_lrs):
                group["lr"] = base * lr_factor(a, step)
            idx = perm[i : i + a.bs]
            out = model(pixel_values=X[idx], output_hidden_states=True)
            hs = list(out.hidden_states)
            inputs = [X[idx].flatten(1)] + [h.flatten(1) for h in hs[:-1]]
            ce = torch.nn.functional.cross_entropy(out.logits, Y[idx])
            if a.local:
                hs = [layer(x.detach()) for layer, x in zip(model.layers, inputs)]
            H = joint_entropies(hs) if a.joint else batch_entropies(hs)
            lbe = ((H - torch.maximum(alpha.abs(), torch.tensor(a.amin))) ** 2).mean()
            loss = ce * (1 + a.beta * lbe)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if a.precond:
                precondition(model, inputs, a.precond)
            if a.clip:
                torch.nn.utils.clip_grad_norm_(params + [alpha], a.clip)
            opt.step()
            step += 1
            if step % a.eval_every == 0 or step == a.steps:
                with torch.no_grad():
                    o = model(pixel_values=X_test, output_hidden_states=True)
                    acc = float((o.logits.argmax(-1) == Y_test).float().mean())
                    H_test = batch_entropies(list(o.hidden_states))
                    ranks = [round(effective_rank(o.hidden_states[l - 1].flatten(1)), 2) for l in RANK_LAYERS]
                    stats = []
                    for l in STATS_LAYERS:
                        h = o.hidden_states[l - 1].flatten(1)
                        stats.append((round(float(h.mean(0).abs().mean()), 3), round(float(h.std(0).mean()), 3),
                                      round(float((h > 0).float().mean()), 2)))
                print("   mean/std/on", stats)
                print(f"step {step} t {time.time() - start:.0f}s ce {ce.item():.3f} lbe {lbe.item():.3f} "
                      f"alive {(H > DEAD_ENTROPY).sum().item()} testacc {acc:.3f} Hmin {H_test.min():.2f} "
                      f"ranks {ranks}", flush=True)


if __name__ == "__main__":
    main()
