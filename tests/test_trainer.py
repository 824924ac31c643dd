"""`BatchEntropyTrainer` is `Trainer` plus LBE: same losses at β = 0, LBE metrics, checkpoints, Hub card, errors."""

import gc
import json
import os

import numpy as np
import pytest
import torch
from torch import nn
from transformers import AutoModelForSequenceClassification, Trainer, TrainerCallback

from conftest import DictDataset, KwargsToBackbone, TinyMLP, make_args, tiny_bert, token_dataset, vector_dataset
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
    # α has an AdamW of its own, without weight decay; Trainer's optimizer holds model parameters only.
    assert not any(p is reg.alpha for g in trainer.optimizer.param_groups for p in g["params"])
    assert isinstance(reg.optimizer, torch.optim.AdamW) and reg.optimizer.param_groups[0]["weight_decay"] == 0.0
    assert reg.learning_rate == 0.05


@pytest.mark.parametrize("alpha", [0.2, 3.0], ids=["alpha-below", "alpha-above"])
def test_lbe_changes_the_updates(tmp_path, alpha):
    """The LBE term moves every layer's batch-entropy towards its target α, from either side: after the same steps
    from the same start, each layer of the regularized run is nearer α than in the plain run (by ≥ 0.05 nats; the
    entropies start at ~0.66 nats), and moved in α's direction. α is held fixed (its learning rate 0)."""
    from transformers import default_data_collator

    from hf_batch_entropy import batch_entropies

    ds = token_dataset()
    batch = default_data_collator(ds.rows[:32])

    def entropies(model):
        model.eval()
        with torch.no_grad():
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
        return batch_entropies(list(out.hidden_states))

    runs = {}
    for beta in (0.0, 1.0):
        args = make_args(tmp_path, lbe_beta=beta, lbe_alpha=alpha, lbe_alpha_learning_rate=0.0)
        trainer = BatchEntropyTrainer(model=tiny_bert(), args=args, train_dataset=ds)
        trainer.train()
        torch.testing.assert_close(trainer.regularizer.alpha.detach(), torch.full((3,), alpha))
        runs[beta] = entropies(trainer.model)
    plain, regularized = runs[0.0], runs[1.0]
    assert ((plain - alpha).abs() - (regularized - alpha).abs() > 0.05).all(), (plain, regularized)
    assert (torch.sign(regularized - plain) == torch.sign(torch.tensor(alpha) - plain)).all()


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
    before = trainer.evaluate()  # before training: the same numbers as Trainer, plus the entropies
    assert before["eval_loss"] == pytest.approx(expected["eval_loss"], rel=1e-6)
    assert before["eval_accuracy"] == expected["eval_accuracy"]
    assert 0 < before["eval_batch_entropy_min"] <= before["eval_batch_entropy_mean"]
    trainer.train()
    metrics = trainer.evaluate()
    assert 0 < metrics["eval_batch_entropy_min"] <= metrics["eval_batch_entropy_mean"]
    # The eval loss is the task loss of the trained model, computed as Trainer computes it.
    reference = Trainer(model=trainer.model, args=make_args(tmp_path, plain=True), eval_dataset=ds, compute_metrics=accuracy)
    expected = reference.evaluate()
    assert metrics["eval_loss"] == pytest.approx(expected["eval_loss"], rel=1e-6)
    assert metrics["eval_accuracy"] == expected["eval_accuracy"]
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
    state = resumed.regularizer.optimizer.state[resumed.regularizer.alpha]
    expected = full.regularizer.optimizer.state[full.regularizer.alpha]
    for key in ("exp_avg", "exp_avg_sq", "step"):
        torch.testing.assert_close(state[key], expected[key])


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
    assert trainer.regularizer.optimizer is not first.optimizer
    assert trainer.regularizer.optimizer.state[trainer.regularizer.alpha]["step"] == 4  # trained from scratch again


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


def test_nan_activations_at_beta_zero_train_on_like_trainer_with_one_warning(tmp_path, caplog):
    """At β = 0 the entropies are only measured: a diverging run goes on as under Trainer (transformers' own
    test_logging_inf_nan_filter trains a model to NaN), and the log says which layers were NaN, once."""
    ds = vector_dataset()
    ds.rows[3] = {**ds.rows[3], "x": torch.full((8,), float("nan"))}
    trainer = BatchEntropyTrainer(model=TinyMLP(), args=make_args(tmp_path, lbe_beta=0.0), train_dataset=ds)
    with caplog.at_level("WARNING", logger="hf_batch_entropy"):
        trainer.train()
    assert trainer.state.global_step == trainer.state.max_steps
    warnings = [r.getMessage() for r in caplog.records if "NaN or inf" in r.getMessage()]
    assert len(warnings) == 1 and "lbe_beta=0" in warnings[0]


def test_layer_count_changing_between_steps_is_a_clear_error(tmp_path):
    class Skippy(TinyMLP):
        calls = 0

        def forward(self, x, labels=None):
            Skippy.calls += 1
            if Skippy.calls > 3:  # the first steps see every block, later steps skip one
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


# --- drop-in: every Trainer path ----------------------------------------------------------------------------------


def test_plain_trainer_checkpoint_continues_with_lbe(tmp_path, caplog):
    ds = token_dataset()
    common = dict(max_steps=4, save_strategy="steps", save_steps=2)
    Trainer(model=tiny_bert(), args=make_args(tmp_path / "plain", plain=True, **common), train_dataset=ds).train()
    checkpoint = tmp_path / "plain" / "out" / "checkpoint-2"
    args = make_args(tmp_path / "lbe", lbe_beta=0.5, lbe_alpha=0.7, lbe_alpha_learning_rate=0.0, **common)
    trainer = BatchEntropyTrainer(model=tiny_bert(seed=5), args=args, train_dataset=ds)
    with caplog.at_level("WARNING"):
        trainer.train(resume_from_checkpoint=str(checkpoint))
    assert trainer.state.global_step == 4
    torch.testing.assert_close(trainer.regularizer.alpha.detach(), torch.full((3,), 0.7))
    said = [r.getMessage() for r in caplog.records if "holds no batch-entropy regularizer" in r.getMessage()]
    assert len(said) == 1 and "lbe_alpha=0.7" in said[0]


def test_checkpoint_of_other_layers_is_a_clear_error_on_resume(tmp_path):
    ds = token_dataset()
    common = dict(max_steps=2, save_strategy="steps", save_steps=2, lbe_beta=0.5)
    BatchEntropyTrainer(model=tiny_bert(), args=make_args(tmp_path, **common), train_dataset=ds).train()
    # Three hooked modules instead of the three hidden states: same count, other layers.
    targets = ["bert.embeddings", "bert.encoder.layer.0", "bert.encoder.layer.1"]
    trainer = BatchEntropyTrainer(model=tiny_bert(), args=make_args(tmp_path, lbe_target_modules=targets, **common), train_dataset=ds)
    with pytest.raises(ValueError, match=r"other layers(.|\n)*hidden_states\.0(.|\n)*bert\.embeddings"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))


def test_best_model_keeps_its_own_alpha(tmp_path):
    ds = token_dataset()
    args = make_args(
        tmp_path, lbe_beta=0.5, lbe_alpha_learning_rate=0.05, max_steps=6, eval_strategy="steps", eval_steps=2,
        save_strategy="steps", save_steps=2, load_best_model_at_end=True, metric_for_best_model="loss",
        greater_is_better=True,  # the worst loss wins: the best checkpoint is not the last one
    )
    trainer = BatchEntropyTrainer(model=tiny_bert(), args=args, train_dataset=ds, eval_dataset=ds)
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best is not None and not best.endswith("checkpoint-6")
    saved_best = BatchEntropyRegularizer.from_pretrained(best)
    torch.testing.assert_close(trainer.regularizer.alpha.detach(), saved_best.alpha.detach(), rtol=0, atol=0)
    last = BatchEntropyRegularizer.from_pretrained(tmp_path / "out" / "checkpoint-6")
    assert not torch.equal(last.alpha, saved_best.alpha)
    trainer.save_model()
    final = BatchEntropyRegularizer.from_pretrained(tmp_path / "out")
    torch.testing.assert_close(final.alpha, saved_best.alpha, rtol=0, atol=0)


def test_evaluate_and_predict_tallies_never_mix(tmp_path):
    args = make_args(tmp_path, lbe_eval_entropy=True, lbe_log_per_layer=True)
    ds = token_dataset()
    other = token_dataset(seed=7, seq_len=4)
    trainer = BatchEntropyTrainer(model=tiny_bert(), args=args, train_dataset=ds, eval_dataset=ds)
    alone = trainer.evaluate()
    assert alone["eval_batch_entropy_mean"] > 0 and "eval_batch_entropy/layer_2" in alone
    predicted = trainer.predict(other)
    assert predicted.metrics["test_batch_entropy_mean"] != pytest.approx(alone["eval_batch_entropy_mean"])
    for _ in range(3):
        trainer.predict(other)
    again = trainer.evaluate()
    assert again["eval_batch_entropy_mean"] == pytest.approx(alone["eval_batch_entropy_mean"], rel=1e-6)
    assert trainer.evaluate(metric_key_prefix="dev")["dev_batch_entropy_mean"] == pytest.approx(alone["eval_batch_entropy_mean"], rel=1e-6)


def test_evaluation_batch_of_one_is_skipped_for_entropy(tmp_path):
    ds = token_dataset(n=9)  # batches of 8 and 1
    args = make_args(tmp_path, lbe_eval_entropy=True)
    metrics = BatchEntropyTrainer(model=tiny_bert(), args=args, train_dataset=ds, eval_dataset=ds).evaluate()
    first_batch = BatchEntropyTrainer(model=tiny_bert(), args=args, train_dataset=ds, eval_dataset=DictDataset(ds.rows[:8])).evaluate()
    assert metrics["eval_batch_entropy_mean"] == pytest.approx(first_batch["eval_batch_entropy_mean"], rel=1e-6)
    assert metrics["eval_loss"] != pytest.approx(first_batch["eval_loss"], rel=1e-9)  # the single example still counts


def test_training_batch_of_one_trains_on_the_task_loss_with_one_warning(tmp_path, caplog):
    ds = token_dataset(n=9)  # every epoch ends with a batch of one example
    args = make_args(tmp_path, lbe_beta=0.5, max_steps=6, logging_steps=1)
    trainer = BatchEntropyTrainer(model=tiny_bert(), args=args, train_dataset=ds)
    with caplog.at_level("WARNING"):
        trainer.train()
    assert sum("single example" in r.getMessage() for r in caplog.records) == 1
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["lbe_loss"] == 0.0 for h in logged] == [False, True, False, True, False, True]
    assert all("batch_entropy_mean" in h for i, h in enumerate(logged) if i % 2 == 0)


def test_non_finite_lbe_settings_are_rejected_when_the_config_is_built(tmp_path):
    for name in ("lbe_beta", "lbe_alpha", "lbe_alpha_min", "lbe_alpha_learning_rate"):
        for value in (float("nan"), float("inf")):
            with pytest.raises(ValueError, match=f"{name} must be a finite number"):
                make_args(tmp_path, **{name: value})


@pytest.mark.parametrize("in_config", [False, True])
def test_outputs_keep_hidden_states_only_where_the_config_asks(tmp_path, in_config):
    """The capture asks the model for its hidden states; the outputs hand them on only where the user's config (read
    at each step) wants them, as the model alone would."""
    model = tiny_bert()
    trainer = BatchEntropyTrainer(model=model, args=make_args(tmp_path, lbe_beta=0.5), train_dataset=token_dataset())
    batch = trainer.data_collator([token_dataset()[i] for i in range(4)])
    _, outputs = trainer.compute_loss(model, batch, return_outputs=True)
    assert outputs.hidden_states is None
    model.config.output_hidden_states = in_config
    _, outputs = trainer.compute_loss(model, batch, return_outputs=True)
    assert (outputs.hidden_states is not None) == in_config
    if in_config:
        assert len(outputs.hidden_states) == 3


def test_model_without_output_hidden_states_falls_back_to_hooks(tmp_path):
    from transformers import BertForSequenceClassification

    from conftest import tiny_bert_config

    class NoHiddenStates(BertForSequenceClassification):
        def forward(self, input_ids, attention_mask=None, labels=None):
            return super().forward(input_ids=input_ids, attention_mask=attention_mask, labels=labels)

    torch.manual_seed(0)
    trainer = BatchEntropyTrainer(model=NoHiddenStates(tiny_bert_config()), args=make_args(tmp_path, lbe_beta=0.5), train_dataset=token_dataset())
    trainer.train()
    assert trainer._capture.source == "forward_hooks"
    hooked = [f"bert.encoder.layer.{i}.intermediate.intermediate_act_fn" for i in range(2)] + ["bert.pooler.activation"]
    assert trainer.regularizer.layer_names == hooked  # the activation modules, the default for hooks


def test_model_handing_kwargs_to_a_backbone_without_output_hidden_states_falls_back_to_hooks(tmp_path, caplog):
    """Its forward takes `**kwargs` (so, by signature, `output_hidden_states`) and hands them to a backbone that takes
    none, which would raise a TypeError: the capture drops the keyword from the backbone's call and takes the hooks,
    said in one INFO line. At β = 0 it trains exactly as `Trainer` does."""
    ds = vector_dataset()
    plain = Trainer(model=KwargsToBackbone(), args=make_args(tmp_path / "plain", plain=True), train_dataset=ds)
    plain.train()
    ours = BatchEntropyTrainer(model=KwargsToBackbone(), args=make_args(tmp_path / "ours", lbe_beta=0.0), train_dataset=ds)
    with caplog.at_level("INFO", logger="hf_batch_entropy"):
        ours.train()
    assert losses(ours) == losses(plain)
    assert_same_params(params(ours.model), params(plain.model), rtol=0, atol=0)
    assert ours._capture.source == "forward_hooks"
    assert ours._layer_names == [f"backbone.blocks.{i}.1" for i in range(3)]  # its activation modules
    said = [r for r in caplog.records if r.name.startswith("hf_batch_entropy.capture")]
    assert [r.levelname for r in said] == ["INFO"] and "output_hidden_states" in said[0].getMessage()


def test_tuple_returning_model_is_regularized_on_its_hidden_states(tmp_path, caplog):
    ds = token_dataset()
    with caplog.at_level("WARNING"):
        tuples = BatchEntropyTrainer(model=tiny_bert(return_dict=False), args=make_args(tmp_path, lbe_beta=0.5), train_dataset=ds, eval_dataset=ds)
        tuples.train()
    assert not any("returned no hidden_states" in r.getMessage() for r in caplog.records)
    assert tuples.regularizer.layer_names == ["hidden_states.0", "hidden_states.1", "hidden_states.2"]
    dicts = BatchEntropyTrainer(model=tiny_bert(), args=make_args(tmp_path, lbe_beta=0.5), train_dataset=ds)
    dicts.train()
    assert losses(tuples) == losses(dicts)
    assert "eval_loss" in tuples.evaluate()


def test_data_parallel_losses_are_averaged_like_trainer(tmp_path, monkeypatch):
    class TwoReplicaLosses(TinyMLP):
        """What nn.DataParallel returns: one loss per replica (here both halves of the batch), outputs gathered."""

        def forward(self, x, labels=None):
            out = super().forward(x, labels)
            half = x.shape[0] // 2
            first = nn.functional.cross_entropy(out["logits"][:half], labels[:half])
            second = nn.functional.cross_entropy(out["logits"][half:], labels[half:])
            return {"loss": torch.stack([first, second]), "logits": out["logits"]}

    args = make_args(tmp_path, lbe_beta=0.5)
    monkeypatch.setattr(type(args), "n_gpu", property(lambda self: 2))  # Trainer now wraps the model in DataParallel
    trainer = BatchEntropyTrainer(model=TwoReplicaLosses(), args=args, train_dataset=vector_dataset())
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert logged and all(np.isfinite(h["task_loss"]) and h["lbe_loss"] > 0 for h in logged)


@pytest.mark.parametrize("model_name", ["tiny-bert", "mlp"])
def test_training_step_reads_nothing_on_the_host(tmp_path, monkeypatch, model_name):
    """The LBE part of compute_loss adds no host synchronization: it reads no tensor value (item, tolist, bool,
    float, int) beyond what Trainer's own compute_loss reads for the same model."""
    reads = {"count": 0}

    def counting(original):
        def read(self, *args, **kwargs):
            reads["count"] += 1
            return original(self, *args, **kwargs)

        return read

    def count_reads(trainer_cls, **kwargs):
        model, ds = (tiny_bert(), token_dataset()) if model_name == "tiny-bert" else (TinyMLP(), vector_dataset())
        trainer = trainer_cls(model=model, train_dataset=ds, **kwargs)
        original = trainer.compute_loss
        per_step = []

        def compute_loss(*args, **kw):
            if not trainer.model.training or trainer.state.global_step == 0:
                return original(*args, **kw)  # the first step chooses the layers: not counted
            before = reads["count"]
            with monkeypatch.context() as m:
                for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
                    m.setattr(torch.Tensor, name, counting(getattr(torch.Tensor, name)))
                out = original(*args, **kw)
            per_step.append(reads["count"] - before)
            return out

        trainer.compute_loss = compute_loss
        trainer.train()
        return per_step

    plain = count_reads(Trainer, args=make_args(tmp_path, plain=True))
    ours = count_reads(BatchEntropyTrainer, args=make_args(tmp_path, lbe_beta=0.5, lbe_sync_entropy=True))
    assert len(ours) == len(plain) == 3
    assert ours == plain
    if model_name == "mlp":
        assert ours == [0, 0, 0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (scripts/gpu_check.sh runs it)")
def test_cuda_training_step_never_synchronizes(tmp_path):
    """Under `torch.cuda.set_sync_debug_mode("error")` any host-device synchronization inside the LBE part of a CUDA
    training step raises. The first step (where the layers are chosen) and Trainer's own loop are outside."""
    args = make_args(tmp_path, lbe_beta=0.5, use_cpu=False, max_steps=3, logging_steps=10)
    trainer = BatchEntropyTrainer(model=TinyMLP(), args=args, train_dataset=vector_dataset())
    original = trainer.compute_loss
    checked = []

    def compute_loss(*a, **kw):
        if trainer.state.global_step == 0:
            return original(*a, **kw)
        torch.cuda.set_sync_debug_mode("error")
        try:
            return original(*a, **kw)
        finally:
            torch.cuda.set_sync_debug_mode("default")
            checked.append(trainer.state.global_step)

    trainer.compute_loss = compute_loss
    trainer.train()
    assert checked == [1, 2]


# --- padding --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ignore_padding", [True, False])
def test_padding_does_not_move_the_regularizer(tmp_path, ignore_padding):
    """The same sentences, unpadded (8 tokens) and right-padded to 16: with lbe_ignore_padding the logged entropies and
    LBE loss are the same; without it (the paper's code) the padding counts as information."""
    unpadded = token_dataset(n=8, seq_len=8)
    padded = DictDataset([
        {"input_ids": torch.cat([r["input_ids"], torch.zeros(8, dtype=torch.long)]),
         "attention_mask": torch.cat([r["attention_mask"], torch.zeros(8, dtype=torch.long)]),
         "labels": r["labels"]}
        for r in unpadded.rows
    ])
    logged = {}
    for name, ds in (("unpadded", unpadded), ("padded", padded)):
        args = make_args(tmp_path, lbe_beta=0.5, max_steps=1, logging_steps=1, lbe_ignore_padding=ignore_padding)
        trainer = BatchEntropyTrainer(model=tiny_bert(max_position_embeddings=32), args=args, train_dataset=ds)
        trainer.train()
        logged[name] = next(h for h in trainer.state.log_history if "lbe_loss" in h)
    for key in ("batch_entropy_mean", "lbe_loss", "task_loss"):
        same = logged["padded"][key] == pytest.approx(logged["unpadded"][key], rel=1e-5, abs=1e-6)
        assert same if ignore_padding or key == "task_loss" else not same, key


# --- the Hub, offline -------------------------------------------------------------------------------------------------


def test_push_to_hub_uploads_an_ordinary_model_with_card_and_regularizer(tmp_path, local_hub):
    """push_to_hub() against a local stand-in for the Hub (the upload copies the folder): what would be uploaded is
    the model, the tokenizer, the card (tag, LBE section) and the regularizer's files, and the model loads with
    AutoModelForSequenceClassification in a process that never imports hf_batch_entropy."""
    import subprocess
    import sys

    from conftest import word_tokenizer

    hub = local_hub
    tokenizer = word_tokenizer()
    args = make_args(tmp_path, lbe_beta=0.5, save_strategy="steps", save_steps=2, hub_model_id="tiny-lbe")
    trainer = BatchEntropyTrainer(model=tiny_bert(), args=args,
                                  train_dataset=token_dataset(), processing_class=tokenizer)
    trainer.train()
    trainer.push_to_hub()
    uploaded = hub / "user" / "tiny-lbe"
    names = {p.name for p in uploaded.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "README.md",
            REGULARIZER_WEIGHTS_NAME, REGULARIZER_CONFIG_NAME} <= names
    assert not any(n.startswith("checkpoint-") for n in names)
    card = (uploaded / "README.md").read_text()
    assert "- batch-entropy" in card.split("---")[1]  # a tag in the YAML header
    assert "## Layerwise batch-entropy regularization" in card and '"lbe_beta": 0.5' in card
    torch.testing.assert_close(BatchEntropyRegularizer.from_pretrained(uploaded).alpha, trainer.regularizer.alpha.detach())

    ids = torch.tensor([[5, 6, 7, 8, 9]])
    expected = trainer.model.eval()(input_ids=ids).logits.detach()
    code = (
        "import sys, torch\n"
        "from transformers import AutoModelForSequenceClassification, AutoTokenizer\n"
        f"model = AutoModelForSequenceClassification.from_pretrained({str(uploaded)!r}).eval()\n"
        f"AutoTokenizer.from_pretrained({str(uploaded)!r})\n"
        "assert 'hf_batch_entropy' not in sys.modules\n"
        "print(model(input_ids=torch.tensor([[5, 6, 7, 8, 9]])).logits.tolist())\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    torch.testing.assert_close(torch.tensor(json.loads(done.stdout.strip().splitlines()[-1])), expected, atol=1e-5, rtol=1e-5)


# --- no silent failure --------------------------------------------------------------------------------------------------


def test_compute_loss_that_bypasses_ours_is_an_error_at_the_first_log(tmp_path):
    class OwnLoss(BatchEntropyTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            outputs = model(**inputs)  # no super(): the LBE term is never added
            return (outputs.loss, outputs) if return_outputs else outputs.loss

    trainer = OwnLoss(model=tiny_bert(), args=make_args(tmp_path, lbe_beta=0.5), train_dataset=token_dataset())
    with pytest.raises(RuntimeError, match="OwnLoss.compute_loss never reached BatchEntropyMixin.compute_loss.*super"):
        trainer.train()
    # With β = 0 there is nothing to miss: it trains as Trainer.
    OwnLoss(model=tiny_bert(), args=make_args(tmp_path, lbe_beta=0.0), train_dataset=token_dataset()).train()


def test_a_batch_with_one_real_example_trains_on_the_task_loss_not_nan(tmp_path, caplog):
    """Batches of two in which one text is empty (all padding): no position has two real tokens. The step trains on
    the task loss with one warning; nothing is NaN."""
    real = token_dataset(n=1).rows[0]
    empty = {**real, "attention_mask": torch.zeros_like(real["attention_mask"]), "labels": 1 - real["labels"]}
    args = make_args(tmp_path, lbe_beta=0.5, per_device_train_batch_size=2, max_steps=3, logging_steps=1)
    trainer = BatchEntropyTrainer(model=tiny_bert(), args=args, train_dataset=DictDataset([real, empty]))
    with caplog.at_level("WARNING"):
        trainer.train()
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 3 and all(h["lbe_loss"] == 0.0 and np.isfinite(h["loss"]) for h in logged)
    assert sum("no position where two sequences hold a real token" in r.getMessage() for r in caplog.records) == 1


def test_none_among_hidden_states_is_left_out_and_named_once(tmp_path, caplog):
    model = tiny_bert()

    def drop_layer_one(module, args, output):
        states = output.hidden_states
        return type(output)(**{**output, "hidden_states": (states[0], None, *states[2:])}) if states else output

    model.bert.register_forward_hook(drop_layer_one)
    args = make_args(tmp_path, lbe_beta=0.5, max_steps=3, logging_steps=1)
    trainer = BatchEntropyTrainer(model=model, args=args, train_dataset=token_dataset())
    with caplog.at_level("WARNING"):
        trainer.train()
    assert trainer.regularizer.layer_names == ["hidden_states.0", "hidden_states.2"]
    assert sum("hidden_states.1" in r.getMessage() and "None" in r.getMessage() for r in caplog.records) == 1
    assert all(h["lbe_loss"] > 0 for h in trainer.state.log_history if "lbe_loss" in h)


def test_reentrant_checkpointing_with_hooks_is_a_clear_error(tmp_path):
    args = make_args(tmp_path, lbe_beta=1.0, gradient_checkpointing=True, lbe_target_modules=["intermediate_act_fn"],
                     gradient_checkpointing_kwargs={"use_reentrant": True})
    trainer = BatchEntropyTrainer(model=tiny_bert(), args=args, train_dataset=token_dataset())
    with pytest.raises(RuntimeError, match="intermediate_act_fn.*without gradients.*use_reentrant': False"):
        trainer.train()


@pytest.mark.parametrize(("source", "reentrant"), [("hidden_states", False), ("hooks", False), ("hidden_states", True)])
def test_checkpointed_lbe_gradient_is_the_non_checkpointed_one(tmp_path, source, reentrant):
    """The gradient on the weights of one LBE step, with and without checkpointing (reentrant: hidden states, the
    outputs of the checkpointed blocks; hooks inside them are an error, above)."""
    targets = None if source == "hidden_states" else ["intermediate_act_fn"]
    batch = {k: torch.stack([r[k] if isinstance(r[k], torch.Tensor) else torch.tensor(r[k]) for r in token_dataset(n=8).rows])
             for k in ("input_ids", "attention_mask", "labels")}
    grads = {}
    for checkpointed in (False, True):
        model = tiny_bert()
        trainer = BatchEntropyTrainer(model=model, args=make_args(tmp_path, lbe_beta=1.0, lbe_target_modules=targets),
                                      train_dataset=token_dataset())
        if checkpointed:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        model.train()
        trainer.compute_loss(model, batch).backward()
        grads[checkpointed] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert_same_params(grads[True], grads[False], rtol=1e-5, atol=1e-7)


def test_resume_true_without_a_checkpoint_raises_like_trainer(tmp_path):
    trainer = BatchEntropyTrainer(model=tiny_bert(), args=make_args(tmp_path, lbe_beta=0.5), train_dataset=token_dataset())
    with pytest.raises(ValueError, match="No valid checkpoint found"):
        trainer.train(resume_from_checkpoint=True)
    assert trainer.state.global_step == 0


def test_resuming_a_finished_run_keeps_and_saves_its_alpha(tmp_path):
    args = make_args(tmp_path, lbe_beta=0.5, lbe_alpha=2.0, lbe_alpha_learning_rate=0.05, save_strategy="steps",
                     save_steps=4)
    data = token_dataset(n=32)  # 4 steps of 8: the run ends with its epoch, and the checkpoint is at the end
    first = BatchEntropyTrainer(model=tiny_bert(), args=args, train_dataset=data)
    first.train()
    alpha = first.regularizer.alpha.detach().clone()
    assert not torch.equal(alpha, torch.full_like(alpha, 2.0))
    again = BatchEntropyTrainer(model=tiny_bert(), args=args, train_dataset=data)
    again.train(resume_from_checkpoint=True)  # checkpoint-4: no step left
    torch.testing.assert_close(again.regularizer.alpha.detach(), alpha, rtol=0, atol=0)
    again.save_model(str(tmp_path / "final"))
    torch.testing.assert_close(BatchEntropyRegularizer.from_pretrained(tmp_path / "final").alpha.detach(), alpha)


def test_unlabelled_predict_and_evaluate_report_entropies(tmp_path):
    labelled = token_dataset(n=16)
    unlabelled = DictDataset([{k: v for k, v in r.items() if k != "labels"} for r in labelled.rows])
    args = make_args(tmp_path, lbe_eval_entropy=True)
    trainer = BatchEntropyTrainer(model=tiny_bert(), args=args, train_dataset=labelled)
    with_labels = trainer.predict(labelled).metrics
    output = trainer.predict(unlabelled)
    assert output.predictions.shape == (16, 2)  # the logits alone, as without LBE
    assert output.metrics["test_batch_entropy_mean"] == pytest.approx(with_labels["test_batch_entropy_mean"], rel=1e-6)
    evaluated = trainer.evaluate(unlabelled)
    assert evaluated["eval_batch_entropy_min"] == pytest.approx(with_labels["test_batch_entropy_min"], rel=1e-6)


def test_trainer_uses_the_estimators_pooling_rule(tmp_path, monkeypatch):
    """Whether a batch of one can be measured is the estimator's `is_measurable`, not the trainer's own view of the
    processes: pooled (a distributed group with lbe_sync_entropy), one example per process is accepted."""
    import hf_batch_entropy.entropy.reference as entropy

    args = make_args(tmp_path, per_device_train_batch_size=1, lbe_sync_entropy=True)
    trainer = BatchEntropyTrainer(model=tiny_bert(), args=args, train_dataset=token_dataset())
    with pytest.raises(ValueError, match="at least 2 examples"):
        trainer._check_batch_size()
    monkeypatch.setattr(entropy, "_sync_active", lambda sync: sync)  # as in a group of several processes
    trainer._check_batch_size()


# --- Trainer's own contract -------------------------------------------------------------------------------------------


class TwoScalars(nn.Module):
    """y = a·x + b: two scalar parameters and no module at all, so nothing LBE could measure (no hidden states, no
    activation, Linear or Conv module)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(0.0))
        self.b = nn.Parameter(torch.tensor(0.0))
        self.forwards = 0

    def forward(self, input_x, labels=None):
        self.forwards += 1
        y = self.a * input_x + self.b
        return {"loss": nn.functional.mse_loss(y, labels), "y": y} if labels is not None else {"y": y}


from transformers import PretrainedConfig, PreTrainedModel  # noqa: E402


class TwoScalarsPreTrained(PreTrainedModel):
    """The same as a Transformers model whose forward takes `**kwargs` (so `output_hidden_states` too, which it ignores):
    only a forward could tell that it returns no hidden states, but it has no layer that could have any."""

    config_class = PretrainedConfig

    def __init__(self, config=None):
        super().__init__(config or PretrainedConfig())
        self.a = nn.Parameter(torch.tensor(0.0))
        self.b = nn.Parameter(torch.tensor(0.0))
        self.forwards = 0

    def forward(self, input_x, labels=None, **kwargs):
        self.forwards += 1
        y = self.a * input_x + self.b
        return (nn.functional.mse_loss(y, labels), y) if labels is not None else (y,)


def line_dataset(n=24):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, generator=g)
    return DictDataset([{"input_x": x[i], "labels": 2.0 * x[i] + 3.0 + 0.1 * torch.randn((), generator=g)} for i in range(n)])


@pytest.mark.parametrize("model_cls", [TwoScalars, TwoScalarsPreTrained])
@pytest.mark.parametrize("batch_size", [4, 1])
def test_beta_zero_with_nothing_to_measure_trains_evaluates_and_predicts_exactly_like_trainer(tmp_path, batch_size,
                                                                                            model_cls):
    data = line_dataset()
    unlabelled = DictDataset([{"input_x": r["input_x"]} for r in data.rows])
    common = dict(per_device_train_batch_size=batch_size, max_steps=6, logging_steps=2, learning_rate=0.1,
                  eval_strategy="steps", eval_steps=3)
    runs = {}
    for name, trainer_cls, extra in (("plain", Trainer, {"plain": True}), ("ours", BatchEntropyTrainer, {"lbe_beta": 0.0,
                                                                                                        "lbe_eval_entropy": True})):
        torch.manual_seed(0)
        trainer = trainer_cls(model=model_cls(), args=make_args(tmp_path / name, **common, **extra), train_dataset=data,
                              eval_dataset=data)
        trainer.train()
        history = [{k: v for k, v in h.items() if not k.endswith(("runtime", "per_second"))} for h in trainer.state.log_history]
        predicted = trainer.predict(unlabelled)
        runs[name] = (history, params(trainer.model), predicted.predictions, trainer.evaluate(), trainer.model.forwards)
    plain, ours = runs["plain"], runs["ours"]
    assert ours[0] == plain[0]  # the same logs, key for key: no LBE metric where nothing is measured
    assert_same_params(ours[1], plain[1], rtol=0, atol=0)
    np.testing.assert_array_equal(ours[2], plain[2])
    assert {k: v for k, v in ours[3].items() if "runtime" not in k and "per_second" not in k} == {
        k: v for k, v in plain[3].items() if "runtime" not in k and "per_second" not in k}
    assert ours[4] == plain[4]  # the same forwards, none of its own


@pytest.mark.parametrize("model_cls", [TwoScalars, TwoScalarsPreTrained])
def test_beta_positive_with_nothing_to_measure_is_an_error_when_train_starts(tmp_path, model_cls):
    """The error comes from the model's structure before training begins: no forward, no `on_train_begin`."""
    began = []

    class Began(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            began.append(True)

    model = model_cls()
    trainer = BatchEntropyTrainer(model=model, args=make_args(tmp_path, lbe_beta=0.1), train_dataset=line_dataset(),
                                  callbacks=[Began()])
    with pytest.raises(ValueError, match=f"{model_cls.__name__} returns no hidden states and has no activation, Linear or Conv"):
        trainer.train()
    assert model.forwards == 0 and not began
    targets = BatchEntropyTrainer(model=TinyMLP(), args=make_args(tmp_path, lbe_beta=0.1, lbe_target_modules=["nope"]),
                                  train_dataset=vector_dataset(), callbacks=[Began()])
    with pytest.raises(ValueError, match="matches no module of TinyMLP"):
        targets.train()
    assert not began


def test_the_alpha_step_is_not_a_callback_in_the_users_list(tmp_path):
    from transformers import DefaultFlowCallback, PrinterCallback

    class Mine(TrainerCallback):
        pass

    mine = Mine()
    plain = Trainer(model=tiny_bert(), args=make_args(tmp_path, plain=True), callbacks=[mine])
    trainer = BatchEntropyTrainer(model=tiny_bert(), args=make_args(tmp_path, lbe_beta=0.5),
                                  train_dataset=token_dataset(), callbacks=[mine])
    assert [type(c) for c in trainer.callback_handler.callbacks] == [type(c) for c in plain.callback_handler.callbacks]
    assert trainer.pop_callback(Mine) is mine and trainer.pop_callback(Mine) is None
    # A user who removes every callback they can see (but the flow) still trains α once per optimizer step.
    for callback in list(trainer.callback_handler.callbacks):
        if not isinstance(callback, DefaultFlowCallback):
            trainer.remove_callback(type(callback))
    assert [type(c) for c in trainer.callback_handler.callbacks] == [DefaultFlowCallback]
    trainer.add_callback(PrinterCallback)
    trainer.train()
    assert trainer.regularizer.optimizer.state[trainer.regularizer.alpha]["step"] == 4


class RecordsBatches(TinyMLP):
    """A forward with a side effect: it records the first feature of every batch it sees (as a buffer would)."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x, labels=None):
        self.seen.append([round(v, 6) for v in x[:, 0].tolist()])
        return super().forward(x, labels)


@pytest.mark.parametrize("beta", [0.0, 0.5])
def test_a_forward_with_side_effects_sees_exactly_trainers_calls_also_after_a_resume(tmp_path, beta):
    data = vector_dataset(n=32)
    common = dict(max_steps=6, save_strategy="steps", save_steps=3, per_device_train_batch_size=8,
                  eval_strategy="steps", eval_steps=3)
    seen = {}
    for name, trainer_cls, extra in (("plain", Trainer, {"plain": True}),
                                     ("ours", BatchEntropyTrainer, {"lbe_beta": beta, "lbe_eval_entropy": True})):
        torch.manual_seed(0)
        first = trainer_cls(model=RecordsBatches(), args=make_args(tmp_path / name, **common, **extra),
                            train_dataset=data, eval_dataset=data)
        first.train()
        torch.manual_seed(1)
        resumed = trainer_cls(model=RecordsBatches(), args=make_args(tmp_path / name, **common, **extra),
                              train_dataset=data, eval_dataset=data)
        resumed.train(resume_from_checkpoint=str(tmp_path / name / "out" / "checkpoint-3"))
        seen[name] = (first.model.seen, resumed.model.seen)
    assert seen["ours"] == seen["plain"]
    assert len(seen["ours"][0]) == 6 + 2 * 4 and len(seen["ours"][1]) == 3 + 4  # steps and evaluation batches


def test_a_resumed_run_whose_only_batch_left_holds_one_example_trains_it_without_the_guard(tmp_path, caplog):
    data = token_dataset(n=9)  # an epoch: a batch of 8, then a batch of 1
    args = make_args(tmp_path, lbe_beta=0.1, num_train_epochs=1, max_steps=-1, save_strategy="steps", save_steps=1)
    BatchEntropyTrainer(model=tiny_bert(), args=args, train_dataset=data).train()
    resumed = BatchEntropyTrainer(model=tiny_bert(), args=args, train_dataset=data)
    caplog.clear()
    with caplog.at_level("WARNING"):
        resumed.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-1"))
    assert resumed.state.global_step == 2
    assert sum("single example" in r.getMessage() for r in caplog.records) == 1
    # A run in which every batch holds one sequence is still an error (packed rows of one sequence: test_tokens).


class ReentrantMLP(TinyMLP):
    """The hooked Linear/Tanh modules run inside reentrant activation checkpointing, under no_grad: LBE could not
    train them (an error with lbe_beta > 0), but at lbe_beta = 0 nothing needs training."""

    def forward(self, x, labels=None):
        h = self.stem(x)
        for block in self.blocks:
            h = torch.utils.checkpoint.checkpoint(block, h, use_reentrant=True) if self.training else block(h)
        logits = self.head(h)
        return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}


def test_beta_zero_with_nothing_measurable_under_reentrant_checkpointing_trains_like_trainer(tmp_path):
    runs = {}
    for name, trainer_cls, extra in (("plain", Trainer, {"plain": True}), ("ours", BatchEntropyTrainer, {"lbe_beta": 0.0})):
        torch.manual_seed(0)
        trainer = trainer_cls(model=ReentrantMLP(), args=make_args(tmp_path / name, **extra), train_dataset=vector_dataset())
        trainer.train()
        runs[name] = (losses(trainer), params(trainer.model))
    assert runs["ours"][0] == runs["plain"][0]
    assert_same_params(runs["ours"][1], runs["plain"][1], rtol=0, atol=0)


def test_a_stop_gradient_branch_through_hooked_modules_is_left_out_not_an_error(tmp_path):
    class StopGradient(TinyMLP):
        def forward(self, x, labels=None):
            with torch.no_grad():
                self.blocks[0](self.stem(x))  # e.g. a target computed from the same layers, without gradients
            return super().forward(x, labels)

    trainer = BatchEntropyTrainer(model=StopGradient(), args=make_args(tmp_path, lbe_beta=0.5), train_dataset=vector_dataset())
    trainer.train()
    assert trainer.regularizer.layer_names == [f"blocks.{i}.1" for i in range(3)]
    assert all(h["lbe_loss"] > 0 for h in trainer.state.log_history if "lbe_loss" in h)
