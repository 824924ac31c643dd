"""A training script for `tests/test_engines.py`: the tiny BERT classifier trained by `BatchEntropyTrainer` under
whatever engine the launcher chose (DDP, FSDP2, DeepSpeed ZeRO-2/3), run the way a user runs a training script:

    accelerate launch --config_file <bundled config> --num_processes 2 tests/engine_worker.py --out DIR --use_cpu

The engine comes from the launch alone (Accelerate's environment variables), not from the script. `--use_cpu` is
`TrainingArguments.use_cpu`: the processes train on CPU with gloo. For FSDP2 on CPU the test sets
`HF_BATCH_ENTROPY_TEST_FSDP_CPU=1` and the script installs the test-only shim `tests/fsdp_cpu_shim.py` (see its
docstring); on GPUs nothing of the kind is needed. `--bf16` instead of `--use_cpu` on GPUs (`scripts/gpu_check.sh`).

Parts (`--parts`, in this order, in the same processes):

- `full`: 6 optimizer steps, a checkpoint at step 3, then `save_model()` into `<out>/full`;
- `resume`: a new trainer resumes `<out>/full/checkpoint-3` and trains steps 4-6 into `<out>/resume`;
- `plain`: the same run with plain `transformers.Trainer` (the control: the engine runs without LBE too);
- `llama`: a tiny `LlamaForCausalLM` (a decoder with untied embeddings and a final norm, as for SFT), 2 steps, then
  `save_model()` into `<out>/llama`: the configuration's wrapping and saving work beyond BERT.

Each part writes `<out>/<part>.rank<r>.pt`: per training step the entropies and losses the regularizer computed, `α`
after every optimizer step, what the engine is (distributed type, ZeRO stage, DTensor parameters), and on rank 0 the
full (gathered) state dict of the trained model.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys

import torch
from transformers import Trainer, TrainingArguments

from distributed_worker import Recorder, ToyTextDataset, tiny_bert  # this script's folder is on sys.path
from hf_batch_entropy import BatchEntropyConfig, BatchEntropyTrainer

PER_DEVICE_BATCH = 4
MAX_STEPS = 6
CHECKPOINT_STEP = 3


def training_arguments(output_dir: str, use_cpu: bool, plain: bool = False, **overrides) -> TrainingArguments:
    kwargs = dict(
        output_dir=output_dir,
        per_device_train_batch_size=PER_DEVICE_BATCH,
        max_steps=MAX_STEPS,
        learning_rate=1e-2,
        optim="adamw_torch",
        lr_scheduler_type="constant",
        weight_decay=0.0,
        logging_steps=1,
        save_strategy="steps",
        save_steps=CHECKPOINT_STEP,
        report_to="none",
        disable_tqdm=True,
        use_cpu=use_cpu,
        dataloader_num_workers=0,
        average_tokens_across_devices=False,
        seed=42,
    )
    kwargs.update(overrides)
    if plain:
        return TrainingArguments(**kwargs)
    return BatchEntropyConfig(
        **kwargs, lbe_beta=0.5, lbe_alpha=0.8, lbe_alpha_min=0.1, lbe_alpha_learning_rate=0.05
    )


def engine_facts(trainer: Trainer) -> dict:
    """What actually trained: a silent fallback to DDP shows here."""
    from torch.distributed.tensor import DTensor

    accelerator = trainer.accelerator
    params = list(trainer.model.parameters())

    def numel(p, local: bool) -> int:
        if isinstance(p, DTensor):  # FSDP2: this rank's shard of a DTensor
            return p.to_local().numel() if local else p.numel()
        if hasattr(p, "ds_tensor"):  # DeepSpeed ZeRO-3: this rank's partition; p itself is an empty placeholder
            return p.ds_tensor.numel() if local else p.ds_numel
        return p.numel()

    facts = {
        "distributed_type": accelerator.distributed_type.name,
        "model_class": type(trainer.model).__name__,
        "wrapped_class": type(trainer.model_wrapped).__name__,
        "optimizer_class": type(getattr(trainer.optimizer, "optimizer", trainer.optimizer)).__name__,
        "num_params": len(params),
        "dtensor_params": sum(isinstance(p, DTensor) for p in params),
        "zero3_partitioned_params": sum(hasattr(p, "ds_tensor") for p in params),
        "numel": sum(numel(p, local=False) for p in params),
        "local_numel": sum(numel(p, local=True) for p in params),
        "zero_stage": None,
    }
    if trainer.is_deepspeed_enabled:
        facts["zero_stage"] = trainer.model_wrapped.zero_optimization_stage()
        facts["zero_optimizer_class"] = type(trainer.model_wrapped.optimizer).__name__
    if getattr(accelerator.state, "fsdp_plugin", None) is not None:
        facts["fsdp_version"] = accelerator.state.fsdp_plugin.fsdp_version
        facts["fsdp_state_dict_type"] = str(accelerator.state.fsdp_plugin.state_dict_type)
    return facts


class ToyCausalLMDataset(ToyTextDataset):
    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {**super().__getitem__(i), "labels": self.input_ids[i]}


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=False,
    )  # fmt: skip
    return LlamaForCausalLM(config)


class ToyPixelDataset(torch.utils.data.Dataset):
    def __init__(self, n: int = 32):
        g = torch.Generator().manual_seed(0)
        self.pixels, self.labels = torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.pixels[i], "labels": self.labels[i]}


def tiny_vanilla_mlp():
    from experiments.models import VanillaMLPConfig, VanillaMLPForImageClassification

    torch.manual_seed(0)
    return VanillaMLPForImageClassification(VanillaMLPConfig(depth=6, width=16))


def run(part: str, out: str, use_cpu: bool, bf16: bool = False) -> dict:
    plain = part == "plain"
    output_dir = os.path.join(out, part)
    overrides = {"max_steps": 2, "save_strategy": "no"} if part in ("llama", "vanilla") else {}
    overrides["bf16"] = bf16
    args = training_arguments(output_dir, use_cpu, plain=plain, **overrides)
    recorder = Recorder()
    trainer_class = Trainer if plain else BatchEntropyTrainer
    model, data = tiny_bert(), ToyTextDataset()
    if part == "llama":
        model, data = tiny_llama(), ToyCausalLMDataset()
    elif part == "vanilla":
        model, data = tiny_vanilla_mlp(), ToyPixelDataset()
    trainer = trainer_class(model=model, args=args, train_dataset=data, callbacks=[recorder])
    recorder.trainer = trainer
    if plain:
        recorder.on_step_end = lambda *a, **k: None  # no α
    checkpoint = os.path.join(out, "full", f"checkpoint-{CHECKPOINT_STEP}") if part == "resume" else None
    trainer.train(resume_from_checkpoint=checkpoint)
    trainer.save_model()  # collective under FSDP and DeepSpeed: every rank calls it
    facts = engine_facts(trainer)
    state_dict = trainer.accelerator.get_state_dict(
        trainer.model_wrapped if trainer.is_deepspeed_enabled else trainer.model
    )  # collective; the full tensors on rank 0
    result = {
        "part": part,
        "package_file": sys.modules["hf_batch_entropy"].__file__,
        "rank": trainer.accelerator.process_index,
        "world_size": trainer.accelerator.num_processes,
        "engine": facts,
        "steps": recorder.steps,
        "alphas": recorder.alphas,
        "alpha": None if plain else trainer.regularizer.alpha.detach().cpu().clone(),
        "log_history": trainer.state.log_history,
        "global_step": trainer.state.global_step,
        "state_dict": (
            {k: v.detach().cpu().clone() for k, v in state_dict.items()}
            if trainer.accelerator.is_main_process
            else None
        ),
    }
    trainer.accelerator.wait_for_everyone()
    return result


def skip_deepspeed_shm_build() -> None:
    """On CPU, DeepSpeed compiles a shared-memory all-reduce (a C++ build of about a minute on 2 cores, cached in
    ~/.cache/torch_extensions) when its communication backend starts. Only its inference all-reduce uses it; training's
    collectives are torch.distributed's (gloo). The test marks it unavailable to save the build; the run is the same."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
        return
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--parts", nargs="+", default=["full", "resume"], choices=["full", "resume", "plain", "llama", "vanilla"])
    parser.add_argument("--use_cpu", action="store_true", help="TrainingArguments.use_cpu (gloo on CPU)")
    parser.add_argument("--bf16", action="store_true", help="TrainingArguments.bf16 (GPUs)")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    if os.environ.get("HF_BATCH_ENTROPY_TEST_FSDP_CPU") == "1":
        import fsdp_cpu_shim  # this script's folder is on sys.path

        fsdp_cpu_shim.install()
    skip_deepspeed_shm_build()
    for part in args.parts:
        result = run(part, args.out, args.use_cpu, args.bf16)
        torch.save(result, os.path.join(args.out, f"{part}.rank{result['rank']}.pt"))
        # Free the finished trainer and its engine now, while the process group exists: with two ZeRO-3 engines left
        # to the interpreter's shutdown a process sometimes aborted there ("terminate called without an active
        # exception") even after destroy_process_group().
        gc.collect()
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
        print(f"process group destroyed (rank {result['rank']})", flush=True)


if __name__ == "__main__":
    sys.exit(main())
