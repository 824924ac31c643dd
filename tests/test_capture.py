"""Choosing layers (PEFT-style targets) and capturing them with hooks or hidden states."""

import pytest
import torch
from torch import nn

from transformers import BertForSequenceClassification, BertModel

from conftest import KwargsToBackbone, TinyMLP, tiny_bert, tiny_bert_config
from hf_batch_entropy.capture import (
    ForwardHookCapture,
    HiddenStatesCapture,
    accepts_hidden_states,
    default_target_modules,
    resolve_target_modules,
    select_capture,
)


def names(pairs):
    return [n for n, _ in pairs]


def test_defaults_are_activation_modules_then_linear_layers():
    seq = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.GELU(), nn.Linear(4, 2), nn.Softmax(-1))
    assert names(default_target_modules(seq)) == ["1", "3"]
    no_act = nn.Sequential(nn.Linear(4, 4), nn.Conv1d(1, 1, 1), nn.Identity())
    assert names(default_target_modules(no_act)) == ["0", "1"]
    # transformers' own activation modules count too (BERT's GELUActivation).
    assert names(default_target_modules(tiny_bert())) == [
        "bert.encoder.layer.0.intermediate.intermediate_act_fn",
        "bert.encoder.layer.1.intermediate.intermediate_act_fn",
        "bert.pooler.activation",
    ]


def test_targets_by_exact_name_suffix_regex_and_class():
    model = TinyMLP(depth=3)
    assert names(resolve_target_modules(model, ["stem"])) == ["stem"]
    # "1" is a suffix of the block "blocks.1" and of each block's activation "blocks.<i>.1".
    assert names(resolve_target_modules(model, ["1"])) == ["blocks.0.1", "blocks.1", "blocks.1.1", "blocks.2.1"]
    assert names(resolve_target_modules(model, ["blocks.1.0", "head"])) == ["blocks.1.0", "head"]
    assert names(resolve_target_modules(model, r"blocks\.[02]\.0")) == ["blocks.0.0", "blocks.2.0"]
    assert names(resolve_target_modules(model, [r"re:blocks\.\d\.1"])) == ["blocks.0.1", "blocks.1.1", "blocks.2.1"]
    assert names(resolve_target_modules(model, [nn.Tanh])) == ["blocks.0.1", "blocks.1.1", "blocks.2.1"]
    # A suffix must be a whole dotted component: "lock" is not a suffix of "blocks".
    with pytest.raises(ValueError, match="matches no module"):
        resolve_target_modules(model, ["lock"])


def test_nothing_to_hook_is_an_error():
    class Bare(nn.Module):
        def forward(self, x):
            return x * 2

    with pytest.raises(ValueError, match="lbe_target_modules"):
        resolve_target_modules(Bare(), None)


def test_hooks_capture_only_inside_capturing_and_forget_after_collect():
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    capture = ForwardHookCapture(resolve_target_modules(seq, None))
    x = torch.randn(5, 4)
    seq(x)  # outside capturing(): nothing recorded
    assert capture.collect() == ([], [])
    with capture.capturing():
        out = seq(x)
    acts, layer_names = capture.collect()
    assert layer_names == ["1", "3"]
    assert [a.shape for a in acts] == [(5, 8), (5, 8)]
    torch.testing.assert_close(acts[1], torch.relu(seq[2](torch.relu(seq[0](x)))))
    assert out.requires_grad and acts[0].requires_grad  # part of the graph, so LBE trains through them
    assert capture.collect() == ([], [])  # nothing is held past the step
    capture.remove()
    with capture.capturing():
        seq(x)
    assert capture.collect() == ([], [])


def test_shared_module_called_twice_gives_two_layers():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.act = nn.Linear(3, 3), nn.Linear(3, 3), nn.ReLU()

        def forward(self, x):
            return self.act(self.b(self.act(self.a(x))))

    model = Shared()
    capture = ForwardHookCapture(resolve_target_modules(model, None))
    with capture.capturing():
        model(torch.randn(4, 3))
    assert capture.collect()[1] == ["act", "act#1"]


def test_hidden_states_capture_and_restore():
    model = tiny_bert()
    capture = HiddenStatesCapture(model)
    inputs = capture.prepare_inputs({"input_ids": torch.randint(4, 64, (3, 7))})
    assert inputs["output_hidden_states"] is True and inputs["return_dict"] is True
    outputs = model(**inputs)
    acts, layer_names = capture.collect(outputs)
    assert layer_names == ["hidden_states.0", "hidden_states.1", "hidden_states.2"]  # embeddings + 2 layers
    assert all(a.shape == (3, 7, 32) for a in acts)
    stripped = capture.restore(outputs)
    assert stripped.hidden_states is None and "hidden_states" not in stripped.keys()
    torch.testing.assert_close(stripped.logits, outputs.logits)
    assert capture.restore(outputs, keep_hidden_states=True).hidden_states is outputs.hidden_states


def test_hidden_states_of_a_tuple_returning_model_are_found_and_the_tuple_comes_back():
    model = tiny_bert(return_dict=False)
    capture = HiddenStatesCapture(model)
    outputs = model(**capture.prepare_inputs({"input_ids": torch.randint(4, 64, (3, 7))}))
    assert len(capture.collect(outputs)[0]) == 3
    restored = capture.restore(outputs)
    assert isinstance(restored, tuple) and len(restored) == 1  # (logits,), as return_dict=False gives without labels
    torch.testing.assert_close(restored[0], outputs.logits)
    # A caller that asks for a ModelOutput explicitly gets one, whatever the config says.
    capture.prepare_inputs({"input_ids": torch.randint(4, 64, (3, 7)), "return_dict": True})
    assert not isinstance(capture.restore(outputs), tuple)


def _probe_with(model, batch):
    def probe(capture):
        with capture.capturing():
            outputs = model(**capture.prepare_inputs(batch))
        return capture.collect(outputs)

    return probe


def test_select_capture_prefers_hidden_states_then_hooks():
    batch = {"input_ids": torch.randint(4, 64, (3, 7))}
    model = tiny_bert()
    capture, acts, names = select_capture(model, None, _probe_with(model, batch))
    assert capture.source == "hidden_states" and len(acts) == 3
    capture, acts, names = select_capture(model, ["intermediate_act_fn"], _probe_with(model, batch))
    assert capture.source == "forward_hooks" and names == [f"bert.encoder.layer.{i}.intermediate.intermediate_act_fn" for i in range(2)]
    capture.remove()


def test_select_capture_falls_back_to_hooks_for_a_forward_without_output_hidden_states():
    class NoHiddenStates(BertForSequenceClassification):
        def forward(self, input_ids, labels=None):  # no output_hidden_states, no **kwargs
            return super().forward(input_ids=input_ids, labels=labels)

    model = NoHiddenStates(tiny_bert_config())
    assert not accepts_hidden_states(model)
    capture, acts, names = select_capture(model, None, _probe_with(model, {"input_ids": torch.randint(4, 64, (3, 7))}))
    assert capture.source == "forward_hooks" and names and all("act" in n for n in names)
    capture.remove()


def test_a_forward_handing_output_hidden_states_to_a_module_without_it_falls_back_to_hooks(caplog):
    """The keyword is dropped from that module's call (the forward runs as without LBE), no hidden states come back,
    and the default modules' outputs are the activations, said in one INFO line."""
    model = KwargsToBackbone()
    x = torch.randn(4, 8)
    capture = select_capture(model, None)
    with caplog.at_level("INFO", logger="hf_batch_entropy"):
        with capture.capturing():
            outputs = model(**capture.prepare_inputs({"x": x}))
        acts, layers = capture.collect(outputs)
    assert capture.source == "forward_hooks" and layers == names(default_target_modules(model))
    torch.testing.assert_close(outputs["logits"], model(x)["logits"], rtol=0, atol=0)
    assert [r.levelname for r in caplog.records] == ["INFO"] and "output_hidden_states" in caplog.records[0].getMessage()
    capture.remove()


class KwargsToFunction(KwargsToBackbone):
    def forward(self, x, labels=None, **kwargs):
        return {"logits": torch.nn.functional.softmax(self.backbone(x)["logits"], dim=-1, **kwargs)}


def test_a_forward_handing_output_hidden_states_to_a_function_names_the_fix():
    """A call without a module to drop the keyword from: an error that says to set `lbe_target_modules`; a probe (the
    diagnosis) takes the hooks and runs its forward again."""
    model, batch = KwargsToFunction(), {"x": torch.randn(4, 8)}
    capture = select_capture(model, None)
    with pytest.raises(TypeError, match="Pass lbe_target_modules"), capture.capturing():
        model(**capture.prepare_inputs(batch))
    capture.remove()
    capture, acts, layers = select_capture(model, None, _probe_with(model, batch))
    assert capture.source == "forward_hooks" and layers == names(default_target_modules(model))
    capture.remove()


def test_hooks_measure_the_forward_with_gradients_and_keep_its_inputs():
    """A block with gradients measures the model's first forward that has them (a no-grad forward before or after it,
    a reference or metrics forward, is left out), and `inputs_seen` gives the keywords that forward got; a block
    without gradients (evaluation) measures the forward at the same place (the first before any training)."""
    torch.manual_seed(0)
    model = TinyMLP(depth=2)
    capture = ForwardHookCapture(resolve_target_modules(model, None), model)
    first, second = torch.randn(4, 8), torch.randn(6, 8)
    with capture.capturing():
        with torch.no_grad():
            model(x=first)  # e.g. a KL or reference forward before the policy's
        model(x=second)
        with torch.no_grad():
            model(x=first)  # e.g. a metrics forward after it
    seen = capture.inputs_seen({"x": first, "labels": 1})
    acts, layer_names = capture.collect()
    assert layer_names == ["blocks.0.1", "blocks.1.1"]  # once each: one forward measured
    assert all(a.requires_grad and a.shape[0] == 6 for a in acts)
    assert seen["x"] is second and seen["labels"] == 1  # the measured forward's inputs, the batch's for the rest
    with torch.no_grad(), capture.capturing():
        model(x=first)
        model(x=second)  # the second call, as in training
        model(x=first)
    acts, layer_names = capture.collect()
    assert layer_names == ["blocks.0.1", "blocks.1.1"] and acts[0].shape[0] == 6
    capture.remove()
    fresh = ForwardHookCapture(resolve_target_modules(model, None), model)
    with torch.no_grad(), fresh.capturing():
        model(x=first)
        model(x=second)
    acts, layer_names = fresh.collect()
    assert layer_names == ["blocks.0.1", "blocks.1.1"] and acts[0].shape[0] == 4  # before any training: the first
    fresh.remove()


def test_hidden_states_come_from_the_forward_with_gradients():
    model = tiny_bert()
    capture = HiddenStatesCapture(model)
    ids = torch.randint(4, 64, (3, 7))
    with capture.capturing():
        with torch.no_grad():
            model(**capture.prepare_inputs({"input_ids": ids[:2]}))
        outputs = model(input_ids=ids)  # keywords built by the caller: asked for its hidden states by the hook
        with torch.no_grad():
            late = model(**capture.prepare_inputs({"input_ids": ids[:1]}))
    acts, layer_names = capture.collect(late)
    assert layer_names == ["hidden_states.0", "hidden_states.1", "hidden_states.2"]
    assert all(a.requires_grad and a.shape[0] == 3 for a in acts)
    assert outputs.hidden_states is not None
    capture.remove()


def test_a_stop_gradient_branch_is_left_out_and_reentrant_checkpointing_is_an_error():
    class StopGradient(TinyMLP):
        def forward(self, x, labels=None):
            with torch.no_grad():
                self.blocks[0](self.stem(x))  # a stop-gradient branch through a hooked module
            return super().forward(x, labels)

    model = StopGradient(depth=2)
    capture = ForwardHookCapture(resolve_target_modules(model, None), model)
    with capture.capturing():
        model(x=torch.randn(4, 8))
    assert capture.collect()[1] == ["blocks.0.1", "blocks.1.1"]

    class Checkpointed(TinyMLP):
        def forward(self, x, labels=None):
            h = self.stem(x)
            for block in self.blocks:
                h = torch.utils.checkpoint.checkpoint(block, h, use_reentrant=True)
            return {"logits": self.head(h)}

    model = Checkpointed(depth=2)
    capture = ForwardHookCapture(resolve_target_modules(model, None), model)
    with capture.capturing():
        model(x=torch.randn(4, 8, requires_grad=True))
    with pytest.raises(RuntimeError, match="blocks.0.1.*without gradients.*use_reentrant': False"):
        capture.collect()


class StackedHiddenStatesBert(BertModel):
    """A Transformers model (a backbone: the only module whose outputs hold hidden states) that returns its hidden
    states as one tensor `(B, L+1, T, H)`, not a tuple of layers."""

    def forward(self, *args, **kwargs):
        outputs = super().forward(*args, **kwargs)
        if outputs.hidden_states is not None:
            outputs.hidden_states = torch.stack(outputs.hidden_states, dim=1)
        return outputs


def test_hidden_states_as_one_tensor_is_an_error_naming_the_model_and_the_fix():
    torch.manual_seed(0)
    model = StackedHiddenStatesBert(tiny_bert_config())
    batch = {"input_ids": torch.randint(4, 64, (3, 7))}
    capture = select_capture(model, None)
    with capture.capturing():
        outputs = model(**capture.prepare_inputs(batch))
    # Before: the tensor was iterated along its first dimension, the batch's 3 examples taken as 3 layers, silently.
    with pytest.raises(ValueError, match=r"StackedHiddenStatesBert returned its hidden_states as one tensor.*"
                                         r"lbe_target_modules"):
        capture.collect(outputs)


class Gated(nn.Module):
    """An MLP whose `gate` module returns a bool mask (`x > 0`), used to zero half of the units."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 8)
        self.gate = Positive()
        self.act = nn.Tanh()
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        h = self.fc(x)
        return self.head(self.act(h) * self.gate(h))


class Positive(nn.Module):
    def forward(self, x):
        return x > 0


@pytest.mark.parametrize("target", ["gate", "argmax"])
def test_integer_or_boolean_module_output_is_an_error_naming_the_module(target):
    model = Gated()
    if target == "argmax":
        model.gate.forward = lambda x: x.argmax(-1, keepdim=True)  # an int64 output
    capture = ForwardHookCapture(resolve_target_modules(model, ["act", "gate"]), model)
    with pytest.raises(TypeError, match=r"'gate' \(Positive\) returned a torch\.(bool|int64) tensor.*lbe_target_modules"):
        with capture.capturing():
            model(torch.randn(5, 4))
    # The float module alone is fine.
    capture = ForwardHookCapture(resolve_target_modules(model, ["act"]), model)
    with capture.capturing():
        model(torch.randn(5, 4))
    assert capture.collect()[1] == ["act"]
