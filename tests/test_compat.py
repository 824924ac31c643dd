"""The private reads and implicit `Trainer` contracts listed in `hf_batch_entropy._compat`, each checked against the
installed transformers / accelerate / torch (CI runs this file on the oldest and the newest transformers allowed)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from transformers import Trainer, TrainerCallback, get_scheduler

from conftest import TinyMLP, make_args, vector_dataset
from hf_batch_entropy import _compat


def plain_trainer(tmp_path, trainer_class=Trainer, **overrides):
    torch.manual_seed(0)
    args = make_args(tmp_path, plain=True, **overrides)
    return trainer_class(model=TinyMLP(), args=args, train_dataset=vector_dataset(), eval_dataset=vector_dataset(16))


# --- private reads ------------------------------------------------------------------------------------------------


def test_grad_scaler_scale_is_the_device_tensor():
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    w = torch.ones(2, requires_grad=True)
    scaler.scale((w * 2).sum())  # creates the scale tensor lazily
    scale = _compat.grad_scaler_scale(scaler)
    assert isinstance(scale, torch.Tensor) and float(scale) == 1024.0 == scaler.get_scale()


def test_deepspeed_loss_scale_reads_the_engine_optimizer():
    class Optimizer:
        loss_scale = 256.0

    class Engine:
        optimizer = Optimizer()

    assert _compat.deepspeed_loss_scale(Engine()) == 256.0 and _compat.deepspeed_loss_scale(object()) is None


def test_deepspeed_zero_optimizer_has_a_loss_scale():
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3

    for optimizer_class in (DeepSpeedZeroOptimizer, DeepSpeedZeroOptimizer_Stage3):
        assert any("loss_scale" in vars(c) for c in optimizer_class.__mro__), f"{optimizer_class.__name__}.loss_scale"


def test_inner_optimizer_of_accelerates_wrapper(tmp_path):
    trainer = plain_trainer(tmp_path, max_steps=1)
    trainer.train()
    inner = _compat.inner_optimizer(trainer.optimizer)
    assert type(trainer.optimizer).__name__ == "AcceleratedOptimizer"
    assert isinstance(inner, torch.optim.AdamW) and _compat.inner_optimizer(inner) is inner


@pytest.mark.parametrize("name", ["linear", "cosine", "polynomial", "constant_with_warmup"])
def test_lambda_lr_factor_is_the_schedules_factor(name):
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = get_scheduler(name, optimizer, num_warmup_steps=2, num_training_steps=10)
    for _ in range(4):
        optimizer.step()
        scheduler.step()
        assert _compat.lambda_lr_factor(scheduler) == pytest.approx(optimizer.param_groups[0]["lr"] / 0.1, abs=1e-12)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer)
    assert _compat.lambda_lr_factor(plateau) is None


def test_order_backward_moves_the_node_next_to_its_deepest_input():
    x = torch.randn(4, 3, requires_grad=True)
    layers = [x * 2]
    layers.append(layers[-1].relu())
    deepest = layers[-1].grad_fn._sequence_nr()
    out = torch.stack(layers).sum()
    assert out.grad_fn._sequence_nr() > deepest
    assert _compat.order_backward(out, layers)
    assert out.grad_fn._sequence_nr() == deepest
    with torch.no_grad():
        assert not _compat.order_backward(torch.ones(1), layers)


# --- Trainer's implicit contracts ---------------------------------------------------------------------------------


def test_a_training_steps_return_is_what_trainer_logs(tmp_path):
    """(a): the logged loss is the mean of `training_step`'s returns over the window."""
    returned = []

    class Recording(Trainer):
        def training_step(self, *args, **kwargs):
            loss = super().training_step(*args, **kwargs) + 1000.0  # what the mixin returns: task + LBE
            returned.append(loss.item())
            return loss

    trainer = plain_trainer(tmp_path, Recording, max_steps=4, logging_steps=2)
    trainer.train()
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert logged == pytest.approx([sum(returned[:2]) / 2, sum(returned[2:4]) / 2], rel=1e-4)


def test_b_loss_marks_training_logs_and_the_window_is_global_steps(tmp_path):
    """(b): `log()` gets "loss" exactly in training logs, every `logging_steps` optimizer steps; Trainer has already
    moved its own window start (`_globalstep_last_logged`) to the current step then, so the mixin keeps its own."""
    seen = []

    class Recording(Trainer):
        def log(self, logs, *args, **kwargs):
            seen.append(("loss" in logs, self.state.global_step, self._globalstep_last_logged, dict(logs)))
            return super().log(logs, *args, **kwargs)

    trainer = plain_trainer(tmp_path, Recording, max_steps=6, logging_steps=3, eval_strategy="steps", eval_steps=3)
    trainer.train()
    training = [(step, last) for has_loss, step, last, logs in seen if has_loss and "train_runtime" not in logs]
    assert [step for step, _ in training] == [3, 6]
    assert [step - last for step, last in training] == [0, 0]
    assert all("loss" not in logs for has_loss, _, _, logs in seen if "eval_loss" in logs)


def test_c_on_optimizer_step_comes_before_the_scheduler_step(tmp_path):
    """(c): at `on_optimizer_step` the learning rate is still the one the step used."""
    rates = []

    class Spy(TrainerCallback):
        def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
            rates.append((state.global_step, optimizer.param_groups[0]["lr"]))

    trainer = plain_trainer(tmp_path, max_steps=4, learning_rate=1.0, lr_scheduler_type="linear")
    trainer.add_callback(Spy())
    trainer.train()
    # Linear decay over 4 steps: step k (0-based, global_step k before the increment) runs at 1 − k/4.
    assert rates == [(k, pytest.approx(1.0 - k / 4)) for k in range(4)]


def test_d_checkpoints_go_through_save_model(tmp_path):
    calls = []

    class Recording(Trainer):
        def save_model(self, output_dir=None, _internal_call=False):
            calls.append((output_dir, _internal_call))
            return super().save_model(output_dir, _internal_call)

    trainer = plain_trainer(tmp_path, Recording, max_steps=2, save_strategy="steps", save_steps=1)
    trainer.train()
    assert [(c[0].rsplit("/", 1)[-1], c[1]) for c in calls] == [("checkpoint-1", True), ("checkpoint-2", True)]


def test_e_optimizer_is_none_until_the_first_train(tmp_path):
    trainer = plain_trainer(tmp_path, max_steps=1)
    assert trainer.optimizer is None
    trainer.train()
    assert trainer.optimizer is not None
    model = TinyMLP()
    own = torch.optim.SGD(model.parameters(), lr=0.1)
    given = Trainer(model=model, args=make_args(tmp_path, plain=True), train_dataset=vector_dataset(),
                    optimizers=(own, None))
    assert given.optimizer is own


def test_f_load_best_model_at_end_goes_through_load_best_model(tmp_path):
    calls = []

    class Recording(Trainer):
        def _load_best_model(self):
            calls.append(self.state.best_model_checkpoint)
            return super()._load_best_model()

    trainer = plain_trainer(tmp_path, Recording, max_steps=2, save_strategy="steps", save_steps=1, eval_strategy="steps",
                            eval_steps=1, load_best_model_at_end=True)
    trainer.train()
    assert len(calls) == 1 and calls[0].rsplit("/", 1)[-1].startswith("checkpoint-")


def test_g_events_go_through_the_callback_handler_object(tmp_path):
    """(g): Trainer calls its events on `self.callback_handler`, so a subclass given to that one object sees each of
    them, and the user's callback list is untouched."""
    events = []

    class Recording(type(plain_trainer(tmp_path).callback_handler)):
        def on_optimizer_step(self, args, state, control):
            events.append(state.global_step)
            return super().on_optimizer_step(args, state, control)

    trainer = plain_trainer(tmp_path, max_steps=3)
    before = list(trainer.callback_handler.callbacks)
    trainer.callback_handler.__class__ = Recording
    trainer.train()
    assert events == [0, 1, 2] and trainer.callback_handler.callbacks == before


# --- private reads of the second kind: Trainer's, TRL's, PEFT's, torch's --------------------------------------------


def test_prepare_inputs_puts_the_batch_on_the_device_and_twice_is_once(tmp_path):
    trainer = plain_trainer(tmp_path)
    batch = {"x": torch.randn(4, 8), "labels": torch.tensor([0, 1, 2, 0])}
    once = _compat.prepare_inputs(trainer, batch)
    twice = _compat.prepare_inputs(trainer, once)
    assert all(v.device == trainer.args.device for v in once.values())
    assert once.keys() == twice.keys() and all(torch.equal(once[k], twice[k]) for k in once)


class ReturnsLoss(torch.nn.Module):
    """A model that returns a loss without labels when asked (`return_loss`, True by default), as CLIP does."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(8, 3)

    def forward(self, x, labels=None, return_loss=True):
        logits = self.linear(x)
        return {"loss": logits.pow(2).mean(), "logits": logits} if return_loss else {"logits": logits}


@pytest.mark.parametrize(
    "case", ["labels", "no-labels", "no-label-names", "no-label-names-no-loss", "other-label-name-missing"]
)
def test_prediction_uses_compute_loss_is_trainers_own_decision(tmp_path, case):
    """The copy decides as `Trainer.prediction_step` does: it says yes exactly when that calls `compute_loss`."""
    calls = []

    class Spy(Trainer):
        def compute_loss(self, *args, **kwargs):
            calls.append(True)
            return super().compute_loss(*args, **kwargs)

    torch.manual_seed(0)
    x, labels = torch.randn(4, 8), torch.tensor([0, 1, 2, 0])
    overrides = {"label_names": []} if case.startswith("no-label-names") else {}
    overrides = {"label_names": ["y"]} if case == "other-label-name-missing" else overrides
    model = ReturnsLoss() if case.startswith("no-label-names") else TinyMLP()
    trainer = Spy(model=model, args=make_args(tmp_path, plain=True, **overrides))
    inputs = {"x": x, "labels": labels} if case in ("labels", "other-label-name-missing") else {"x": x}
    if case == "no-label-names-no-loss":
        inputs["return_loss"] = False
    decided = _compat.prediction_uses_compute_loss(trainer, inputs, False, Trainer)
    trainer.prediction_step(trainer.model, dict(inputs), prediction_loss_only=False)
    assert decided == bool(calls)
    assert decided == (case in ("labels", "no-label-names"))


def test_prediction_with_generate_or_another_trainers_step_counts_as_compute_loss(tmp_path):
    from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments

    args = Seq2SeqTrainingArguments(output_dir=str(tmp_path), predict_with_generate=True, report_to="none", use_cpu=True)
    trainer = Seq2SeqTrainer(model=TinyMLP(), args=args)
    assert _compat.prediction_uses_compute_loss(trainer, {"x": torch.ones(2, 8)}, False, Seq2SeqTrainer)
    assert not _compat.prediction_uses_compute_loss(trainer, {"x": torch.ones(2, 8)}, True, Seq2SeqTrainer)
    assert _compat.prediction_uses_compute_loss(trainer, {"x": torch.ones(2, 8)}, True, type("Other", (Trainer,), {}))


def test_trl_packing_and_padding_free_are_where_packs_sequences_reads_them(tmp_path):
    trl = pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import DataCollatorWithFlattening, LlamaConfig, LlamaForCausalLM

    from conftest import word_tokenizer

    fields = {f.name for f in __import__("dataclasses").fields(trl.SFTConfig)}
    assert {"packing", "padding_free", "packing_strategy"} <= fields
    tokenizer = word_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                         max_position_embeddings=32, pad_token_id=0, eos_token_id=1))
    data = Dataset.from_dict({"text": ["the cat sat", "a dog ran on the mat"] * 4})
    common = dict(output_dir=str(tmp_path), report_to="none", use_cpu=True, bf16=False, max_length=16)
    # packing with the default "bfd" strategy: SFTTrainer turns padding_free on itself, its config says packing only.
    packed = trl.SFTTrainer(model=model, args=trl.SFTConfig(packing=True, **common), train_dataset=data,
                            processing_class=tokenizer)
    assert packed.padding_free is True and _compat.packs_sequences(packed)
    plain = trl.SFTTrainer(model=model, args=trl.SFTConfig(**common), train_dataset=data, processing_class=tokenizer)
    assert plain.padding_free is False and not _compat.packs_sequences(plain)
    flattening = Trainer(model=TinyMLP(), args=make_args(tmp_path, plain=True), data_collator=DataCollatorWithFlattening())
    assert _compat.packs_sequences(flattening) and not _compat.packs_sequences(plain_trainer(tmp_path))


def test_peft_prompt_learning_config_names_its_method_and_virtual_tokens():
    peft = pytest.importorskip("peft")
    from conftest import tiny_bert

    prompt = peft.get_peft_model(tiny_bert(), peft.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=3))
    assert _compat.prompt_learning_config(prompt) == ("PROMPT_TUNING", 3)
    prefix = peft.get_peft_model(tiny_bert(), peft.PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=2))
    assert _compat.prompt_learning_config(prefix) == ("PREFIX_TUNING", 2)
    lora = peft.get_peft_model(tiny_bert(), peft.LoraConfig(task_type="SEQ_CLS", target_modules=["query"]))
    assert _compat.prompt_learning_config(lora) is None and _compat.prompt_learning_config(tiny_bert()) is None


def test_conv_layers_is_the_base_of_every_convolution():
    for layer in (torch.nn.Conv1d(1, 1, 1), torch.nn.Conv2d(1, 1, 1), torch.nn.Conv3d(1, 1, 1),
                  torch.nn.ConvTranspose2d(1, 1, 1), torch.nn.LazyConv2d(1, 1)):
        assert isinstance(layer, _compat.CONV_LAYERS), type(layer).__name__
    assert not isinstance(torch.nn.Linear(1, 1), _compat.CONV_LAYERS)


def test_squared_difference_and_its_backward_round_as_the_operators_they_replace():
    """ATen's `mse_loss` without reduction (into `out`, in place too) is `(x − μ)²` as `sub` then `square` round it,
    and its backward op is `(x − μ)·(2·g)`, bit for bit; the estimator's values and gradients rest on both."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 7, 33, generator=g) * 5 + 2
    mean = x.mean(dim=1, keepdim=True)
    expected = (x - mean).square()
    assert torch.equal(_compat.squared_difference(x, mean.expand_as(x)), expected)
    inplace = x.clone()
    assert torch.equal(_compat.squared_difference(inplace, mean.expand_as(x), out=inplace), expected)
    assert torch.equal(inplace, expected)
    layer, grad = x[0], torch.randn(1, 33, generator=g)
    assert torch.equal(_compat.squared_difference_backward(grad, layer, mean[0]), (layer - mean[0]) * (2 * grad))


def test_trainer_writes_its_model_card_where_model_card_path_says(tmp_path):
    from conftest import tiny_bert

    trainer = Trainer(model=tiny_bert(), args=make_args(tmp_path, plain=True))
    trainer.create_model_card(model_name="tiny")
    path = _compat.model_card_path(trainer.args.output_dir)
    assert os.path.isfile(path) and "tiny" in open(path, encoding="utf-8").read()


# Contract (h) exists where Trainer clips through `_clip_grad_norm` (not in the oldest transformers CI tests): there the
# frontier's override is never called and Trainer clips as usual, so the frontier's figures are unchanged.
needs_clip_grad_norm = pytest.mark.skipif(not hasattr(Trainer, "_clip_grad_norm"),
                                          reason="this transformers' Trainer has no _clip_grad_norm")


@needs_clip_grad_norm
def test_h_clip_grad_norm_is_called_once_per_step_before_the_optimizer_events_and_logged(tmp_path):
    order = []

    class Recording(Trainer):
        def _clip_grad_norm(self, model):
            order.append("clip")
            assert model is self.model_wrapped
            super()._clip_grad_norm(model)
            return torch.tensor(123.0)

    class Spy(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            order.append("pre")

    trainer = plain_trainer(tmp_path, Recording, max_steps=2, logging_steps=1, max_grad_norm=1.0)
    trainer.add_callback(Spy())
    trainer.train()
    assert order == ["clip", "pre", "clip", "pre"]
    assert [h["grad_norm"] for h in trainer.state.log_history if "loss" in h] == [123.0, 123.0]


@needs_clip_grad_norm
@pytest.mark.parametrize("max_grad_norm", [1e-3, 1e3], ids=["clipped", "below-the-limit"])
def test_h_the_frontiers_clip_gives_trainers_gradients_and_norm(tmp_path, max_grad_norm):
    frontier = pytest.importorskip("experiments.frontier.runs")
    trainer = frontier.VanillaTrainer(model=TinyMLP(), args=make_args(tmp_path, max_grad_norm=max_grad_norm))
    assert "_clip_grad_norm" in vars(frontier.VanillaTrainer) and hasattr(Trainer, "_clip_grad_norm")
    torch.manual_seed(0)
    grads = [torch.randn_like(p) for p in trainer.model.parameters()]
    norms = {}
    for name, clip in (("trainer", Trainer._clip_grad_norm), ("frontier", frontier.VanillaTrainer._clip_grad_norm)):
        for p, g in zip(trainer.model.parameters(), grads):
            p.grad = g.clone()
        trainer._clip_parameters = None
        norms[name] = (clip(trainer, trainer.model), [p.grad.clone() for p in trainer.model.parameters()])
    assert torch.equal(norms["trainer"][0], norms["frontier"][0])
    assert all(torch.equal(a, b) for a, b in zip(norms["trainer"][1], norms["frontier"][1]))


@pytest.mark.parametrize("case", ["labels", "no-labels", "loss-only", "no-generate"])
def test_generation_loss_forward_is_seq2seq_trainers_labelled_forward_after_generating(tmp_path, case):
    """The copy says yes exactly where `Seq2SeqTrainer.prediction_step` runs a forward with the labels itself
    (not through compute_loss) after generating."""
    from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments, T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    model = T5ForConditionalGeneration(T5Config(vocab_size=20, d_model=8, d_kv=4, d_ff=16, num_layers=1, num_heads=2,
                                                decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))
    args = Seq2SeqTrainingArguments(output_dir=str(tmp_path), predict_with_generate=case != "no-generate",
                                    generation_max_length=4, report_to="none", use_cpu=True)
    trainer = Seq2SeqTrainer(model=model, args=args)
    inputs = {"input_ids": torch.randint(2, 20, (2, 5))}
    if case != "no-labels":
        inputs["labels"] = torch.randint(2, 20, (2, 3))
    loss_only = case == "loss-only"
    if case in ("labels", "no-labels"):  # generation: any loss forward runs outside compute_loss
        trainer.compute_loss = lambda *a, **k: pytest.fail("compute_loss was called")
    direct = []
    handle = model.register_forward_pre_hook(
        lambda m, a, kw: direct.append(True) if kw.get("labels") is not None else None, with_kwargs=True)
    trainer.prediction_step(model, dict(inputs), prediction_loss_only=loss_only)
    handle.remove()
    decided = _compat.generation_loss_forward(trainer, inputs, loss_only, Seq2SeqTrainer)
    assert decided == (case == "labels")
    # Where it decides yes, the labelled forward ran outside compute_loss (compute_loss would have failed the test).
    assert decided <= bool(direct)


def test_quiet_deepspeed_cpu_notice_drops_that_notice_and_nothing_else():
    """Where DeepSpeed is installed, Trainer imports it, and on a CPU it warns "Setting accelerator to CPU" in every
    process; importing hf_batch_entropy drops that one record (DeepSpeed still chooses the CPU) and nothing else."""
    pytest.importorskip("deepspeed")
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    probe = ("import logging, deepspeed; from deepspeed.accelerator import get_accelerator; "
             "print('accelerator', get_accelerator().device_name()); "
             "logging.getLogger('DeepSpeed').warning('another DeepSpeed warning')")

    def run(first: str) -> str:
        done = subprocess.run([sys.executable, "-c", first + probe], capture_output=True, text=True, timeout=300,
                              env=env, check=True)
        return done.stdout + done.stderr

    without_library = run("")
    if "Setting accelerator to CPU" not in without_library:
        pytest.skip("DeepSpeed found an accelerator here: it prints no CPU fallback notice")
    with_library = run("import hf_batch_entropy; ")
    assert "Setting accelerator to CPU" not in with_library
    assert "accelerator cpu" in with_library and "another DeepSpeed warning" in with_library
