"""What each part of the main job's training step costs: the depth-500 vanilla MLP with LBE, batch 128, one PyTorch
thread, median process CPU time over repetitions of each part on its own. Writes a JSON with commit, versions, machine
and command. Not part of the package or the tests.

    python experiments/benchmark/step_parts.py --width 64 --out experiments/benchmark/results/step_parts_w64.json

Parts: the forward with hidden states (through the modules, as before the direct path, and direct), the batch-entropies,
the backward of the LBE loss, Trainer's gradient clipping (torch's `clip_grad_norm_`, and the norm alone, which is what
the main job pays when the norm is under the limit), fused AdamW over the 1,002 weight tensors, `model.zero_grad()`,
`model.num_parameters()` (Trainer's per-step FLOP estimate before it was cached), one training batch from the
DataLoader (per-example normalization, as before, and pre-normalized), the evaluation pass of the main job (360 test
digits) and its effective-rank pass (a forward with hidden states and 8 SVDs).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)


def median_ms(fn, reps: int) -> dict:
    fn()
    times = []
    for _ in range(reps):
        begin = time.process_time()
        fn()
        times.append(time.process_time() - begin)
    times.sort()
    return {"median_ms": round(1000 * times[len(times) // 2], 3), "fastest_ms": round(1000 * times[0], 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--depth", type=int, default=500)
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--out", default=None)
    parser.add_argument("--note", default="")
    args = parser.parse_args()

    import torch

    import experiments.frontier as tv
    from hf_batch_entropy import batch_entropies
    from experiments.denormals import flush_denormals
    from experiments.models import build_vanilla_model
    from experiments.models import modeling_vanilla
    from experiments.provenance import provenance

    torch.set_num_threads(1)
    flush_denormals()
    torch.manual_seed(0)
    model = build_vanilla_model("mlp", args.depth, args.width)
    params = list(model.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=True)
    train, test, _ = tv.load_digits_split(0.2, 42)
    x = torch.stack([train[i]["pixel_values"] for i in range(128)])
    y = torch.stack([train[i]["labels"] for i in range(128)])
    parts = {}

    def forward():
        return model(pixel_values=x, labels=y, output_hidden_states=True)

    parts["forward, direct path (no hooks)"] = median_ms(forward, args.reps)
    original = modeling_vanilla.VanillaDenseLayer.has_hooks
    modeling_vanilla.VanillaDenseLayer.has_hooks = lambda self: True  # as if hooked: through the three modules
    parts["forward, through the modules"] = median_ms(forward, args.reps)
    modeling_vanilla.VanillaDenseLayer.has_hooks = original
    out = forward()
    hidden = list(out.hidden_states)
    parts["batch_entropies (fused)"] = median_ms(lambda: batch_entropies(hidden), args.reps)

    def backward():
        o = forward()
        e = batch_entropies(list(o.hidden_states))
        (o.loss * (1 + 0.5 * ((e - 2) ** 2).mean())).backward()

    fb = median_ms(backward, args.reps)
    fwd = parts["forward, direct path (no hooks)"]["median_ms"] + parts["batch_entropies (fused)"]["median_ms"]
    parts["backward (forward+entropies+backward minus forward and entropies)"] = {
        "median_ms": round(fb["median_ms"] - fwd, 3)}
    parts["gradient clipping, torch clip_grad_norm_"] = median_ms(lambda: torch.nn.utils.clip_grad_norm_(params, 1.0),
                                                                  args.reps)
    parts["gradient norm only (clipping when under the limit)"] = median_ms(
        lambda: torch.nn.utils.get_total_norm([p.grad for p in params], 2.0), args.reps)
    parts["fused AdamW step"] = median_ms(optimizer.step, args.reps)
    parts["model.zero_grad() (grads kept between repetitions)"] = median_ms(
        lambda: model.zero_grad(set_to_none=False), args.reps)
    parts["model.parameters() walk"] = median_ms(lambda: list(model.parameters()), args.reps)
    parts["model.num_parameters(exclude_embeddings=True)"] = median_ms(
        lambda: model.num_parameters(exclude_embeddings=True), args.reps)
    loader = torch.utils.data.DataLoader(train, batch_size=128, shuffle=True, drop_last=True)
    it = iter(loader)

    def batch():
        nonlocal it
        try:
            next(it)
        except StopIteration:
            it = iter(loader)
            next(it)

    parts["training batch of 128, pre-normalized digits"] = median_ms(batch, args.reps)
    train.normalized = None
    it = iter(loader)
    parts["training batch of 128, normalized per example"] = median_ms(batch, args.reps)
    test_x = torch.stack([test[i]["pixel_values"] for i in range(len(test))])

    @torch.no_grad()
    def evaluate():
        model.eval()
        model(pixel_values=test_x)
        model.train()

    parts[f"evaluation forward, {len(test)} test digits"] = median_ms(evaluate, max(3, args.reps // 5))
    parts["effective-rank pass (forward with hidden states + 8 SVDs + alive count)"] = median_ms(
        lambda: (tv.effective_ranks(h := tv.hidden_states_of(model, test, 512, torch.device("cpu"))),
                 batch_entropies(h)), max(3, args.reps // 5))

    report = {
        "meta": {
            **provenance([os.path.relpath(__file__, REPO), *sys.argv[1:]], packages=["scikit-learn"],
                         torch_threads=torch.get_num_threads()),
            "clock": "process CPU time, median over repetitions of each part alone",
            "note": args.note, "depth": args.depth, "width": args.width, "batch": 128,
        },
        "parts": parts,
    }
    for name, value in parts.items():
        print(f"{value['median_ms']:9.2f} ms  {name}")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
