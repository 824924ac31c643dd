"""Seconds per training step of the depth-500, width-64 vanilla MLP with the LBE loss, one PyTorch thread: the
measurement behind `--workers` auto in scripts/train_vanilla.py (docs/vanilla.md, "The trainability frontier").

A bare loop (forward with hidden states, `batch_entropies`, L = CE·(1 + 0.5·mean_l (H_l − 2)²), backward, fused
AdamW) on random 8×8 inputs, batch 128, after 20 warm-up steps; prints the mean milliseconds per step over
`seconds` of wall time. Run one copy, then two side by side, and compare:

    python docs/experiments/step_bench.py 10
    python docs/experiments/step_bench.py 10 & python docs/experiments/step_bench.py 10; wait

Not part of the package or the tests.
"""

import sys
import time

import torch

from hf_batch_entropy import batch_entropies
from hf_batch_entropy.denormals import flush_denormals
from hf_batch_entropy.models import build_vanilla_model


def main(seconds: float) -> None:
    torch.set_num_threads(1)
    flush_denormals()
    torch.manual_seed(0)
    model = build_vanilla_model("mlp", 500, 64)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    x, y = torch.randn(128, 1, 8, 8), torch.randint(0, 10, (128,))

    def step() -> None:
        out = model(pixel_values=x, labels=y, output_hidden_states=True)
        entropies = batch_entropies(list(out.hidden_states))
        loss = out.loss * (1 + 0.5 * ((entropies - 2) ** 2).mean())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    for _ in range(20):
        step()
    start, steps = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        step()
        steps += 1
    print(f"{(time.perf_counter() - start) / steps * 1000:.1f} ms/step")


if __name__ == "__main__":
    main(float(sys.argv[1]) if len(sys.argv) > 1 else 10.0)
