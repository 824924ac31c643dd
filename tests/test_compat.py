"""The private reads and implicit `Trainer` contracts listed in `hf_batch_entropy._compat`, each checked against the
installed transformers / accelerate / torch (CI runs this file on the oldest and the newest transformers allowed)."""

from __future__ import annotations

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
