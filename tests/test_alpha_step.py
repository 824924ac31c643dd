"""α's step beside the model's (`hf_batch_entropy.alpha_step`): the model optimizer's Adam implementation, the
schedule's factor, fp16 unscaling, one step per optimizer step; and through the trainer, with every kind of optimizer
and scheduler."""

import pytest
import torch
from transformers import TrainerCallback

from conftest import make_args, tiny_bert, token_dataset
from hf_batch_entropy import BatchEntropyRegularizer, BatchEntropyTrainer
from hf_batch_entropy.alpha_step import AlphaStepper, ScheduleFactor, adam_implementation


def lr_factor(trainer):
    """The factor α's next step would get from the trainer's optimizer and scheduler."""
    return trainer._lbe_alpha_step.factor(trainer.optimizer, trainer.lr_scheduler)


# --- units ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("implementation", [{"foreach": True}, {"foreach": False}, {"fused": True}])
def test_alpha_steps_are_bit_identical_to_a_parameter_group_of_the_models_adamw(implementation):
    """An α trained by the regularizer's AdamW (same implementation, same schedule factor) takes exactly the steps it
    would take as a parameter group of the model's AdamW."""
    torch.manual_seed(0)
    model_weight = torch.nn.Parameter(torch.randn(5))
    inside = torch.nn.Parameter(torch.full((3,), 1.5))
    optimizer = torch.optim.AdamW([{"params": [model_weight]}, {"params": [inside], "lr": 0.05, "weight_decay": 0.0}],
                                  lr=1e-3, betas=(0.9, 0.98), eps=1e-7, **implementation)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    regularizer = BatchEntropyRegularizer(3, alpha=1.5)
    regularizer.configure_optimizer(0.05, betas=(0.9, 0.98), eps=1e-7, **adam_implementation(optimizer))
    assert {k: regularizer.optimizer.defaults[k] for k in implementation} == implementation
    stepper = AlphaStepper()
    for step in range(5):
        grad = torch.randn(3) * 10 ** (step - 2)
        model_weight.grad, inside.grad = torch.randn(5), grad.clone()
        regularizer.alpha.grad = grad.clone()
        optimizer.step()
        stepper.step(regularizer, optimizer, scheduler)
        scheduler.step()
        assert torch.equal(regularizer.alpha.detach(), inside.detach()), step
        assert regularizer.alpha.grad is None


def test_adam_implementation_of_other_optimizers_is_torchs_default():
    weight = torch.nn.Parameter(torch.ones(2))
    assert adam_implementation(torch.optim.SGD([weight], lr=0.1)) == {}
    wrapped = type("Wrapper", (), {"optimizer": torch.optim.Adam([weight], foreach=False)})()
    assert adam_implementation(wrapped) == {"fused": None, "foreach": False}


def test_schedule_factor_follows_the_largest_rate_seen_and_travels_as_state():
    weight = torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.SGD([weight], lr=0.2)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer)
    factor = ScheduleFactor()
    assert factor(optimizer, plateau) == 1.0 and factor.peak == 0.2
    optimizer.param_groups[0]["lr"] = 0.05
    assert factor(optimizer, plateau) == pytest.approx(0.25)
    optimizer.param_groups[0]["lr"] = float("nan")
    assert factor(optimizer, plateau) == 1.0  # not a number: α keeps its own rate
    restored = ScheduleFactor()
    restored.load_state_dict(factor.state_dict())
    optimizer.param_groups[0]["lr"] = 0.1
    assert restored(optimizer, plateau) == pytest.approx(0.5)
    restored.load_state_dict({})  # a checkpoint without it keeps the factor's own state
    assert restored.peak == 0.2
    zero = torch.optim.SGD([weight], lr=0.0)
    assert ScheduleFactor()(zero, None) == 1.0


def test_unscale_divides_by_the_scalers_device_tensor_or_deepspeeds_scale():
    scaler = torch.amp.GradScaler("cpu", init_scale=512.0)
    weight = torch.ones(2, requires_grad=True)
    scaler.scale((weight * 2).sum())  # creates the scale tensor
    grad = torch.full((3,), 1024.0)
    AlphaStepper.unscale(grad, scaler)
    assert torch.equal(grad, torch.full((3,), 2.0))
    AlphaStepper.unscale(grad, torch.amp.GradScaler("cpu", enabled=False))
    assert torch.equal(grad, torch.full((3,), 2.0))
    engine = type("Engine", (), {"optimizer": type("Optimizer", (), {"loss_scale": 4.0})()})()
    AlphaStepper.unscale(grad, None, engine)
    assert torch.equal(grad, torch.full((3,), 0.5))
    AlphaStepper.unscale(None, scaler)  # no gradient this step: nothing to do


def test_a_skipped_step_drops_alphas_gradient_without_stepping():
    regularizer = BatchEntropyRegularizer(2, alpha=1.0)
    regularizer.configure_optimizer(0.1)
    regularizer.alpha.grad = torch.ones(2)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1)
    AlphaStepper().step(regularizer, optimizer, None, skipped=True)
    assert regularizer.alpha.grad is None and torch.equal(regularizer.alpha.detach(), torch.ones(2))
    assert not regularizer.optimizer.state
    regularizer.alpha.grad = torch.ones(2)
    AlphaStepper().step(regularizer, optimizer, None)
    assert regularizer.alpha.grad is None and (regularizer.alpha.detach() < 1.0).all()


# --- through the trainer -------------------------------------------------------------------------------------------


def test_user_optimizer_and_scheduler_see_only_model_parameters(tmp_path):
    model = tiny_bert()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 ** step)
    args = make_args(tmp_path, lbe_beta=0.5, lbe_alpha_learning_rate=0.1)
    trainer = BatchEntropyTrainer(model=model, args=args, train_dataset=token_dataset(), optimizers=(optimizer, scheduler))
    trainer.train()
    assert [len(g["params"]) for g in optimizer.param_groups] == [len(list(model.parameters()))]
    # α followed the user's schedule: its last step ran at 0.1 · 0.5³ (steps 0…3).
    assert trainer.regularizer.optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**3)
    assert trainer.regularizer.optimizer.state[trainer.regularizer.alpha]["step"] == 4


@pytest.mark.parametrize("how", ["optim", "optimizer_cls_and_kwargs"])
def test_other_optimizers_train_alpha_with_adamw(tmp_path, how):
    extra = {"optim": "sgd"} if how == "optim" else {}
    kwargs = {"optimizer_cls_and_kwargs": (torch.optim.SGD, {"lr": 1e-2})} if how != "optim" else {}
    args = make_args(tmp_path, lbe_beta=0.5, lbe_alpha=2.0, lbe_alpha_learning_rate=0.05, **extra)
    trainer = BatchEntropyTrainer(model=tiny_bert(), args=args, train_dataset=token_dataset(), **kwargs)
    trainer.train()
    assert isinstance(trainer.optimizer.optimizer, torch.optim.SGD)
    assert isinstance(trainer.regularizer.optimizer, torch.optim.AdamW)
    assert (trainer.regularizer.alpha.detach() < 2.0).all()


def test_alpha_uses_the_model_optimizers_adam_implementation_and_schedule(tmp_path):
    args = make_args(tmp_path, lbe_beta=0.5, optim="adamw_torch_fused", warmup_steps=2, adam_beta2=0.98, adam_epsilon=1e-7)
    trainer = BatchEntropyTrainer(model=tiny_bert(), args=args, train_dataset=token_dataset())
    trainer.train()
    group = trainer.regularizer.optimizer.param_groups[0]
    assert trainer.regularizer.optimizer.defaults["fused"] is True
    assert group["betas"] == (0.9, 0.98) and group["eps"] == 1e-7
    # Linear warm-up over 2 steps then decay to 0 at step 4: the last step (3) ran at lr · (4 − 3) / (4 − 2).
    assert group["lr"] == pytest.approx(1e-3 * 0.5)


def test_alpha_steps_once_per_optimizer_step_and_not_on_a_skipped_one(tmp_path, monkeypatch):
    args = make_args(tmp_path, lbe_beta=0.5, gradient_accumulation_steps=2, per_device_train_batch_size=4, max_steps=4)
    trainer = BatchEntropyTrainer(model=tiny_bert(), args=args, train_dataset=token_dataset())
    skipped = {2}  # the third optimizer step overflows, as an fp16 step can

    class Accelerator(type(trainer.accelerator)):
        @property
        def optimizer_step_was_skipped(self):
            return trainer.state.global_step in skipped

    monkeypatch.setattr(trainer.accelerator, "__class__", Accelerator)
    alphas = []

    class Record(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            alphas.append(trainer.regularizer.alpha.detach().clone())
            assert trainer.regularizer.alpha.grad is None  # cleared after each step, skipped or not

    trainer.add_callback(Record())
    trainer.train()
    assert trainer.regularizer.optimizer.state[trainer.regularizer.alpha]["step"] == 3
    torch.testing.assert_close(alphas[2], alphas[1], rtol=0, atol=0)
    assert not torch.equal(alphas[1], alphas[0]) and not torch.equal(alphas[3], alphas[2])


def test_alpha_rate_with_a_user_optimizer_and_plateau_schedule_is_its_own(tmp_path):
    """α's factor follows the model optimizer's relative change (1 here), never lr / args.learning_rate (×200)."""
    model = tiny_bert()
    args = make_args(tmp_path, lbe_beta=0.5, learning_rate=5e-5, lbe_alpha_learning_rate=1e-3,
                     lr_scheduler_type="reduce_lr_on_plateau", eval_strategy="steps", eval_steps=2)
    trainer = BatchEntropyTrainer(model=model, args=args, train_dataset=token_dataset(), eval_dataset=token_dataset(n=8),
                                  optimizers=(torch.optim.AdamW(model.parameters(), lr=1e-2), None))
    trainer.train()
    assert isinstance(trainer.lr_scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
    assert trainer.regularizer.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3)
    # After the plateau scheduler halves the model's rate, α's rate is halved too.
    trainer.optimizer.param_groups[0]["lr"] = 5e-3
    assert lr_factor(trainer) == pytest.approx(0.5)


def test_alpha_moves_with_adafactors_relative_steps(tmp_path):
    from transformers.optimization import Adafactor, AdafactorSchedule

    model = tiny_bert()
    optimizer = Adafactor(model.parameters(), lr=None, relative_step=True, warmup_init=True, scale_parameter=True)
    args = make_args(tmp_path, lbe_beta=0.5, lbe_alpha=2.0, lbe_alpha_learning_rate=0.05)
    trainer = BatchEntropyTrainer(model=model, args=args, train_dataset=token_dataset(),
                                  optimizers=(optimizer, AdafactorSchedule(optimizer)))
    trainer.train()
    assert trainer.regularizer.optimizer.param_groups[0]["lr"] == pytest.approx(0.05)  # warming up: factor 1
    assert (trainer.regularizer.alpha.detach() < 2.0 - 0.05).all()  # α moved at its own rate (4 steps of ~0.05)


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")
def test_lr_factor_is_lambda_or_initial_lr_ratio_for_torch_schedulers(tmp_path):
    model = tiny_bert()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.25, total_iters=4)
    trainer = BatchEntropyTrainer(model=model, args=make_args(tmp_path), train_dataset=token_dataset(),
                                  optimizers=(optimizer, scheduler))
    trainer.create_optimizer_and_scheduler(num_training_steps=4)
    assert lr_factor(trainer) == pytest.approx(0.25)  # the warm-up's own factor, as λ for LambdaLR
    scheduler.step()
    assert lr_factor(trainer) == pytest.approx(0.25 + 0.75 / 4)


def test_a_resumed_run_continues_with_the_same_schedule_factor(tmp_path):
    """With a schedule whose factor is relative to the largest rate seen (a plateau schedule here: the model's rate is
    halved from step 3 on), that largest rate travels with the checkpoint: the run resumed at step 3 steps α at the
    same factor (0.5) as the uninterrupted run, not at 1, and ends with the same α."""

    class HalveFromStep3(TrainerCallback):
        def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
            if state.global_step >= 3:
                optimizer.param_groups[0]["lr"] = 5e-3

    class Interrupt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = state.global_step == 3

    def run(folder, seed, *callbacks, resume=None):
        model = tiny_bert(seed=seed)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        args = make_args(tmp_path / folder, lbe_beta=0.5, lbe_alpha_learning_rate=0.05, max_steps=6,
                         save_strategy="steps", save_steps=3)
        trainer = BatchEntropyTrainer(model=model, args=args, train_dataset=token_dataset(),
                                      optimizers=(optimizer, torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer)),
                                      callbacks=[HalveFromStep3(), *callbacks])
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    full = run("full", 0)
    assert full._lbe_alpha_step.factor.peak == 1e-2
    assert full.regularizer.optimizer.param_groups[0]["lr"] == pytest.approx(0.05 * 0.5)
    run("cut", 0, Interrupt())
    checkpoint = tmp_path / "cut" / "out" / "checkpoint-3"
    assert BatchEntropyRegularizer.read_schedule(checkpoint) == {"peak_lr": 1e-2}
    resumed = run("cut", 123, resume=str(checkpoint))
    assert resumed._lbe_alpha_step.factor.peak == 1e-2
    assert resumed.regularizer.optimizer.param_groups[0]["lr"] == pytest.approx(0.05 * 0.5)
    torch.testing.assert_close(resumed.regularizer.alpha, full.regularizer.alpha, rtol=0, atol=1e-7)
