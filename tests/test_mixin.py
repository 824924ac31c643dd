"""`BatchEntropyMixin` gives LBE to other trainers: `Seq2SeqTrainer` (T5), TRL's `SFTTrainer` (a causal LM), and PEFT
models (a LoRA on BERT). Tiny models from configs, offline."""

from __future__ import annotations

import pytest
import torch
from transformers import T5Config, T5ForConditionalGeneration

from conftest import DictDataset, make_args, tiny_bert, word_tokenizer
from hf_batch_entropy import (
    BatchEntropyMixin,
    BatchEntropyRegularizer,
    BatchEntropySeq2SeqConfig,
    BatchEntropySeq2SeqTrainer,
    batch_entropy_config,
)
from hf_batch_entropy.regularizer import REGULARIZER_CONFIG_NAME, REGULARIZER_WEIGHTS_NAME


def tiny_t5(seed: int = 0) -> T5ForConditionalGeneration:
    torch.manual_seed(seed)
    config = T5Config(vocab_size=40, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_decoder_layers=2, num_heads=2,
                      dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    return T5ForConditionalGeneration(config)


def copy_task(n: int = 16, seed: int = 0) -> DictDataset:
    """Sequences to copy, of lengths 3-6, padded with 0 (labels with -100), as a seq2seq collator would give them."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        length = 3 + i % 4
        ids = torch.randint(2, 40, (length,), generator=g)
        pad = 6 - length
        rows.append({
            "input_ids": torch.cat([ids, torch.zeros(pad, dtype=torch.long)]),
            "attention_mask": torch.cat([torch.ones(length, dtype=torch.long), torch.zeros(pad, dtype=torch.long)]),
            "labels": torch.cat([ids, torch.full((pad,), -100)]),
        })
    return DictDataset(rows)


def test_seq2seq_trainer_regularizes_encoder_and_decoder_and_generates(tmp_path):
    ds = copy_task()
    args = BatchEntropySeq2SeqConfig(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, per_device_eval_batch_size=8,
        learning_rate=1e-3, max_steps=4, logging_steps=2, save_strategy="no", report_to="none", use_cpu=True,
        disable_tqdm=True, predict_with_generate=True, generation_max_length=8, lbe_beta=0.5, lbe_eval_entropy=True,
    )
    trainer = BatchEntropySeq2SeqTrainer(model=tiny_t5(), args=args, train_dataset=ds, eval_dataset=ds)
    trainer.train()
    names = trainer.regularizer.layer_names
    assert names == [f"encoder_hidden_states.{i}" for i in range(3)] + [f"decoder_hidden_states.{i}" for i in range(3)]
    logged = [h for h in trainer.state.log_history if "lbe_loss" in h]
    assert logged and all(h["lbe_loss"] > 0 for h in logged)
    output = trainer.predict(ds)
    assert output.predictions.shape[0] == len(ds) and output.predictions.dtype.kind == "i"  # generated token ids
    assert "test_loss" in output.metrics


def test_seq2seq_evaluation_with_generate_reports_the_entropies_of_its_teacher_forced_forward(tmp_path):
    """With predict_with_generate, Seq2SeqTrainer generates, then runs the labelled batch through the model (teacher
    forcing) for the loss, without compute_loss. That forward is the one measured (lbe_eval_entropy), not the decoding
    steps: the same entropies as the evaluation without generation, whose loss forward goes through compute_loss."""
    ds = copy_task()
    metrics = {}
    for generate in (False, True):
        args = BatchEntropySeq2SeqConfig(
            output_dir=str(tmp_path / str(generate)), per_device_eval_batch_size=8, report_to="none", use_cpu=True,
            disable_tqdm=True, predict_with_generate=generate, generation_max_length=8, lbe_eval_entropy=True,
        )
        trainer = BatchEntropySeq2SeqTrainer(model=tiny_t5(), args=args, eval_dataset=ds)
        metrics[generate] = trainer.evaluate()
        if generate:
            predicted = trainer.predict(ds)
            assert predicted.predictions.dtype.kind == "i"  # generated token ids, as without LBE
            assert "test_batch_entropy_mean" in predicted.metrics
    plain, generated = metrics[False], metrics[True]
    assert plain["eval_batch_entropy_mean"] > 0
    for key in ("eval_loss", "eval_batch_entropy_mean", "eval_batch_entropy_min"):
        assert generated[key] == pytest.approx(plain[key], abs=1e-6), key


def test_seq2seq_plain_arguments_are_upgraded(tmp_path):
    from transformers import Seq2SeqTrainingArguments

    args = Seq2SeqTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", predict_with_generate=True)
    trainer = BatchEntropySeq2SeqTrainer(model=tiny_t5(), args=args, train_dataset=copy_task())
    assert isinstance(trainer.args, BatchEntropySeq2SeqConfig) and trainer.args.predict_with_generate


# --- TRL -------------------------------------------------------------------------------------------------------------


def sft_with_lbe(trl, max_positions: int):
    """TRL's SFTTrainer with the mixin, the word tokenizer and a 2-layer Llama for it (seeded)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    class SFTWithLBE(BatchEntropyMixin, trl.SFTTrainer):
        pass

    torch.manual_seed(0)
    tokenizer = word_tokenizer()
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                         max_position_embeddings=max_positions, pad_token_id=0, eos_token_id=1))
    return SFTWithLBE, tokenizer, model


def test_sft_trainer_with_the_mixin(tmp_path):
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    SFTWithLBE, tokenizer, model = sft_with_lbe(trl, max_positions=32)
    texts = ["the cat sat on the mat", "a dog ran", "the big dog sat on a small rug and the cat ran", "a cat"] * 4
    config_cls = batch_entropy_config(trl.SFTConfig)
    args = config_cls(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=3, logging_steps=1,
        learning_rate=1e-3, save_strategy="no", report_to="none", use_cpu=True, bf16=False, disable_tqdm=True,
        max_length=16, lbe_beta=0.5, lbe_log_per_layer=True,
    )
    assert isinstance(args, trl.SFTConfig) and args.lbe_beta == 0.5
    trainer = SFTWithLBE(model=model, args=args, train_dataset=Dataset.from_dict({"text": texts}), processing_class=tokenizer)
    trainer.train()
    assert trainer.regularizer.layer_names == [f"hidden_states.{i}" for i in range(3)]
    logged = [h for h in trainer.state.log_history if "lbe_loss" in h]
    assert len(logged) == 3 and all(h["lbe_loss"] > 0 and "batch_entropy/layer_2" in h for h in logged)
    assert any("mean_token_accuracy" in h for h in trainer.state.log_history)  # TRL's own metrics still flow
    trainer.save_model()  # pickles the made config class with the arguments
    assert (tmp_path / "out" / REGULARIZER_WEIGHTS_NAME).is_file()


@pytest.mark.parametrize("mode", ["packing", "padding_free"])
def test_sft_trainer_packing_and_padding_free_are_regularized(tmp_path, mode):
    """TRL's packed and padding-free batches are one row of several sequences: LBE reads their boundaries, so every
    step is regularized (the gradient reaches the model) and α is trained and saved."""
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    SFTWithLBE, tokenizer, model = sft_with_lbe(trl, max_positions=64)
    texts = ["the cat sat on the mat", "a dog ran", "the big dog sat on a small rug and the cat ran", "a cat"] * 8
    args = batch_entropy_config(trl.SFTConfig)(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=3, logging_steps=1,
        learning_rate=1e-3, save_strategy="no", report_to="none", use_cpu=True, bf16=False, disable_tqdm=True,
        lbe_beta=0.5, lbe_alpha=2.0, lbe_alpha_learning_rate=0.05,
        **({"packing": True, "max_length": 32} if mode == "packing" else {"padding_free": True, "max_length": None}),
    )
    trainer = SFTWithLBE(model=model, args=args, train_dataset=Dataset.from_dict({"text": texts}), processing_class=tokenizer)
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["input_ids"].shape[0] == 1 and "position_ids" in batch  # one row of several sequences
    seen = []

    def record(module, args, output):
        seen.append(output[0].requires_grad if isinstance(output, tuple) else output.requires_grad)

    handle = model.model.layers[0].register_forward_hook(record)
    with_grad = []
    forward = BatchEntropyRegularizer.forward

    def regularize(self, activations, task_loss, masks=None):
        with_grad.append(all(a.requires_grad for a in activations[1:]))  # the layers' outputs carry LBE's gradient
        return forward(self, activations, task_loss, masks)

    BatchEntropyRegularizer.forward = regularize
    try:
        trainer.train()
    finally:
        BatchEntropyRegularizer.forward = forward
        handle.remove()
    assert with_grad == [True] * 3
    logged = [h for h in trainer.state.log_history if "lbe_loss" in h]
    assert len(logged) == 3 and all(h["lbe_loss"] > 0 for h in logged)
    assert (trainer.regularizer.alpha.detach() < 2.0).all()  # α trained
    # One forward per step, with gradients: the regularized states are those the model trains through (no second,
    # no-grad forward to return outputs).
    assert seen.count(True) == 3
    trainer.save_model()
    assert (tmp_path / "out" / REGULARIZER_WEIGHTS_NAME).is_file()


# --- PEFT ------------------------------------------------------------------------------------------------------------


def test_lora_regularizes_the_base_models_hidden_states_and_saves_an_ordinary_adapter(tmp_path):
    peft = pytest.importorskip("peft")
    from conftest import token_dataset

    base = tiny_bert()
    frozen = {n: p.detach().clone() for n, p in base.named_parameters() if "classifier" not in n}
    model = peft.get_peft_model(base, peft.LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query", "value"]))
    args = make_args(tmp_path, lbe_beta=0.5, lbe_alpha=2.0, lbe_alpha_learning_rate=0.05, learning_rate=1e-2)
    from hf_batch_entropy import BatchEntropyTrainer

    trainer = BatchEntropyTrainer(model=model, args=args, train_dataset=token_dataset())
    trainer.train()
    assert trainer._capture.source == "hidden_states"
    assert trainer.regularizer.layer_names == ["hidden_states.0", "hidden_states.1", "hidden_states.2"]
    assert (trainer.regularizer.alpha.detach() < 2.0).all()  # α trained
    # Only the adapter (and the classifier PEFT keeps trainable for SEQ_CLS) moved.
    for name, param in model.get_base_model().named_parameters():
        key = name.replace(".base_layer", "")
        if key in frozen:
            torch.testing.assert_close(param.detach(), frozen[key], rtol=0, atol=0, msg=name)
    out = tmp_path / "adapter"
    trainer.save_model(str(out))
    assert (out / "adapter_config.json").is_file() and (out / REGULARIZER_WEIGHTS_NAME).is_file()
    assert (out / REGULARIZER_CONFIG_NAME).is_file()
    torch.testing.assert_close(BatchEntropyRegularizer.from_pretrained(out).alpha, trainer.regularizer.alpha.detach())
    # Plain PEFT loads the adapter back onto a fresh base model: the same function.
    loaded = peft.PeftModel.from_pretrained(tiny_bert(), str(out)).eval()
    model.eval()
    batch = {"input_ids": torch.randint(4, 64, (3, 10))}
    torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits)


def _with_decoder_inputs(ds: DictDataset) -> DictDataset:
    """The rows with `decoder_input_ids` (the labels shifted right, as T5 builds them), so that the model can run
    without labels: Trainer pops them for label smoothing or a compute_loss_func."""
    rows = []
    for row in ds.rows:
        labels = row["labels"]
        shifted = torch.cat([torch.zeros(1, dtype=torch.long), labels[:-1]]).masked_fill(
            torch.cat([torch.zeros(1, dtype=torch.bool), labels[:-1] == -100]), 0)
        rows.append({**row, "decoder_input_ids": shifted})
    return DictDataset(rows)


def _t5_cross_entropy(outputs, labels, num_items_in_batch=None):
    logits = outputs.logits
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)


@pytest.mark.parametrize("targets", [None, ["DenseReluDense.act"]], ids=["hidden_states", "hooks"])
def test_label_smoothing_or_compute_loss_func_does_not_change_which_decoder_positions_count(tmp_path, targets):
    """Trainer pops `labels` from the batch for label smoothing or a compute_loss_func; the decoder's padding is still
    told by them (labels == -100), so the first step's entropies (same model, same batch) are those of a plain run."""
    ds = _with_decoder_inputs(copy_task())
    first = {}
    for how in ("plain", "label_smoothing_factor", "compute_loss_func"):
        args = BatchEntropySeq2SeqConfig(
            output_dir=str(tmp_path / how), per_device_train_batch_size=8, learning_rate=1e-3, max_steps=1,
            logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True, lbe_beta=0.5,
            lbe_log_per_layer=True, lbe_target_modules=targets,
            **({"label_smoothing_factor": 0.1} if how == "label_smoothing_factor" else {}),
        )
        extra = {"compute_loss_func": _t5_cross_entropy} if how == "compute_loss_func" else {}
        trainer = BatchEntropySeq2SeqTrainer(model=tiny_t5(), args=args, train_dataset=ds, **extra)
        trainer.train()
        logged = next(h for h in trainer.state.log_history if "batch_entropy_mean" in h)
        first[how] = [logged[f"batch_entropy/layer_{i}"] for i in range(len(trainer.regularizer.layer_names))]
        decoder = [i for i, n in enumerate(trainer.regularizer.layer_names) if "decoder" in n]
        assert decoder  # the decoder is measured
    assert first["label_smoothing_factor"] == first["plain"]
    assert first["compute_loss_func"] == first["plain"]
