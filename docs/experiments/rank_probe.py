"""Rank probe for issue 3 (docs/vanilla.md, "Third round"): a bare PyTorch loop over the same digits split, the same
vanilla MLP and the library's `batch_entropies`, with L = CE·(1 + β·mean_l (H_l − max(α_min, |α_l|))²) as in
`BatchEntropyRegularizer`, to try optimizers and estimators the Trainer does not offer. Every `--eval_every` steps it
prints the test accuracy, the number of layers alive on the training batch and the effective rank of the centred test
activations at layers 1, 5, 10, 50, 250, 500 (exp of the entropy of the normalized squared singular values).

    python docs/experiments/rank_probe.py --opt adam --lr 2e-3 --sched const --steps 150 --eval_every 50
    python docs/experiments/rank_probe.py --opt muon --lr 1e-2 --alr 2e-3 --steps 600 --eval_every 100
    python docs/experiments/rank_probe.py --joint 1 --sched const --steps 150 --eval_every 25
    python docs/experiments/rank_probe.py --precond 1e-2 --opt tadam --local 1 --sched const --steps 100 --eval_every 25

Not part of the package or the tests: an experiment, one thread, ~0.08 s per Adam step on the project machine.
"""
import argparse, math, os, sys, time

import torch
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "scripts"))
import train_vanilla as tv
from hf_batch_entropy import batch_entropies
from hf_batch_entropy.models import build_vanilla_model
p = argparse.ArgumentParser()
p.add_argument("--opt", default="adam"); p.add_argument("--lr", type=float, default=2e-3)
p.add_argument("--steps", type=int, default=1000); p.add_argument("--width", type=int, default=64)
p.add_argument("--depth", type=int, default=500); p.add_argument("--beta", type=float, default=0.5)
p.add_argument("--a0", type=float, default=2.0); p.add_argument("--amin", type=float, default=0.2)
p.add_argument("--sched", default="poly2"); p.add_argument("--bs", type=int, default=128)
p.add_argument("--eps", type=float, default=1e-8); p.add_argument("--b1", type=float, default=0.9)
p.add_argument("--b2", type=float, default=0.999); p.add_argument("--clip", type=float, default=1.0)
p.add_argument("--eval_every", type=int, default=100); p.add_argument("--seed", type=int, default=42)
p.add_argument("--logdet", type=float, default=0.0); p.add_argument("--mlr", type=float, default=1.0); p.add_argument("--alr", type=float, default=None); p.add_argument("--freeze_bias", type=int, default=0); p.add_argument("--joint", type=int, default=0); p.add_argument("--precond", type=float, default=0.0); p.add_argument("--local", type=int, default=0)
a = p.parse_args()
torch.set_flush_denormal(True); torch.set_num_threads(1); torch.manual_seed(a.seed)
train, test, nl = tv.load_digits_split(0.2, 42)
X = torch.stack([train[i]["pixel_values"] for i in range(len(train))]); Y = torch.tensor([int(train[i]["labels"]) for i in range(len(train))])
Xt = torch.stack([test[i]["pixel_values"] for i in range(len(test))]); Yt = torch.tensor([int(test[i]["labels"]) for i in range(len(test))])
model = build_vanilla_model("mlp", a.depth, a.width, num_channels=1, image_size=8, num_labels=nl, activation="relu")
alpha = torch.nn.Parameter(torch.full((a.depth,), a.a0))
if a.freeze_bias:
    for n, q in model.named_parameters():
        if n.endswith("bias") and "classifier" not in n: q.requires_grad_(False)
params = [q for q in model.parameters() if q.requires_grad]

class TensorAdam(torch.optim.Optimizer):
    """Adam with one second-moment scalar per tensor (mean of g^2): keeps the gradient's direction within a tensor."""
    def __init__(s, params, lr, betas=(0.9, 0.999), eps=1e-8):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps))
    @torch.no_grad()
    def step(s):
        for g in s.param_groups:
            b1, b2 = g["betas"]
            for q in g["params"]:
                if q.grad is None: continue
                st = s.state[q]
                if not st:
                    st["t"] = 0; st["m"] = torch.zeros_like(q); st["v"] = torch.zeros((), dtype=q.dtype)
                st["t"] += 1; t = st["t"]
                st["m"].mul_(b1).add_(q.grad, alpha=1 - b1)
                gs = q.grad.pow(2).mean()
                st["v"] = st["v"] * b2 + (1 - b2) * gs
                mh = st["m"] / (1 - b1 ** t); vh = st["v"] / (1 - b2 ** t)
                q.add_(mh / (vh.sqrt() + g["eps"]), alpha=-g["lr"])

if a.opt == "adam":
    opt = torch.optim.AdamW([{"params": params, "weight_decay": 0.0}, {"params": [alpha], "weight_decay": 0.0, "lr": a.alr or a.lr}], lr=a.lr, betas=(a.b1, a.b2), eps=a.eps, fused=True)
elif a.opt == "tadam":
    opt = TensorAdam(params + [alpha], lr=a.lr, betas=(a.b1, a.b2), eps=a.eps)
elif a.opt == "tadam_a":  # per-tensor for weights, elementwise adam for alpha/bias
    ws = [q for q in params if q.dim() > 1]; bs = [q for q in params if q.dim() == 1]
    opt1 = TensorAdam(ws, lr=a.lr, betas=(a.b1, a.b2), eps=a.eps)
    opt2 = torch.optim.Adam(bs + [alpha], lr=a.lr, betas=(a.b1, a.b2), eps=a.eps)
    class Both:
        param_groups = opt1.param_groups + opt2.param_groups
        def step(self): opt1.step(); opt2.step()
        def zero_grad(self, set_to_none=True): opt1.zero_grad(); opt2.zero_grad()
    opt = Both()
elif a.opt.startswith("muon"):
    ws = [q for n, q in model.named_parameters() if q.dim() > 1 and "classifier" not in n]
    rest = [q for n, q in model.named_parameters() if q.requires_grad and not (q.dim() > 1 and "classifier" not in n)]
    opt1 = torch.optim.Muon(ws, lr=a.lr * a.mlr, weight_decay=0.0, eps=1e-30, adjust_lr_fn=("match_rms_adamw" if a.opt == "muon" else "original"))
    opt2 = torch.optim.Adam([{"params": rest}, {"params": [alpha], "lr": a.alr or a.lr}], lr=a.lr, betas=(a.b1, a.b2), eps=a.eps)
    class Both:
        param_groups = opt1.param_groups + opt2.param_groups
        def step(self): opt1.step(); opt2.step()
        def zero_grad(self, set_to_none=True): opt1.zero_grad(); opt2.zero_grad()
    opt = Both()
base_lrs = [g["lr"] for g in opt.param_groups]
def lr_at(s):
    f = s / a.steps
    if a.sched == "poly2": return (1 - f) ** 2
    if a.sched == "linear": return 1 - f
    return 1.0
def eff_rank(h):
    h = h - h.mean(0, keepdim=True); s = torch.linalg.svdvals(h.double()) ** 2; p_ = s / s.sum(); p_ = p_[p_ > 0]
    return float(torch.exp(-(p_ * p_.log()).sum()))
g = torch.Generator().manual_seed(a.seed)
t0 = time.time(); step = 0
while step < a.steps:
    perm = torch.randperm(len(X), generator=g)
    for i in range(0, len(X) - a.bs + 1, a.bs):
        if step >= a.steps: break
        for pg, bl in zip(opt.param_groups, base_lrs): pg["lr"] = bl * lr_at(step)
        idx = perm[i:i + a.bs]
        out = model(pixel_values=X[idx], output_hidden_states=True)
        hs = list(out.hidden_states)
        ce = torch.nn.functional.cross_entropy(out.logits, Y[idx])
        if a.local:
            # "Local" LBE: each layer's entropy from its own input, detached, so only its own weights serve its target.
            hs = [layer(x.detach()) for layer, x in zip(model.layers, [X[idx].flatten(1)] + [h.flatten(1) for h in hs[:-1]])]
        if a.joint:
            Hs = torch.stack([h.flatten(1) for h in hs]).double()
            Hc = Hs - Hs.mean(1, keepdim=True)
            C = Hc.transpose(1, 2) @ Hc / (Hs.shape[1] - 1)
            I = torch.eye(C.shape[-1], dtype=C.dtype)
            L = torch.linalg.cholesky(math.pi * math.e * C + I)
            H = (torch.log(torch.diagonal(L, dim1=-2, dim2=-1)).sum(-1) / C.shape[-1]).float()
        else:
            H = batch_entropies(hs)
        lbe = ((H - torch.maximum(alpha.abs(), torch.tensor(a.amin))) ** 2).mean()
        loss = ce * (1 + a.beta * lbe)
        opt.zero_grad(set_to_none=True); loss.backward()
        if a.precond:
            # Right-precondition each hidden layer's weight gradient by the inverse of its input's batch covariance
            # (damped relative to its mean eigenvalue), the input factor of K-FAC: G ← G·(Σ_in + δ·tr(Σ_in)/d·I)⁻¹.
            with torch.no_grad():
                inputs = [X[idx].flatten(1)] + [h.flatten(1) for h in hs[:-1]]
                for layer, x in zip(model.layers, inputs):
                    xc = (x - x.mean(0)).double()
                    cov = xc.T @ xc / len(xc)
                    damp = a.precond * cov.diagonal().mean().clamp_min(1e-300)
                    A = cov + damp * torch.eye(cov.shape[0], dtype=cov.dtype)
                    grad = layer.dense.weight.grad
                    pre = torch.linalg.solve(A, grad.double().T).T
                    # Only the direction changes: the norm stays the gradient's (global clipping, Adam's moments).
                    pre = pre * (grad.double().norm() / pre.norm().clamp_min(1e-300))
                    layer.dense.weight.grad = torch.nan_to_num(pre).to(grad.dtype)
        if a.clip: torch.nn.utils.clip_grad_norm_(params + [alpha], a.clip)
        opt.step(); step += 1
        if step % a.eval_every == 0 or step == a.steps:
            with torch.no_grad():
                o = model(pixel_values=Xt, output_hidden_states=True)
                acc = float((o.logits.argmax(-1) == Yt).float().mean())
                Ht = batch_entropies(list(o.hidden_states))
                rk = [round(eff_rank(o.hidden_states[l - 1].flatten(1)), 2) for l in (1, 5, 10, 50, 250, 500)]
                st = []
                for l in (1, 5, 10, 50):
                    h = o.hidden_states[l - 1].flatten(1)
                    st.append((round(float(h.mean(0).abs().mean()), 3), round(float(h.std(0).mean()), 3), round(float((h > 0).float().mean()), 2)))
            print("   mean/std/on", st)
            print(f"step {step} t {time.time()-t0:.0f}s ce {ce.item():.3f} lbe {lbe.item():.3f} alive {(H > 1e-13).sum().item()} testacc {acc:.3f} Hmin {Ht.min():.2f} ranks {rk}", flush=True)
