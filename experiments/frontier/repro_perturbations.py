"""How far a `scripts/train_vanilla.py` configuration moves when the arithmetic changes in its last bits (what another
x86-64 host with the same software does) and when our code changes a little (what the reproducibility test must
catch). This justifies the tolerance of `tests/test_train_vanilla.py::test_matches_the_stored_reference`.

Every variant re-runs the configuration in a fresh process (environment variables that pick CPU kernels act at
start-up) and is compared with the unperturbed run:

- last-bit perturbations: `threads2` (2 PyTorch threads instead of 1); `ulp` (every input pixel moved by one float32
  ulp, `torch.nextafter`); `avx2` (ATen, MKL and oneDNN limited to AVX2 kernels, as on a host without AVX-512:
  `ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2`); `no_simd` (ATen's scalar kernels,
  MKL SSE4.2, oneDNN SSE4.1); `no_simd_threads2` (both); `mkl_cbwr` (MKL's conditional numerical reproducibility
  mode, `MKL_CBWR=COMPATIBLE`);
- code changes: `beta_0.49` (β 0.5 → 0.49), `alpha0_2.02` (α₀ 2 → 2.02), `alpha_lr_+10%` (α's learning rate 2e-3 →
  2.2e-3), `pie_x1.001` (the π·e of the batch-entropy formula ½·ln(π·e·σ² + 1) scaled by 1.001), `lr_x1.001`
  (the model's learning rate 2e-3 → 2.002e-3).

    python experiments/frontier/repro_perturbations.py --output experiments/frontier/results/vanilla_repro_perturbations.json

It writes, per configuration and variant and run, the change of the test accuracy (in test examples) and the largest
relative change of the test loss, the evaluation losses, the mean training loss and the final per-layer entropies.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a file: the repository root, for `experiments`

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The recipe these configurations were measured with (lr 2e-3, polynomial decay of power 2, a log every 10 steps),
# spelled out: the frontier preset that supplies the defaults has a recipe of its own.
RECIPE = ["--learning_rate", "2e-3", "--lr_scheduler_type", "polynomial", "--logging_steps", "10"]
CONFIGS = {
    # The configuration of the reproducibility test (experiments/frontier/results/vanilla_repro_depth4.json).
    "depth4_50steps": ["--depths", "4", "--runs", "baseline,lbe", "--num_seeds", "1", "--max_steps", "50",
                       "--eval_steps", "25", *RECIPE],
    # The test's former configuration (experiments/frontier/results/vanilla_repro_depth20.json): a deeper chain, 4x the steps.
    "depth20_200steps": ["--depths", "20", "--runs", "lbe", "--num_seeds", "1", "--max_steps", "200",
                         "--eval_steps", "100", *RECIPE],
}

NO_SIMD = {"ATEN_CPU_CAPABILITY": "default", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2", "ONEDNN_MAX_CPU_ISA": "SSE41"}
LAST_BITS = {
    "threads2": ({"OMP_NUM_THREADS": "2"}, ["--torch_threads", "2"]),
    "ulp": ({"REPRO_PERTURB_ULP": "1"}, []),
    "avx2": ({"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}, []),
    "no_simd": (NO_SIMD, []),
    "no_simd_threads2": ({**NO_SIMD, "OMP_NUM_THREADS": "2"}, ["--torch_threads", "2"]),
    "mkl_cbwr": ({"MKL_CBWR": "COMPATIBLE"}, []),
}
CODE_CHANGES = {
    "beta_0.49": ({}, ["--lbe_beta", "0.49"]),
    "alpha0_2.02": ({}, ["--lbe_alpha", "2.02"]),
    "alpha_lr_+10%": ({}, ["--lbe_alpha_learning_rate", "2.2e-3"]),
    "pie_x1.001": ({"REPRO_PERTURB_PIE": "1.001"}, []),
    "lr_x1.001": ({}, ["--learning_rate", "2.002e-3"]),
}


def child(argv: list[str]) -> None:
    """In the fresh process: apply the in-process perturbations, run the script, print the figures as JSON."""
    import torch

    import experiments.frontier as frontier

    if os.environ.get("REPRO_PERTURB_ULP"):
        getitem = frontier.ImageTensorDataset.__getitem__

        def perturbed(self, i):
            item = getitem(self, i)
            x = item["pixel_values"]
            item["pixel_values"] = torch.nextafter(x, torch.full_like(x, float("inf")))
            return item

        frontier.ImageTensorDataset.__getitem__ = perturbed
    if os.environ.get("REPRO_PERTURB_PIE"):
        import hf_batch_entropy.entropy as entropy

        entropy.PI_E *= float(os.environ["REPRO_PERTURB_PIE"])
    report = frontier.main(argv)
    keys = ("name", "test_accuracy", "test_loss", "train_loss", "entropies_end", "eval_curve")
    print("FIGURES " + json.dumps([{k: r[k] for k in keys} for r in report["runs"]]))


def run(argv: list[str], env: dict[str, str], output_dir: str) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO, **env}
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--"] + argv + [
        "--workers", "1", "--output_dir", output_dir]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(next(line for line in out.splitlines() if line.startswith("FIGURES "))[len("FIGURES "):])


def compare(ref: list[dict], new: list[dict]) -> list[dict]:
    def rel(a, b):
        return float(np.max(np.abs(np.asarray(b, dtype=float) / np.asarray(a, dtype=float) - 1)))

    return [{
        "run": a["name"],
        "test_examples_moved": round((b["test_accuracy"] - a["test_accuracy"]) * 360),
        "test_loss_rel": rel(a["test_loss"], b["test_loss"]),
        "eval_loss_rel": rel([e["loss"] for e in a["eval_curve"]], [e["loss"] for e in b["eval_curve"]]),
        "train_loss_rel": rel(a["train_loss"], b["train_loss"]),
        "entropies_rel": rel(a["entropies_end"], b["entropies_end"]),
    } for a, b in zip(ref, new)]


def main() -> None:
    if "--child" in sys.argv:
        child(sys.argv[sys.argv.index("--") + 1:])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default=None, help="write the figures as JSON here")
    parser.add_argument("--work_dir", default="runs/repro_perturbations", help="the runs' output folders")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    cli = parser.parse_args()
    results = {}
    for config in cli.configs:
        argv = CONFIGS[config]
        ref = run(argv, {}, os.path.join(cli.work_dir, config, "ref"))
        rows = {}
        for group in (LAST_BITS, CODE_CHANGES):
            for variant, (env, extra) in group.items():
                rows[variant] = compare(ref, run(argv + extra, env, os.path.join(cli.work_dir, config, variant)))
                for row in rows[variant]:
                    print(f"{config:17s} {variant:17s} {row['run']:22s} {row['test_examples_moved']:+3d} examples  "
                          f"test loss {row['test_loss_rel']:.1e}  eval losses {row['eval_loss_rel']:.1e}  "
                          f"train loss {row['train_loss_rel']:.1e}  entropies {row['entropies_rel']:.1e}", flush=True)
        worst = {key: max(row[key] for v in LAST_BITS for row in rows[v])
                 for key in ("test_loss_rel", "eval_loss_rel", "train_loss_rel", "entropies_rel")}
        results[config] = {"argv": argv, "last_bit_variants": list(LAST_BITS), "code_change_variants": list(CODE_CHANGES),
                           "worst_last_bit_change": worst, "variants": rows}
    import torch

    from experiments.provenance import provenance

    record = {**provenance(sys.argv, cpu_capability=torch.backends.cpu.get_cpu_capability()),
              "configs": results}
    if cli.output:
        with open(cli.output, "w") as f:
            json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()
