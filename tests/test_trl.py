"""TRL's trainers through `BatchEntropyMixin`: each constructs as the TRL trainer does (same keywords, same positional
order), regularizes the policy's training forward (LBE's gradient reaches the layers, α is trained and saved next to
the model), and at `lbe_beta=0` gives exactly the TRL trainer's losses and weights. Forwards that are not the policy's
training forward (a reference model, a KL or metrics forward, generation, a teacher) are neither measured nor an
error. Tiny Llama models built from configs, a word-level tokenizer built offline, a few rows of local data."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import word_tokenizer
from hf_batch_entropy import BatchEntropyMixin, BatchEntropyRegularizer, batch_entropy_config
from hf_batch_entropy.regularizer import REGULARIZER_CONFIG_NAME, REGULARIZER_WEIGHTS_NAME

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

PROMPTS = ["the cat", "a dog", "the big dog", "a cat", "the small cat", "a big dog", "the dog", "a small cat"]
CHOSEN = [" sat on the mat", " ran", " sat", " ran on a rug", " sat on a rug", " ran and sat", " sat on the rug", " ran"]
REJECTED = [" ran", " sat on a mat", " and", " the", " a", " on", " the cat", " big"]
HIDDEN = [f"hidden_states.{i}" for i in range(3)]


def tiny_llama(tokenizer, seed: int = 0, classifier: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
                         eos_token_id=1, bos_token_id=None, num_labels=1)
    return (LlamaForSequenceClassification if classifier else LlamaForCausalLM)(config)


def config(trainer_cls, tmp_path, **overrides):
    """The trainer's own config class with the `lbe_*` fields: fast, offline, CPU."""
    base = {trl.DPOTrainer: trl.DPOConfig, trl.KTOTrainer: trl.KTOConfig, trl.GRPOTrainer: trl.GRPOConfig,
            trl.RLOOTrainer: trl.RLOOConfig, trl.RewardTrainer: trl.RewardConfig,
            trl.DistillationTrainer: trl.DistillationConfig}[trainer_cls]
    kwargs = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=2, logging_steps=1,
                  learning_rate=1e-3, save_strategy="no", report_to="none", use_cpu=True, bf16=False,
                  disable_tqdm=True, seed=0, data_seed=0, lbe_beta=0.5, lbe_alpha=2.0, lbe_alpha_learning_rate=0.05)
    if trainer_cls in (trl.GRPOTrainer, trl.RLOOTrainer):
        # Policy-gradient losses average about 0 (exactly 0 at an on-policy first step): LBE is added, not scaled.
        kwargs.update(num_generations=2, max_completion_length=4, beta=0.1, model_init_kwargs={"dtype": torch.float32},
                      lbe_scale_by_task_loss=False, lbe_beta=0.05)
    if trainer_cls is trl.DistillationTrainer:
        kwargs.update(max_completion_length=4)
    with_lbe = overrides.pop("lbe", True)
    kwargs.update(overrides)
    if not with_lbe:  # the TRL trainer's own config
        return base(**{k: v for k, v in kwargs.items() if not k.startswith("lbe_")})
    return batch_entropy_config(base)(**kwargs)


def reward_len(completions, **kwargs):
    return [float(len(c)) for c in completions]


def build(trainer_cls, tmp_path, with_lbe: bool = True, **overrides):
    """`trainer_cls` (or its LBE version), its positional arguments as TRL orders them, on a seeded tiny model."""
    tokenizer = word_tokenizer()
    model = tiny_llama(tokenizer, classifier=trainer_cls is trl.RewardTrainer)
    cls = type(f"{trainer_cls.__name__}WithLBE", (BatchEntropyMixin, trainer_cls), {}) if with_lbe else trainer_cls
    args = config(trainer_cls, tmp_path, **({} if with_lbe else {"lbe": False}), **overrides)
    if trainer_cls is trl.DPOTrainer:
        data = {"prompt": PROMPTS, "chosen": CHOSEN, "rejected": REJECTED}
        positional = (model, copy.deepcopy(model), args)
    elif trainer_cls is trl.KTOTrainer:
        data = {"prompt": PROMPTS * 2, "completion": CHOSEN + REJECTED, "label": [True] * 8 + [False] * 8}
        positional = (model, copy.deepcopy(model), args)
    elif trainer_cls is trl.RewardTrainer:
        data = {"chosen": [p + c for p, c in zip(PROMPTS, CHOSEN)], "rejected": [p + r for p, r in zip(PROMPTS, REJECTED)]}
        positional = (model, args)
    elif trainer_cls is trl.DistillationTrainer:
        data = {"prompt": PROMPTS, "completion": CHOSEN}
        positional = (model, tiny_llama(tokenizer, seed=1), args)
    else:
        # With a KL term (beta > 0) GRPO and RLOO load their reference model from the policy's path: a saved one.
        path = tmp_path / "policy"
        model.save_pretrained(path)
        data = {"prompt": PROMPTS}
        positional = (str(path), reward_len, args)
    trainer = cls(*positional, train_dataset=datasets.Dataset.from_dict(data), processing_class=tokenizer)
    return trainer, trainer.model


ALL = [trl.DPOTrainer, trl.KTOTrainer, trl.GRPOTrainer, trl.RLOOTrainer, trl.RewardTrainer, trl.DistillationTrainer]


@pytest.mark.parametrize("trainer_cls", ALL, ids=lambda c: c.__name__)
def test_trl_trainer_is_regularized_in_the_policys_training_forward(tmp_path, trainer_cls):
    trainer, model = build(trainer_cls, tmp_path)
    with_grad, masked = [], []
    forward = BatchEntropyRegularizer.forward

    def regularize(self, activations, task_loss, masks=None):
        with_grad.append(all(a.requires_grad for a in activations[1:]))  # LBE's gradient reaches the layers
        # Padding is masked with the mask of the forward measured (GRPO, RLOO and distillation build theirs from the
        # prompt's and the completion's; their batches hold no attention_mask).
        masked.append(all(m is not None and m.shape == a.shape[:2] and not m.all() for m, a in zip(masks, activations)))
        return forward(self, activations, task_loss, masks)

    BatchEntropyRegularizer.forward = regularize
    try:
        trainer.train()
    finally:
        BatchEntropyRegularizer.forward = forward
    assert with_grad == [True, True]  # one measured forward per step: the policy's
    assert masked == [True, True]
    assert trainer.regularizer.layer_names == HIDDEN
    logged = [h for h in trainer.state.log_history if "lbe_loss" in h]
    assert len(logged) == 2 and all(h["lbe_loss"] != 0 and 0 < h["batch_entropy_mean"] for h in logged)
    assert (trainer.regularizer.alpha.detach() < 2.0).all()  # α trained
    trainer.save_model()
    assert (tmp_path / "out" / REGULARIZER_WEIGHTS_NAME).is_file() and (tmp_path / "out" / REGULARIZER_CONFIG_NAME).is_file()


@pytest.mark.parametrize("trainer_cls", ALL, ids=lambda c: c.__name__)
def test_beta_zero_is_exactly_the_trl_trainer(tmp_path, trainer_cls):
    """At lbe_beta=0 the entropies are measured and logged, and the losses and weights are the TRL trainer's, bit for
    bit (generation included: choosing the layers runs no forward of its own, so the RNG is the TRL trainer's)."""
    runs = {}
    for with_lbe in (False, True):
        overrides = {"lbe_beta": 0.0} if with_lbe else {}
        trainer, model = build(trainer_cls, tmp_path / str(with_lbe), with_lbe=with_lbe, **overrides)
        trainer.train()
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        runs[with_lbe] = (losses, {n: p.detach().clone() for n, p in model.named_parameters()}, trainer)
    assert runs[True][0] == runs[False][0] and len(runs[True][0]) == 2
    for name, param in runs[False][1].items():
        torch.testing.assert_close(runs[True][1][name], param, rtol=0, atol=0, msg=name)
    logged = [h for h in runs[True][2].state.log_history if "batch_entropy_mean" in h]
    assert len(logged) == 2 and all(h["lbe_loss"] == 0 for h in logged)


# --- second forwards in the same step ----------------------------------------------------------------------------


def sft(tmp_path, **overrides):
    SFTWithLBE = type("SFTWithLBE", (BatchEntropyMixin, trl.SFTTrainer), {})
    tokenizer = word_tokenizer()
    texts = ["the cat sat on the mat", "a dog ran", "the big dog sat on a small rug and the cat ran", "a cat"] * 4
    args = batch_entropy_config(trl.SFTConfig)(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=2, logging_steps=1,
        learning_rate=1e-3, save_strategy="no", report_to="none", use_cpu=True, bf16=False, disable_tqdm=True,
        max_length=16, lbe_beta=0.5, lbe_log_per_layer=True, **overrides,
    )
    model = tiny_llama(tokenizer)
    return SFTWithLBE(model=model, args=args, train_dataset=datasets.Dataset.from_dict({"text": texts}),
                      processing_class=tokenizer, **({"compute_loss_func": nll} if "label_smoothing_factor" not in
                                                     overrides else {}))


def nll(outputs, labels, num_items_in_batch=None):
    logits = outputs.logits[:, :-1].float()
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                             ignore_index=-100)


@pytest.mark.parametrize("how", ["label_smoothing_factor", "compute_loss_func"])
@pytest.mark.parametrize("targets", [None, ["act_fn"]], ids=["hidden_states", "hooks"])
def test_sft_second_no_grad_forward_is_left_out(tmp_path, how, targets):
    """TRL's SFT with label smoothing or a compute_loss_func runs the model twice per step: with gradients for the
    loss, then without them for its metrics. Hooks, like hidden states, measure the first (the one LBE can train),
    once per layer, and the second is no error."""
    extra = {"label_smoothing_factor": 0.1} if how == "label_smoothing_factor" else {}
    trainer = sft(tmp_path, lbe_target_modules=targets, **extra)
    calls = []
    trainer.model.model.layers[0].mlp.act_fn.register_forward_hook(lambda m, a, o: calls.append(o.requires_grad))
    trainer.train()
    # Per step: the forward with gradients, the one without, and the recomputation of TRL's (non-reentrant)
    # gradient checkpointing in the backward.
    assert calls == [True, False, True] * 2
    expected = HIDDEN if targets is None else [f"model.layers.{i}.mlp.act_fn" for i in range(2)]
    assert trainer.regularizer.layer_names == expected
    logged = [h for h in trainer.state.log_history if "lbe_loss" in h]
    assert len(logged) == 2 and all(h["lbe_loss"] > 0 for h in logged)


@pytest.mark.parametrize("targets", [None, ["act_fn"]], ids=["hidden_states", "hooks"])
def test_dpo_reference_forward_of_a_peft_model_is_not_measured(tmp_path, targets):
    """DPO on a LoRA model without ref_model: the reference is the same model with its adapter off, run under
    no_grad in the same compute_loss. It is neither measured (one set of layers, the policy's) nor an error."""
    peft = pytest.importorskip("peft")
    DPOWithLBE = type("DPOWithLBE", (BatchEntropyMixin, trl.DPOTrainer), {})
    tokenizer = word_tokenizer()
    args = config(trl.DPOTrainer, tmp_path, lbe_target_modules=targets)
    lora = peft.LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj", "v_proj"])
    data = datasets.Dataset.from_dict({"prompt": PROMPTS, "chosen": CHOSEN, "rejected": REJECTED})
    trainer = DPOWithLBE(tiny_llama(tokenizer), None, args, train_dataset=data, processing_class=tokenizer,
                         peft_config=lora)
    calls = []
    act = trainer.model.get_base_model().model.layers[0].mlp.act_fn
    act.register_forward_hook(lambda m, a, o: calls.append(o.requires_grad))
    trainer.train()
    # Per step: the policy's forward, the reference's, and the checkpointing's recomputation in the backward.
    assert calls == [True, False, True] * 2
    expected = HIDDEN if targets is None else [f"base_model.model.model.layers.{i}.mlp.act_fn" for i in range(2)]
    assert trainer.regularizer.layer_names == expected
    assert all(h["lbe_loss"] != 0 for h in trainer.state.log_history if "lbe_loss" in h)


def test_constructors_take_the_trl_trainers_keywords_and_plain_configs(tmp_path):
    """Keywords as TRL names them, and TRL's own config classes (upgraded with the default lbe_* settings): the
    reference model stays the reference model, the reward functions stay the reward functions."""
    tokenizer = word_tokenizer()
    model, ref = tiny_llama(tokenizer), tiny_llama(tokenizer, seed=1)
    DPOWithLBE = type("DPOWithLBE", (BatchEntropyMixin, trl.DPOTrainer), {})
    data = datasets.Dataset.from_dict({"prompt": PROMPTS, "chosen": CHOSEN, "rejected": REJECTED})
    plain = config(trl.DPOTrainer, tmp_path, lbe=False)
    trainer = DPOWithLBE(ref_model=ref, model=model, args=plain, train_dataset=data, processing_class=tokenizer)
    assert trainer.ref_model is ref and isinstance(trainer.args, trl.DPOConfig) and trainer.args.lbe_beta == 0.5
    assert trainer.args.output_dir == plain.output_dir
    GRPOWithLBE = type("GRPOWithLBE", (BatchEntropyMixin, trl.GRPOTrainer), {})
    args = config(trl.GRPOTrainer, tmp_path, beta=0.0)
    trainer = GRPOWithLBE(model=model, reward_funcs=reward_len, args=args,
                          train_dataset=datasets.Dataset.from_dict({"prompt": PROMPTS}), processing_class=tokenizer)
    assert trainer.reward_funcs == [reward_len] and trainer.args is args


@pytest.mark.parametrize("trainer_cls", [trl.DPOTrainer, trl.KTOTrainer], ids=lambda c: c.__name__)
def test_evaluation_measures_the_policys_forward(tmp_path, trainer_cls):
    """With lbe_eval_entropy, evaluation (every forward without gradients) measures the forward at the place the
    training step measured: the policy's, not KTO's KL forward that runs before it (other completions, other
    lengths), nor DPO's reference forward."""
    trainer, _ = build(trainer_cls, tmp_path, lbe_eval_entropy=True)
    trainer.eval_dataset = trainer.train_dataset
    trainer.train()
    shapes, measured = [], []
    compute_loss, measure = trainer.compute_loss, trainer._measure_eval

    def recording_loss(model, inputs, *args, **kwargs):
        shapes.append(tuple(inputs["input_ids"].shape))
        return compute_loss(model, inputs, *args, **kwargs)

    def recording_measure(activations, masks):
        measured.append(tuple(activations[0].shape[:2]))
        return measure(activations, masks)

    trainer.compute_loss, trainer._measure_eval = recording_loss, recording_measure
    metrics = trainer.evaluate()
    assert measured and measured == shapes
    assert metrics["eval_batch_entropy_mean"] > 0
