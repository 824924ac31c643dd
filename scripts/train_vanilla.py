#!/usr/bin/env python
# coding=utf-8
r"""The trainability frontier of vanilla deep networks (no skip connections, no normalization, no dropout) with and
without layerwise batch-entropy regularization (LBE), the headline experiment of Peer et al., TMLR 2022.

For every depth of a ladder (default 10, 30, 100, 500) and every seed, the same network, from the same initialization,
is trained twice through `BatchEntropyTrainer`:

- `baseline`: `lbe_beta = 0`, i.e. plain cross-entropy (the trainer still measures and logs the batch-entropies);
- `lbe`:      L = L_task + β·mean_l((H_l − max(α_min, |α_l|))²)·L_task,

plus, once per seed, a shallow, well-initialized network (`ceiling`: depth 2, He-normal weights, zero biases, no
LBE) as the accuracy that this data and recipe allow. Seed i uses the training seed `--seed + i` (initialization and
batch order) and the split seed `--split_seed + i` (train/test split). Independent runs go to `--workers` processes
of one thread each.

It prints one line per run as it finishes (run k of N, run kind, depth, seed, test accuracy, seconds, estimated time
left for the job), then the table (test accuracy, mean ± std over the seeds, per depth) and what it means. It writes
into `--output_dir`:

- `results.json`: `meta` (the exact command, commit and whether the tree was dirty, library versions, machine),
  `summary` (per run kind and depth: mean and std of the test accuracy over the seeds) and `runs` (one entry per run:
  settings, final metrics, per-layer entropies at the end, and the evaluation curve against steps and wall time with
  the effective rank of a few layers);
- `frontier.png` (two depths or more): test accuracy against depth (log axis, error bars = std over seeds, the
  ceiling as a band), and the per-layer batch-entropy over training of the deepest pair (log colour scale);
- `batch_entropy.png` (a single depth): the per-layer batch-entropy over training of each run of the first seed;
- one folder per run (`lbe_depth500_seed0/`, ...) with `trainer_log.jsonl` (every Trainer log dict, one JSON object
  per line: losses, LBE metrics, per-layer batch-entropies) and `run.log` (the run's settings, which layers LBE
  measures, warnings). `--verbose` prints both on stdout as well.

Default (`--preset frontier`): ReLU MLPs of width 64 on scikit-learn's bundled 8×8 digits (no download), 3 seeds; the
README gives the measured time. Examples:

    python scripts/train_vanilla.py                                   # the frontier (digits, depths 10…500, 3 seeds)
    python scripts/train_vanilla.py --preset long                     # the depth-500 recipe that learns (one seed)
    python scripts/train_vanilla.py --preset depth50                  # the depth-50 recipe
    python scripts/train_vanilla.py --depths 500 --num_seeds 1        # one pair (baseline, LBE) at depth 500
    python scripts/train_vanilla.py --arch cnn --depth 150 --width 8 --num_seeds 1 --output_dir vanilla_cnn
    python scripts/train_vanilla.py --dataset mnist --depths 500 --width 1000 ...   # the paper's setting, on a GPU
    python scripts/train_vanilla.py --help                            # every flag, explained

A preset is a list of flags (`PRESETS` in experiments/frontier/arguments.py) put in front of the command line's
own, which override it. Every `BatchEntropyConfig` / `TrainingArguments` flag is accepted (`--learning_rate`,
`--max_steps`, `--lbe_beta`, ...). See experiments/frontier/vanilla.md for the measurements behind the defaults.

This script is the job's door: the code is the package `experiments.frontier` (arguments, data, runs, report,
plot, cli), and `python -m experiments.frontier` runs the same job.
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # experiments/ is research code, not installed

from experiments.frontier.cli import main  # noqa: E402

if __name__ == "__main__":
    main()
    if torch.distributed.is_initialized():  # several processes: end cleanly (DeepSpeed ZeRO-3 aborts otherwise)
        torch.distributed.destroy_process_group()
