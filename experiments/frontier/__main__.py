"""`python -m experiments.frontier [flags]`: the same job as `python scripts/train_vanilla.py [flags]`, recorded in
results.json as the command that ran it."""

import torch

from experiments.frontier.cli import main

if __name__ == "__main__":
    main(program=("-m", "experiments.frontier"))
    if torch.distributed.is_initialized():  # several processes: end cleanly (DeepSpeed ZeRO-3 aborts otherwise)
        torch.distributed.destroy_process_group()
