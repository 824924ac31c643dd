"""`BatchEntropyTrainer` is `Trainer` plus LBE: same losses at β = 0, LBE metrics, checkpoints, Hub card, errors."""

import gc
import json
import os

import numpy as np
import pytest
import torch
from torch import nn
from transformers import AutoModelForSequenceClassification, Trainer, TrainerCallback

from conftest import DictDataset, TinyMLP, make_args, tiny_bert, token_dataset, vector_dataset
from hf_batch_entropy import BatchEntropyConfig, BatchEntropyRegularizer, BatchEntropyTrainer
from hf_batch_entropy.regularizer import REGULARIZER_CONFIG_NAME, REGULARIZER_WEIGHTS_NAME


def losses(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_same_params(a, b, **tol):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], msg=name, **tol)


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"gradient_accumulation_steps": 2, "per_device_train_batch_size": 4},
        {"label_smoothing_factor": 0.1},
    ],
    ids=["plain", "grad-accum", "label-smoothing"],
)
def test_beta_zero_is_exactly_trainer(tmp_path, extra):
    ds = token_dataset()
    plain = Trainer(model=tiny_bert(), args=make_args(tmp_path, plain=True, **extra), train_dataset=ds)
    plain.train()
    ours = BatchEntropyTrainer(model=tiny_bert(), args=make_args(tmp_path, lbe_beta=0.0, **extra), train_dataset=ds)
    ours.train()
    assert losses(ours) == losses(plain)
    assert_same_params(params(ours.model), params(plain.model), rtol=0, atol=0)
    # Entropies are still measured; the task part is the whole loss.
    logged = [h for h in ours.state.log_history if "loss" in h]
    assert all(h["lbe_loss"] == 0.0 and h["task_loss"] == pytest.approx(h["loss"], rel=1e-6) for h in logged)


def test_tiny_bert_trains_with_lbe_and_logs_metrics(tmp_path):
    ds = token_dataset()
    args = make_args(tmp_path, lbe_beta=0.5, lbe_alpha=2.0, lbe_alpha_learning_rate=0.05, lbe_log_per_layer=True)
    trainer = BatchEntropyTrainer(model=tiny_bert(), args=args, train_dataset=ds)
    trainer.train()
    reg = trainer.regularizer
    assert isinstance(reg, BatchEntropyRegularizer)
    assert reg.num_layers == 3  # embeddings + 2 layers
    assert reg.layer_names == ["hidden_states.0", "hidden_states.1", "hidden_states.2"]
    assert (reg.alpha.detach() < 2.0).all(), "α should move down towards the layers' entropies (< 2 nats)"
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 2
    for h in logged:
        for key in ("task_loss", "lbe_loss", "batch_entropy_mean", "batch_entropy_min", "lbe_alpha_mean"):
            assert np.isfinite(h[key]), key
        assert h["lbe_loss"] > 0
        assert h["task_loss"] + h["lbe_loss"] == pytest.approx(h["loss"], rel=1e-5)
        assert h["batch_entropy_min"] <= h["batch_entropy_mean"]
        per_layer = [h[f"batch_entropy/layer_{i}"] for i in range(3)]
        assert np.mean(per_layer) == pytest.approx(h["batch_entropy_mean"], rel=1e-5)
    # The α group exists once, without weight decay, at its own learning rate.
    groups = [g for g in trainer.optimizer.param_groups if any(p is reg.alpha for p in g["params"])]
    assert len(groups) == 1 and groups[0]["weight_decay"] == 0.0


def test_lbe_changes_the_updates(tmp_path):
    ds = token_dataset()
    runs = {}
    for beta in (0.0, 1.0):
        trainer = BatchEntropyTrainer(model=tiny_bert(), args=make_args(tmp_path, lbe_beta=beta), train_dataset=ds)
        trainer.train()
        runs[beta] = params(trainer.model)
    diff = max((runs[0.0][n] - runs[1.0][n]).abs().max().item() for n in runs[0.0])
    assert diff > 1e-6


def test_gradient_accumulation_logs_per_step_losses(tmp_path):
    ds = token_dataset()
    args = make_args(tmp_path, lbe_beta=0.5, gradient_accumulation_steps=2, per_device_train_batch_size=4)
    trainer = BatchEntropyTrainer(model=tiny_bert(), args=args, train_dataset=ds)
    trainer.train()
    plain = Trainer(model=tiny_bert(), args=make_args(tmp_path, plain=True, gradient_accumulation_steps=2, per_device_train_batch_size=4), train_dataset=ds)
    plain.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    for h, plain_loss in zip(logged, losses(plain), strict=True):
        assert h["task_loss"] + h["lbe_loss"] == pytest.approx(h["loss"], rel=1e-5)
        # The task part is on Trainer's own scale (whatever its accumulation convention for this model).
        assert h["task_loss"] == pytest.approx(plain_loss, rel=0.05)


def test_evaluation_loss_is_the_task_loss_and_metrics_still_work(tmp_path):
    ds = token_dataset()

    def accuracy(pred):
        return {"accuracy": float((pred.predictions.argmax(-1) == pred.label_ids).mean())}

    plain = Trainer(model=tiny_bert(), args=make_args(tmp_path, plain=True), eval_dataset=ds, compute_metrics=accuracy)
    expected = plain.evaluate()
    args = make_args(tmp_path, lbe_beta=1.0, lbe_eval_entropy=True, eval_strategy="steps", eval_steps=4)
    trainer = BatchEntropyTrainer(model=tiny_bert(), args=args, train_dataset=ds, eval_dataset=ds, compute_metrics=accuracy)
    before = trainer.evaluate()  # before training: no regularizer yet, so no entropies, same numbers as Trainer
    assert before["eval_loss"] == pytest.approx(expected["eval_loss"], rel=1e-6)
    assert before["eval_accuracy"] == expected["eval_accuracy"]
    trainer.train()
    metrics = trainer.evaluate()
    assert 0 < metrics["eval_batch_entropy_min"] <= metrics["eval_batch_entropy_mean"]
    assert 0 <= metrics["eval_accuracy"] <= 1
    # The eval loss is the task loss of the trained model, computed as Trainer computes it.
    reference = Trainer(model=trainer.model, args=make_args(tmp_path, plain=True), eval_dataset=ds)
    assert metrics["eval_loss"] == pytest.approx(reference.evaluate()["eval_loss"], rel=1e-6)
    in_training = [h for h in trainer.state.log_history if "eval_loss" in h]
    assert in_training and "eval_batch_entropy_mean" in in_training[0]


def test_resume_continues_exactly(tmp_path):
    ds = token_dataset()
    common = dict(max_steps=6, save_strategy="steps", save_steps=3, lbe_beta=0.5, lbe_alpha_learning_rate=0.05)
    full = BatchEntropyTrainer(model=tiny_bert(), args=make_args(tmp_path / "a", **common), train_dataset=ds)
    full.train()

    class Interrupt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = state.global_step == 3

    interrupted = BatchEntropyTrainer(model=tiny_bert(), args=make_args(tmp_path / "b", **common), train_dataset=ds, callbacks=[Interrupt()])
    interrupted.train()
    checkpoint = tmp_path / "b" / "out" / "checkpoint-3"
    assert (checkpoint / REGULARIZER_WEIGHTS_NAME).is_file() and (checkpoint / REGULARIZER_CONFIG_NAME).is_file()

    resumed = BatchEntropyTrainer(model=tiny_bert(seed=123), args=make_args(tmp_path / "b", **common), train_dataset=ds)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    torch.testing.assert_close(resumed.regularizer.alpha, full.regularizer.alpha, rtol=0, atol=1e-7)
    assert_same_params(params(resumed.model), params(full.model), rtol=0, atol=1e-7)
    assert losses(resumed)[-1] == pytest.approx(losses(full)[-1], abs=1e-7)
    # α's optimizer state came back too: its Adam moments equal the uninterrupted run's.
    state = resumed.optimizer.state[resumed.regularizer.alpha]
    torch.testing.assert_close(state["exp_avg"], full.optimizer.state[full.regularizer.alpha]["exp_avg"])


def test_saved_model_is_an_ordinary_transformers_model(tmp_path):
    trainer = BatchEntropyTrainer(model=tiny_bert(), args=make_args(tmp_path, lbe_beta=0.5), train_dataset=token_dataset())
    trainer.train()
    out = tmp_path / "final"
    trainer.save_model(str(out))
    model, info = AutoModelForSequenceClassification.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert_same_params(params(model), params(trainer.model))
    saved = BatchEntropyRegularizer.from_pretrained(out)
    torch.testing.assert_close(saved.alpha, trainer.regularizer.alpha.detach())


def test_model_card_names_method_settings_and_paper(tmp_path):
    args = make_args(tmp_path, lbe_beta=0.05, lbe_alpha=0.3)
    trainer = BatchEntropyTrainer(model=tiny_bert(), args=args, train_dataset=token_dataset())
    trainer.train()
    trainer.create_model_card(model_name="tiny-lbe")
    card = (tmp_path / "out" / "README.md").read_text()
    header = card.split("---")[1]
    assert "batch-entropy" in header  # a tag in the YAML metadata
    assert "Layerwise batch-entropy regularization" in card
    assert '"lbe_beta": 0.05' in card and '"lbe_alpha": 0.3' in card
    assert "@article{peer2022improving" in card
    assert "batch-entropy" in trainer.model.model_tags


def test_plain_training_arguments_are_accepted(tmp_path):
    args = make_args(tmp_path, plain=True)
    trainer = BatchEntropyTrainer(model=tiny_bert(), args=args, train_dataset=token_dataset())
    assert isinstance(trainer.args, BatchEntropyConfig) and trainer.args.lbe_beta == 0.5


def test_model_init_builds_a_fresh_regularizer_per_run(tmp_path):
    trainer = BatchEntropyTrainer(model_init=lambda: tiny_bert(), args=make_args(tmp_path, lbe_beta=0.5), train_dataset=token_dataset())
    trainer.train()
    first = trainer.regularizer
    trainer.train()
    assert trainer.regularizer is not first
    assert trainer.regularizer.alpha is next(p for g in trainer.optimizer.param_groups for p in g["params"] if p.numel() == 3)


def test_plain_module_is_regularized_through_hooks(tmp_path):
    args = make_args(tmp_path, lbe_beta=0.5, lbe_target_modules=["stem", "head"])
    trainer = BatchEntropyTrainer(model=TinyMLP(depth=4), args=args, train_dataset=vector_dataset())
    trainer.train()
    assert trainer.regularizer.layer_names == ["stem", "head"]
    default = BatchEntropyTrainer(model=TinyMLP(depth=4), args=make_args(tmp_path, lbe_beta=0.5), train_dataset=vector_dataset())
    default.train()
    assert default.regularizer.layer_names == [f"blocks.{i}.1" for i in range(4)]  # the Tanh modules


def test_hooks_hold_no_tensor_past_the_step(tmp_path):
    trainer = BatchEntropyTrainer(
        model=TinyMLP(depth=2, width=8),
        args=make_args(tmp_path, lbe_beta=0.5, max_steps=200, logging_steps=50, per_device_train_batch_size=4),
        train_dataset=vector_dataset(n=32),
    )
    live = []

    class CountTensors(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step in (50, 200):
                gc.collect()
                live.append(sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor)))
            assert trainer._capture.collect() == ([], [])

    trainer.add_callback(CountTensors())
    trainer.train()
    assert live[1] <= live[0], f"live tensors grew from {live[0]} to {live[1]} over 150 steps"


@pytest.mark.parametrize("source", ["hidden_states", "hooks"])
def test_gradient_checkpointing_gives_the_same_updates(tmp_path, source):
    targets = None if source == "hidden_states" else ["intermediate_act_fn"]
    result = {}
    for gc_on in (False, True):
        args = make_args(tmp_path, lbe_beta=1.0, gradient_checkpointing=gc_on, lbe_target_modules=targets)
        trainer = BatchEntropyTrainer(model=tiny_bert(), args=args, train_dataset=token_dataset())
        trainer.train()
        result[gc_on] = (params(trainer.model), trainer.regularizer.alpha.detach().clone(), trainer.regularizer.num_layers)
    assert result[True][2] == result[False][2] == (3 if source == "hidden_states" else 2)
    assert_same_params(result[True][0], result[False][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(result[True][1], result[False][1])


# --- bad input ----------------------------------------------------------------------------------------------------


def test_batch_of_one_is_a_clear_error(tmp_path):
    trainer = BatchEntropyTrainer(model=tiny_bert(), args=make_args(tmp_path, per_device_train_batch_size=1), train_dataset=token_dataset(n=8))
    with pytest.raises(ValueError, match="at least 2 examples"):
        trainer.train()


def test_model_without_hidden_states_or_modules_is_a_clear_error(tmp_path):
    class Bare(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(8, 3))

        def forward(self, x, labels=None):
            logits = x @ self.w
            return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}

    trainer = BatchEntropyTrainer(model=Bare(), args=make_args(tmp_path), train_dataset=vector_dataset())
    with pytest.raises(ValueError, match="returns no hidden states.*lbe_target_modules"):
        trainer.train()


def test_nan_activations_are_a_clear_error(tmp_path):
    ds = vector_dataset()
    ds.rows[3] = {**ds.rows[3], "x": torch.full((8,), float("nan"))}
    trainer = BatchEntropyTrainer(model=TinyMLP(), args=make_args(tmp_path), train_dataset=ds)
    with pytest.raises(FloatingPointError, match="NaN or inf.*learning rate"):
        trainer.train()


def test_layer_count_changing_between_steps_is_a_clear_error(tmp_path):
    class Skippy(TinyMLP):
        calls = 0

        def forward(self, x, labels=None):
            Skippy.calls += 1
            if Skippy.calls > 3:  # the probe and the first steps see every block, later steps skip one
                self.blocks[0].forward = lambda h: h
            return super().forward(x, labels)

    trainer = BatchEntropyTrainer(model=Skippy(), args=make_args(tmp_path), train_dataset=vector_dataset())
    with pytest.raises(ValueError, match="same layers at every step"):
        trainer.train()


def test_bad_config_values_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="lbe_beta"):
        make_args(tmp_path, lbe_beta=-1.0)
    with pytest.raises(ValueError, match="does not compile"):
        make_args(tmp_path, lbe_target_modules="re(")
    with pytest.raises(TypeError, match="module names"):
        make_args(tmp_path, lbe_target_modules=[3])
    assert make_args(tmp_path, lbe_target_modules=[nn.ReLU]).to_dict()["lbe_target_modules"] == ["ReLU"]
    json.dumps(make_args(tmp_path, lbe_target_modules=[nn.ReLU]).to_dict())
