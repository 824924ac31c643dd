"""Which positions are real tokens (`tokens.TokenLayout`), on real models: packed and padding-free batches give the
entropies, LBE loss and α gradient of the same examples padded; prompt tuning's virtual tokens and OPT's decoder-only
layout take the attention mask; tiny models from configs, offline."""

from __future__ import annotations

import pytest
import torch
from transformers import DataCollatorWithFlattening, LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

from conftest import DictDataset, make_args
from hf_batch_entropy import BatchEntropyTrainer
from hf_batch_entropy.regularizer import REGULARIZER_WEIGHTS_NAME
from hf_batch_entropy.tokens import TokenLayout, packed_boundaries

LENGTHS = (5, 3, 7, 2, 6)


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    # use_cache=False as in training: with a cache, transformers does not read packed sequences from position_ids.
    return LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                                        pad_token_id=0, use_cache=False))


def sequences(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, 40, (n,), generator=g) for n in LENGTHS]


def padded_batch(seqs: list[torch.Tensor], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-padded, labels -100 at the padding: what DataCollatorForSeq2Seq / a causal-LM collator give."""
    longest = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), longest), pad_id)
    mask = torch.zeros(len(seqs), longest, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)], mask[i, : len(s)] = s, 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def packed_batch(seqs: list[torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """One row of the concatenated sequences, as DataCollatorWithFlattening gives it, with the boundaries only in
    `source` (`cu_seq_lens_q`, `seq_idx` or `position_ids`)."""
    collator = DataCollatorWithFlattening(return_flash_attn_kwargs=True, return_seq_idx=True)
    batch = collator([{"input_ids": s.tolist()} for s in seqs])
    keep = {"input_ids", "labels", "position_ids"}  # the model needs position_ids to keep the sequences apart
    keep |= {"cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k"} if source == "cu_seq_lens_q" else set()
    keep |= {"seq_idx"} if source == "seq_idx" else set()
    return {k: v for k, v in batch.items() if k in keep}


def lbe_step(trainer, model, batch):
    """One training forward and backward through the trainer: (entropies, lbe_loss, task_loss, α's gradient)."""
    model.train()
    model.zero_grad()
    loss = trainer.compute_loss(model, batch)
    lbe = trainer._step_lbe
    trainer._step_lbe = None
    loss.backward()
    alpha_grad = trainer.regularizer.alpha.grad.clone()
    trainer.regularizer.alpha.grad = None
    return lbe.entropies.detach(), lbe.lbe_loss.detach(), lbe.task_loss.detach(), alpha_grad


@pytest.mark.parametrize("source", ["cu_seq_lens_q", "seq_idx", "position_ids"])
def test_packed_and_padded_batches_give_the_same_entropies_loss_and_alpha_gradient(tmp_path, source):
    model = tiny_llama()
    args = make_args(tmp_path, lbe_beta=0.5, lbe_alpha=2.0)
    trainer = BatchEntropyTrainer(model=model, args=args, train_dataset=DictDataset([]))
    seqs = sequences()
    padded = lbe_step(trainer, model, padded_batch(seqs))
    packed = lbe_step(trainer, model, packed_batch(seqs, source))
    assert trainer.regularizer.layer_names == ["hidden_states.0", "hidden_states.1", "hidden_states.2"]
    for name, a, b in zip(("entropies", "lbe_loss", "task_loss", "alpha_grad"), packed, padded):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=name)
    assert packed[1] > 0


def test_packed_boundaries_from_each_source_agree():
    seqs = sequences()
    expected = torch.tensor([0, 5, 8, 15, 17, 23])
    for source in ("cu_seq_lens_q", "seq_idx", "position_ids"):
        cu, longest = packed_boundaries(packed_batch(seqs, source))
        assert cu.tolist() == expected.tolist() and longest == 7, source
    assert packed_boundaries(padded_batch(seqs)) is None  # a padded batch is not packed
    one = {"input_ids": torch.arange(6)[None], "position_ids": torch.arange(6)[None]}
    assert packed_boundaries(one) is None  # one sequence in one row: a batch of one, not a packed batch


@pytest.mark.parametrize("targets", [None, ["act_fn"]], ids=["hidden_states", "hooks"])
def test_data_collator_with_flattening_trains_with_lbe_and_saves_alpha(tmp_path, targets):
    rows = [{"input_ids": s.tolist()} for s in sequences(1) * 4]
    args = make_args(tmp_path, lbe_beta=0.5, lbe_alpha=2.0, lbe_alpha_learning_rate=0.05, per_device_train_batch_size=5,
                     max_steps=3, logging_steps=1, lbe_target_modules=targets)
    trainer = BatchEntropyTrainer(model=tiny_llama(), args=args, train_dataset=DictDataset(rows),
                                  data_collator=DataCollatorWithFlattening())
    trainer.train()
    logged = [h for h in trainer.state.log_history if "lbe_loss" in h]
    assert len(logged) == 3 and all(h["lbe_loss"] > 0 for h in logged)
    assert (trainer.regularizer.alpha.detach() < 2.0).all()  # α trained
    trainer.save_model()
    assert (tmp_path / "out" / REGULARIZER_WEIGHTS_NAME).is_file()


def test_a_packed_row_of_one_sequence_per_step_is_an_error_naming_packing(tmp_path):
    """The guard: a run in which no step can be measured (each packed row holds one sequence) is an error."""
    rows = [{"input_ids": s.tolist()} for s in sequences(1)]
    args = make_args(tmp_path, lbe_beta=0.5, per_device_train_batch_size=1, max_steps=2, logging_steps=1)
    trainer = BatchEntropyTrainer(model=tiny_llama(), args=args, train_dataset=DictDataset(rows),
                                  data_collator=DataCollatorWithFlattening())
    with pytest.raises(RuntimeError, match="packed/padding-free.*cu_seq_lens_q"):
        trainer.train()


# --- prompt tuning ---------------------------------------------------------------------------------------------------


def hidden_entropies(trainer, model, batch):
    model.train()
    trainer.compute_loss(model, batch)
    lbe, trainer._step_lbe = trainer._step_lbe, None
    return lbe.entropies.detach()


def test_prompt_tuning_masks_the_padding_and_keeps_the_virtual_tokens(tmp_path):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(
        tiny_llama(), peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
    )
    trainer = BatchEntropyTrainer(model=model, args=make_args(tmp_path, lbe_beta=0.5), train_dataset=DictDataset([]))
    batch = padded_batch(sequences())
    other_padding = {**batch, "input_ids": batch["input_ids"].masked_fill(batch["attention_mask"] == 0, 7)}
    first = hidden_entropies(trainer, model, batch)
    # Only the ids at masked positions differ: with the mask extended over the 4 virtual tokens, nothing moves.
    torch.testing.assert_close(hidden_entropies(trainer, model, other_padding), first, atol=1e-6, rtol=1e-6)
    # The virtual tokens count as real positions (as PEFT's own attention mask has them).
    layout = TokenLayout(model)
    assert layout.virtual_tokens == 4
    acts = [torch.randn(5, 4 + batch["input_ids"].shape[1], 3)]
    mask = layout.views(batch, acts, ["hidden_states.0"])[1][0]
    assert mask.shape == (5, 11) and mask[:, :4].all() and torch.equal(mask[:, 4:], batch["attention_mask"].bool())


def test_an_unknown_prompt_learning_layout_is_a_clear_error():
    layout = TokenLayout()
    layout.prompt_learning = "SOME_NEW_METHOD"
    batch = padded_batch(sequences())
    with pytest.raises(ValueError, match="SOME_NEW_METHOD.*lbe_ignore_padding=False"):
        layout.views(batch, [torch.randn(5, 10, 3)], ["hidden_states.1"])


# --- decoder-only models whose modules live under `decoder` ----------------------------------------------------------


def tiny_opt(seed: int = 0) -> OPTForCausalLM:
    torch.manual_seed(seed)
    return OPTForCausalLM(OPTConfig(vocab_size=40, hidden_size=16, ffn_dim=32, num_hidden_layers=2,
                                    num_attention_heads=2, max_position_embeddings=64, word_embed_proj_dim=16,
                                    pad_token_id=1, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0))


@pytest.mark.parametrize("source", ["hidden_states", "hooks", "flattened"])
def test_opt_decoder_only_takes_the_attention_mask_whatever_the_labels(tmp_path, source):
    """OPT's modules are under `model.decoder`, but it is decoder-only (its config says so): its activations take the
    attention mask, never the labels' non-(-100) positions. Its feed-forward works on flattened tokens `(B·T, F)`."""
    model = tiny_opt()
    targets = {"hidden_states": None, "hooks": ["self_attn_layer_norm"], "flattened": ["activation_fn"]}[source]
    args = make_args(tmp_path, lbe_beta=0.5, lbe_target_modules=targets)
    trainer = BatchEntropyTrainer(model=model, args=args, train_dataset=DictDataset([]))
    batch = padded_batch(sequences(), pad_id=1)
    completion_only = batch["labels"].clone()
    completion_only[:, :2] = -100  # the prompt's tokens are not trained on, but they are real tokens
    reference = hidden_entropies(trainer, model, batch)
    assert any("decoder" in name for name in trainer.regularizer.layer_names) or source == "hidden_states"
    torch.testing.assert_close(hidden_entropies(trainer, model, {**batch, "labels": completion_only}), reference)
    unlabelled = {k: v for k, v in batch.items() if k != "labels"}
    other_padding = {**batch, "input_ids": batch["input_ids"].masked_fill(batch["attention_mask"] == 0, 9)}
    torch.testing.assert_close(hidden_entropies(trainer, model, other_padding), reference, atol=1e-6, rtol=1e-6)
    assert not TokenLayout(model).in_decoder("model.decoder.layers.0.activation_fn")
    layout_masks = TokenLayout(model).views(unlabelled, [torch.randn(5, 7, 3)], ["model.decoder.layers.0.fc1"])[1]
    assert torch.equal(layout_masks[0], batch["attention_mask"].bool())  # no labels: still the attention mask


def test_t5_decoder_takes_the_decoder_mask_by_config():
    from transformers import T5Config, T5ForConditionalGeneration

    model = T5ForConditionalGeneration(T5Config(vocab_size=40, d_model=16, d_kv=8, d_ff=32, num_layers=1,
                                                num_decoder_layers=1, num_heads=2, decoder_start_token_id=0))
    layout = TokenLayout(model)
    assert layout.is_encoder_decoder and layout.decoder_modules == ("decoder",)
    assert layout.in_decoder("decoder.block.0.layer.1.DenseReluDense.act") and not layout.in_decoder("encoder.block.0")
    enc = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    labels = torch.tensor([[5, 6, -100], [5, 6, 7]])
    _, masks = layout.views({"attention_mask": enc, "labels": labels},
                            [torch.randn(2, 4, 3), torch.randn(2, 3, 3)], ["encoder_hidden_states.0", "decoder_hidden_states.0"])
    assert torch.equal(masks[0], enc.bool()) and torch.equal(masks[1], labels != -100)


# --- masks of other shapes: multiple choice, two towers ---------------------------------------------------------------


def measured_passes(trainer):
    """Record what `trainer` measures in evaluation: per pass, the activations and masks handed to the estimator."""
    passes = []
    original = trainer._measure_eval

    def record(activations, masks):
        passes.append(([a.detach() for a in activations], list(masks)))
        return original(activations, masks)

    trainer._measure_eval = record
    return passes


def choice_batch(num: int = 4, choices: int = 3, length: int = 6, seed: int = 0) -> dict[str, torch.Tensor]:
    """Multiple-choice inputs `(B, C, T)`, each choice right-padded to its own length (2..T)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 64, (num, choices, length), generator=g)
    lengths = torch.randint(2, length + 1, (num, choices), generator=g)
    mask = (torch.arange(length) < lengths.unsqueeze(-1)).long()
    return {"input_ids": ids * mask, "attention_mask": mask, "labels": torch.randint(0, choices, (num,), generator=g)}


class ChoiceScorer(torch.nn.Module):
    """A plain multiple-choice module around a BERT encoder (no Transformers head, no `base_model`), which hands the
    encoder its inputs positionally, as `(B·C, T)`."""

    def __init__(self):
        from transformers import BertModel

        from conftest import tiny_bert_config

        super().__init__()
        torch.manual_seed(0)
        self.bert = BertModel(tiny_bert_config())
        self.score = torch.nn.Linear(32, 1)

    def forward(self, input_ids, attention_mask, labels=None):
        num, choices, length = input_ids.shape
        pooled = self.bert(input_ids.view(-1, length), attention_mask.view(-1, length)).pooler_output
        logits = self.score(pooled).view(num, choices)
        return {"loss": torch.nn.functional.cross_entropy(logits, labels), "logits": logits}


@pytest.mark.parametrize("model_kind, targets", [("bert", None), ("bert", ["intermediate_act_fn"]),
                                                 ("plain", ["intermediate_act_fn"])],
                         ids=["hidden_states", "hooks", "plain-module"])
def test_multiple_choice_is_masked_as_batch_times_choices_sequences(tmp_path, model_kind, targets):
    """`attention_mask` `(B, C, T)`: the model runs `B·C` sequences; each is measured over its own real tokens, exactly
    as the same sequences flattened to `(B·C, T)` and padded."""
    from transformers import BertForMultipleChoice

    from conftest import tiny_bert_config
    from hf_batch_entropy.entropy import batch_entropies

    torch.manual_seed(0)
    model = BertForMultipleChoice(tiny_bert_config()) if model_kind == "bert" else ChoiceScorer()
    batch = choice_batch()
    rows = [{k: v[i] for k, v in batch.items()} for i in range(4)]
    trainer = BatchEntropyTrainer(model=model, args=make_args(tmp_path, per_device_eval_batch_size=4,
                                                              lbe_eval_entropy=True, lbe_target_modules=targets),
                                  eval_dataset=DictDataset(rows))
    passes = measured_passes(trainer)
    trainer.evaluate()
    (activations, masks), = passes
    flat_ids, flat_mask = batch["input_ids"].view(12, 6), batch["attention_mask"].view(12, 6)
    assert all(m is not None and torch.equal(m, flat_mask.bool()) for m in masks)
    # The reference: the same 12 sequences through the backbone, flattened and padded.
    with torch.no_grad():
        if targets is None:
            reference = list(model.bert(flat_ids, attention_mask=flat_mask, output_hidden_states=True).hidden_states)
        else:
            reference = []
            handles = [layer.intermediate.intermediate_act_fn.register_forward_hook(lambda m, a, o: reference.append(o))
                       for layer in model.bert.encoder.layer]
            model.bert(flat_ids, attention_mask=flat_mask)
            for handle in handles:
                handle.remove()
        want = batch_entropies(reference, masks=[flat_mask] * len(reference))
        got = batch_entropies(activations, masks=masks)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    padded_in = batch_entropies(reference)  # the padding counted: another value, so the mask is what matters
    assert (padded_in - want).abs().max() > 1e-3


def tiny_clip(seed: int = 0):
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                         max_position_embeddings=16, eos_token_id=1, bos_token_id=0, pad_token_id=0),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                           image_size=8, patch_size=4, num_channels=3),
        projection_dim=8,
    )
    return CLIPModel(config)


@pytest.mark.parametrize("text_length", [5, 7], ids=["same-length-as-image-tokens", "other-length"])
def test_a_tower_is_never_measured_with_the_other_towers_mask(tmp_path, text_length):
    """CLIP: the text tower's activations take the text's attention mask, the vision tower's (1 + 4 patch tokens)
    none, also when the image tokens are as many as the text tokens and the batches as large (shapes that match)."""
    model = tiny_clip()
    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([2, 5, 3, 4])
    mask = (torch.arange(text_length) < lengths.unsqueeze(1)).long()
    rows = [{"input_ids": torch.randint(2, 40, (text_length,), generator=g) * mask[i], "attention_mask": mask[i],
             "pixel_values": torch.randn(3, 8, 8, generator=g)} for i in range(4)]

    def collate(features):
        stacked = {k: torch.stack([f[k] for f in features]) for k in features[0]}
        return {**stacked, "return_loss": True}

    trainer = BatchEntropyTrainer(model=model, data_collator=collate, eval_dataset=DictDataset(rows),
                                  args=make_args(tmp_path, per_device_eval_batch_size=4, lbe_eval_entropy=True))
    passes = measured_passes(trainer)
    trainer.evaluate()
    (activations, masks), = passes
    names = trainer._layer_names
    text = [i for i, n in enumerate(names) if n.startswith("text_model.")]
    vision = [i for i, n in enumerate(names) if n.startswith("vision_model.")]
    assert len(text) == len(vision) == 2 and len(names) == 4
    assert all(activations[i].shape[:2] == (4, 5) for i in vision)
    for i in text:
        assert masks[i] is not None and torch.equal(masks[i], mask.bool()), names[i]
    for i in vision:
        assert masks[i] is None, names[i]
