"""Training runs of a tiny BERT classifier with `BatchEntropyTrainer`, for `tests/test_distributed.py`.

Launched with several processes (`accelerate launch --config_file <ddp.yaml> --num_processes 2
tests/distributed_worker.py ...` or `python -m torch.distributed.run --nproc_per_node 2 ...`, gloo on CPU) and
imported by the tests for the single-process reference runs, so that both sides train exactly the same model on
exactly the same data.

Every run records, per optimizer step and per rank: the batch-entropies, task loss, LBE loss and regularized loss that
the regularizer computed, `α` after the step, the trainer's log history and the final parameters. With `--record-writes`
every file write of the process (Python `open` for writing, `torch.save`, safetensors, `save_pretrained`) is recorded
too, so the test can check that only the main process writes checkpoints and the model card.

Usage (one result file per scenario and rank, `<out>/<scenario>.rank<r>.pt`):

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/distributed_worker.py \
        --out /tmp/x --scenarios sync nosync avg_tokens resume_same

Scenarios: `sync` (lbe_sync_entropy, checkpoints at steps 2 and 4, then `save_model` and a model card), `nosync`,
`avg_tokens` (Transformers' default `average_tokens_across_devices=True`), `resume_same` (resume `sync` from its
step-2 checkpoint), `resume_other` (resume from `--checkpoint`, written by another number of processes) and `unequal`
(lbe_sync_entropy with another sequence length on each rank: the error each rank raised).
"""

from __future__ import annotations

import argparse
import builtins
import functools
import os
import sys

import torch
from torch.utils.data import Dataset
from transformers import TrainerCallback

from conftest import tiny_bert, tiny_bert_config  # the tests' tiny BERT (dropout 0); this script's folder is on sys.path
from hf_batch_entropy import BatchEntropyConfig, BatchEntropyRegularizer, BatchEntropyTrainer

GLOBAL_BATCH = 8
NUM_EXAMPLES = 64
SEQ_LEN = 8
VOCAB = tiny_bert_config().vocab_size


class ToyTextDataset(Dataset):
    """Random token ids and binary labels, the same in every process (fixed generator)."""

    def __init__(self, n: int = NUM_EXAMPLES, seq_len: int = SEQ_LEN, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.input_ids = torch.randint(1, VOCAB, (n, seq_len), generator=g)
        self.labels = torch.randint(0, 2, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {
            "input_ids": self.input_ids[i],
            "attention_mask": torch.ones_like(self.input_ids[i]),
            "labels": self.labels[i],
        }


class Recorder(TrainerCallback):
    """Records what the regularizer computed at every training step, and `α` after every optimizer step."""

    def __init__(self):
        self.trainer: BatchEntropyTrainer | None = None
        self.steps: list[dict[str, torch.Tensor]] = []
        self.alphas: list[torch.Tensor] = []
        self._handle = None

    def on_train_begin(self, args, state, control, **kwargs):
        # The regularizer is built at the first training step: a global forward hook sees it from its first call.
        def hook(module, inputs, out):
            if not isinstance(module, BatchEntropyRegularizer):
                return
            self.steps.append(
                {
                    "entropies": out.entropies.detach().cpu().clone(),
                    "task_loss": out.task_loss.detach().cpu().clone(),
                    "lbe_loss": out.lbe_loss.detach().cpu().clone(),
                    "loss": out.loss.detach().cpu().clone(),
                }
            )

        self._handle = torch.nn.modules.module.register_module_forward_hook(hook)

    def on_step_end(self, args, state, control, **kwargs):
        self.alphas.append(self.trainer.regularizer.alpha.detach().cpu().clone())

    def on_train_end(self, args, state, control, **kwargs):
        if self._handle is not None:
            self._handle.remove()


def train(
    output_dir: str,
    *,
    per_device_batch: int,
    max_steps: int = 4,
    sync: bool = True,
    average_tokens_across_devices: bool = False,
    resume_from_checkpoint: str | None = None,
    save_steps: int | None = None,
    bf16: bool = False,
    torch_compile: bool = False,
    torch_compile_backend: str | None = None,
    seq_len: int = SEQ_LEN,
) -> dict:
    """One short SGD run; returns what it recorded (CPU tensors and plain values)."""
    args = BatchEntropyConfig(
        output_dir=output_dir,
        per_device_train_batch_size=per_device_batch,
        max_steps=max_steps,
        learning_rate=0.1,
        optim="sgd",
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=0.0,  # no clipping: the updates stay linear in the gradients (see the avg_tokens scenario)
        lbe_beta=0.5,
        lbe_alpha=0.8,  # above lbe_alpha_min, so that α gets a gradient and moves
        lbe_alpha_min=0.1,
        lbe_alpha_learning_rate=0.5,
        lbe_sync_entropy=sync,
        average_tokens_across_devices=average_tokens_across_devices,
        logging_steps=1,
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500,
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        bf16=bf16,
        torch_compile=torch_compile,
        torch_compile_backend=torch_compile_backend,
        dataloader_num_workers=0,
        seed=42,
    )
    recorder = Recorder()
    trainer = BatchEntropyTrainer(
        model=tiny_bert(), args=args, train_dataset=ToyTextDataset(seq_len=seq_len), callbacks=[recorder]
    )
    recorder.trainer = trainer
    trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    model = trainer.accelerator.unwrap_model(trainer.model)
    model = getattr(model, "_orig_mod", model)
    return {
        "steps": recorder.steps,
        "alphas": recorder.alphas,
        "alpha": trainer.regularizer.alpha.detach().cpu().clone(),
        "params": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "log_history": trainer.state.log_history,
        "global_step": trainer.state.global_step,
        "world_size": trainer.accelerator.num_processes,
        "rank": trainer.accelerator.process_index,
        "trainer": trainer,
    }


# --- recording file writes ------------------------------------------------------------------------------------------

WRITES: list[str] = []


def record_writes() -> None:
    """Record the path of every file this process writes through the usual channels from now on."""
    real_open = builtins.open

    @functools.wraps(real_open)
    def open_(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and any(c in mode for c in "wax+"):
            WRITES.append(os.fspath(file))
        return real_open(file, mode, *args, **kwargs)

    builtins.open = open_

    def wrap(owner, name: str, path_arg: int, path_kw: str):
        real = getattr(owner, name)

        @functools.wraps(real)
        def wrapper(*args, **kwargs):
            path = kwargs.get(path_kw, args[path_arg] if len(args) > path_arg else None)
            if isinstance(path, (str, os.PathLike)):
                WRITES.append(os.fspath(path))
            return real(*args, **kwargs)

        setattr(owner, name, wrapper)

    import safetensors.torch
    import transformers.modeling_utils as modeling_utils
    from transformers import PreTrainedModel

    wrap(torch, "save", 1, "f")
    wrap(safetensors.torch, "save_file", 1, "filename")
    if hasattr(modeling_utils, "safe_save_file"):
        wrap(modeling_utils, "safe_save_file", 1, "filename")
    wrap(PreTrainedModel, "save_pretrained", 1, "save_directory")


# --- scenarios (run in every process) -------------------------------------------------------------------------------


def run_scenario(name: str, out: str, world_size: int, checkpoint: str | None = None) -> dict:
    batch = GLOBAL_BATCH // world_size
    if name == "sync":
        # The reference for 1 × 8: synchronized entropies, checkpoints at steps 2 and 4, then a model card.
        result = train(os.path.join(out, "sync"), per_device_batch=batch, sync=True, save_steps=2)
        result["trainer"].save_model()
        result["trainer"].create_model_card(model_name="tiny-bert-lbe")
        return result
    if name == "nosync":
        # Each rank's own entropies: they differ between ranks, α must not.
        return train(os.path.join(out, "nosync"), per_device_batch=batch, sync=False, max_steps=3)
    if name == "avg_tokens":
        # Transformers' default average_tokens_across_devices=True: see test_average_tokens_scaling.
        return train(
            os.path.join(out, "avg_tokens"), per_device_batch=batch, max_steps=1, average_tokens_across_devices=True
        )
    if name == "resume_same":
        # Resume the `sync` run from its step-2 checkpoint with the same number of processes.
        checkpoint = os.path.join(out, "sync", "checkpoint-2")
        return train(os.path.join(out, "resume_same"), per_device_batch=batch, sync=True, resume_from_checkpoint=checkpoint)
    if name == "resume_other":
        # Resume a run saved by a different number of processes (`--checkpoint`, e.g. a 1 × 8 run's checkpoint-2).
        if checkpoint is None:
            raise ValueError("Scenario resume_other needs --checkpoint.")
        return train(os.path.join(out, "resume_other"), per_device_batch=batch, sync=True, resume_from_checkpoint=checkpoint)
    if name == "unequal":
        # Each rank's sequences have another length (as with dynamic padding): the same clear error on every rank.
        rank = int(os.environ.get("RANK", "0"))
        try:
            train(os.path.join(out, "unequal"), per_device_batch=batch, sync=True, max_steps=1, seq_len=SEQ_LEN + rank)
        except ValueError as err:
            return {"error": str(err), "trainer": None}
        return {"error": None, "trainer": None}
    raise ValueError(f"Unknown scenario {name!r}.")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--scenarios", nargs="+", required=True)
    parser.add_argument("--record-writes", action="store_true")
    parser.add_argument("--checkpoint", help="checkpoint for the resume_other scenario")
    args = parser.parse_args(argv)
    save = torch.save  # before record_writes wraps it: the results themselves are not writes under test
    if args.record_writes:
        record_writes()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    for name in args.scenarios:
        result = run_scenario(name, args.out, world_size, args.checkpoint)
        result.pop("trainer")
        result["writes"] = list(WRITES)
        WRITES.clear()
        save(result, os.path.join(args.out, f"{name}.rank{rank}.pt"))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
