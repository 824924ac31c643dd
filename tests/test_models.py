"""Vanilla MLP / CNN as Transformers models: shapes, init, Auto classes, save/load, remote code without our package."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForImageClassification
from transformers.modeling_outputs import ImageClassifierOutput

from experiments.models import (
    VanillaCNNConfig,
    VanillaCNNForImageClassification,
    VanillaMLPConfig,
    VanillaMLPForImageClassification,
    build_vanilla_model,
)


def _mlp(depth: int = 4, width: int = 16, **kw) -> VanillaMLPForImageClassification:
    torch.manual_seed(0)
    return VanillaMLPForImageClassification(VanillaMLPConfig(depth=depth, width=width, **kw))


def _cnn(depth: int = 3, channels: int = 4, **kw) -> VanillaCNNForImageClassification:
    torch.manual_seed(0)
    return VanillaCNNForImageClassification(VanillaCNNConfig(depth=depth, channels=channels, **kw))


def test_mlp_forward_loss_and_hidden_states():
    model = _mlp(depth=5, width=16)
    x = torch.randn(6, 1, 8, 8)
    labels = torch.tensor([0, 1, 2, 3, 4, 5])
    out = model(pixel_values=x, labels=labels, output_hidden_states=True)
    assert isinstance(out, ImageClassifierOutput)
    assert out.logits.shape == (6, 10)
    assert torch.allclose(out.loss, nn.functional.cross_entropy(out.logits, labels))
    # One post-activation tensor per hidden layer, the input not included.
    assert len(out.hidden_states) == 5
    assert all(h.shape == (6, 16) for h in out.hidden_states)
    assert all((h >= 0).all() for h in out.hidden_states), "ReLU outputs are post-activation"
    # The last hidden state feeds the classifier.
    assert torch.allclose(model.classifier(out.hidden_states[-1]), out.logits)
    assert model(pixel_values=x).hidden_states is None
    # Flattened input gives the same logits; tuple output when return_dict=False.
    assert torch.allclose(model(pixel_values=x.flatten(1)).logits, out.logits)
    loss, logits = model(pixel_values=x, labels=labels, return_dict=False)
    assert torch.allclose(logits, out.logits)


def test_cnn_forward_hidden_states():
    model = _cnn(depth=3, channels=4)
    out = model(pixel_values=torch.randn(5, 1, 8, 8), output_hidden_states=True)
    assert out.logits.shape == (5, 10)
    # depth conv layers plus the fully connected hidden layer.
    assert len(out.hidden_states) == 4
    assert [tuple(h.shape) for h in out.hidden_states] == [(5, 4, 8, 8)] * 3 + [(5, 128)]


def test_activations_are_hookable_modules():
    model = _mlp(depth=3, activation="gelu")
    acts = [n for n, m in model.named_modules() if n.endswith(".act")]
    assert acts == ["layers.0.act", "layers.1.act", "layers.2.act"]
    seen = []
    handles = [model.get_submodule(n).register_forward_hook(lambda m, a, o: seen.append(o)) for n in acts]
    out = model(pixel_values=torch.randn(3, 64), output_hidden_states=True)
    for h in handles:
        h.remove()
    assert len(seen) == 3 and all(torch.equal(a, b) for a, b in zip(seen, out.hidden_states))


@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_direct_path_is_bit_identical_to_the_modules(activation):
    """Layers without hooks skip their three module calls; a hook (here a no-op one on every `act`) sends a layer through
    the modules. Both give the same hidden states, loss and gradients, bit for bit, and the hooks still fire."""
    x, labels = torch.randn(16, 1, 8, 8), torch.arange(16) % 10
    results = []
    for hooked in (False, True):
        model = _mlp(depth=8, width=32, activation=activation)
        calls = []
        handles = [layer.act.register_forward_hook(lambda m, a, o: calls.append(1)) for layer in model.layers] if hooked else []
        out = model(pixel_values=x, labels=labels, output_hidden_states=True)
        (out.loss * (1 + sum(h.var(0).mean() for h in out.hidden_states))).backward()
        results.append((out.loss.detach(), [h.detach() for h in out.hidden_states], [p.grad for p in model.parameters()]))
        for handle in handles:
            handle.remove()
        assert len(calls) == (8 if hooked else 0)
    (loss_a, hidden_a, grads_a), (loss_b, hidden_b, grads_b) = results
    assert torch.equal(loss_a, loss_b)
    assert all(torch.equal(a, b) for a, b in zip(hidden_a, hidden_b))
    assert all(torch.equal(a, b) for a, b in zip(grads_a, grads_b))


def test_gradient_checkpointing_gives_the_same_gradients():
    x, labels = torch.randn(8, 1, 8, 8), torch.arange(8)
    grads = []
    for checkpointing in (False, True):
        model = _mlp(depth=6)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            assert all(layer.gradient_checkpointing for layer in model.layers)
        model.train()
        out = model(pixel_values=x, labels=labels, output_hidden_states=True)
        (out.loss + sum(h.var(0).mean() for h in out.hidden_states)).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))


def test_no_skip_norm_or_dropout():
    model = _cnn(depth=2)
    kinds = {type(m) for m in model.modules()}
    assert not any(issubclass(k, (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.Dropout)) for k in kinds)


@pytest.mark.parametrize("builder", [_mlp, _cnn])
def test_pytorch_default_init(builder):
    """The paper's init: PyTorch's own (weights and biases U(±1/√fan_in)), not Transformers' normal(0, 0.02)."""
    model = builder()
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            fan_in = module.weight[0].numel()
            bound = 1 / math.sqrt(fan_in)
            w, b = module.weight.detach(), module.bias.detach()
            assert w.abs().max() <= bound + 1e-6 and b.abs().max() <= bound + 1e-6, name
            if w.numel() >= 256:
                # U(-bound, bound) has std bound/√3; normal(0, 0.02) would give 0.02 whatever the fan-in.
                assert abs(w.std().item() - bound / math.sqrt(3)) < 0.15 * bound, name
            assert b.abs().max() > 0, f"{name}: biases must not be zeroed"


def test_deep_vanilla_mlp_collapses_at_init():
    """The paper's phenomenon, as a sanity check of the init: deep layers see the same activation for every sample."""
    model = _mlp(depth=100, width=32)
    with torch.no_grad():
        hs = model(pixel_values=torch.randn(32, 64), output_hidden_states=True).hidden_states
    assert hs[0].std(0).mean() > 1e-2
    assert hs[-1].std(0).max() < 1e-20


@pytest.mark.parametrize("builder", [_mlp, _cnn])
def test_auto_classes_round_trip(builder, tmp_path):
    model = builder()
    kwargs = {k: v for k, v in model.config.to_diff_dict().items() if k != "model_type"}
    config = AutoConfig.for_model(model.config.model_type, **kwargs)
    assert type(config) is type(model.config)
    assert type(AutoModelForImageClassification.from_config(config)) is type(model)

    model.save_pretrained(tmp_path)
    files = set(os.listdir(tmp_path))
    assert {"config.json", "model.safetensors", "configuration_vanilla.py", "modeling_vanilla.py"} <= files
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path)
    assert type(loaded) is type(model)
    assert loaded.config.to_diff_dict() == model.config.to_diff_dict()
    state, loaded_state = model.state_dict(), loaded.state_dict()
    assert state.keys() == loaded_state.keys()
    # Loaded weights are kept as saved (our _init_weights must not redraw them).
    assert all(torch.equal(state[k], loaded_state[k]) for k in state)
    x = torch.randn(3, 1, 8, 8)
    assert torch.equal(model(pixel_values=x).logits, loaded(pixel_values=x).logits)


def test_orthogonal_init_of_the_mlp():
    """initialization="orthogonal": σ_w·Q weights (rows orthonormal up to σ_w; the classifier's gain 1), N(0, σ_b²)
    biases; the default gain follows the activation (√2 ReLU, 1.05 tanh) and is written into the config."""
    model = _mlp(depth=4, width=16, activation="tanh", initialization="orthogonal", init_bias_std=0.1)
    assert model.config.init_gain == 1.05
    for layer in model.layers[1:]:
        w = layer.dense.weight.detach()
        assert torch.allclose(w @ w.T, 1.05**2 * torch.eye(16), atol=1e-5)
    first = model.layers[0].dense.weight.detach()  # 16 × 64: semi-orthogonal, orthonormal rows
    assert torch.allclose(first @ first.T, 1.05**2 * torch.eye(16), atol=1e-5)
    out = model.classifier.weight.detach()  # 10 × 16, gain 1
    assert torch.allclose(out @ out.T, torch.eye(10), atol=1e-5)
    biases = torch.cat([layer.dense.bias.detach() for layer in model.layers])
    assert 0.07 < biases.std().item() < 0.13
    relu = _mlp(initialization="orthogonal")
    assert relu.config.init_gain == pytest.approx(math.sqrt(2)) and relu.layers[1].dense.bias.abs().max() == 0
    w = relu.layers[1].dense.weight.detach()
    assert torch.allclose(w @ w.T, 2 * torch.eye(16), atol=1e-5)


def test_delta_orthogonal_init_of_the_cnn():
    """initialization="delta_orthogonal" (Xiao et al. 2018): each kernel is zero but its centre tap, σ_w·Q with Q
    (semi-)orthogonal, so each convolution is at initialization an orthogonal map of the channels at every pixel."""
    model = _cnn(depth=3, channels=4, kernel_size=3, activation="tanh", initialization="delta_orthogonal",
                 init_gain=1.2)
    for i, layer in enumerate(model.layers):
        k = layer.conv.weight.detach()
        centre = k[:, :, 1, 1]
        off_centre = k.clone()
        off_centre[:, :, 1, 1] = 0
        assert off_centre.abs().max() == 0 and layer.conv.bias.abs().max() == 0
        gram = centre.T @ centre if i == 0 else centre @ centre.T  # the first maps 1 → 4 channels
        assert torch.allclose(gram, 1.2**2 * torch.eye(gram.shape[0]), atol=1e-5)
    # Hence an isometry of the layer's input (no bias, before the activation).
    x = torch.randn(2, 4, 8, 8)
    conv = model.layers[1].conv
    assert torch.allclose(conv(x).norm(), 1.2 * x.norm(), rtol=1e-5)
    fc = model.fc.dense.weight.detach()  # 128 × 256: orthonormal rows times σ_w
    assert torch.allclose(fc @ fc.T, 1.2**2 * torch.eye(128), atol=1e-4)


@pytest.mark.parametrize("builder, scheme", [(_mlp, "orthogonal"), (_cnn, "delta_orthogonal")])
def test_initialization_round_trips_through_save_pretrained(builder, scheme, tmp_path):
    model = builder(activation="tanh", initialization=scheme, init_bias_std=0.05)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path)
    assert (loaded.config.initialization, loaded.config.init_gain, loaded.config.init_bias_std) == (scheme, 1.05, 0.05)
    # The saved weights come back as they were: loading redraws none of them (the delta kernels' zeros included).
    state, loaded_state = model.state_dict(), loaded.state_dict()
    assert all(torch.equal(state[k], loaded_state[k]) for k in state)
    # A fresh model from the saved config draws the same scheme.
    torch.manual_seed(1)
    fresh = type(model)(loaded.config)
    assert fresh.config.initialization == scheme and fresh.classifier.bias.abs().max() < 0.5


def test_config_validation():
    with pytest.raises(ValueError, match="activation"):
        VanillaMLPConfig(activation="relux")
    with pytest.raises(ValueError, match="depth"):
        VanillaMLPConfig(depth=0)
    with pytest.raises(ValueError, match="kernel_size"):
        VanillaCNNConfig(kernel_size=2)
    assert VanillaMLPConfig().num_labels == 10
    assert VanillaMLPConfig(num_labels=3).num_labels == 3
    assert VanillaCNNConfig(image_size=28).fc_size == 2 * 28 * 28
    with pytest.raises(ValueError, match="arch"):
        build_vanilla_model("rnn", depth=2, width=4)
    with pytest.raises(ValueError, match=r"initialization must be one of \('default', 'orthogonal'\)"):
        VanillaMLPConfig(initialization="delta_orthogonal")
    with pytest.raises(ValueError, match="initialization must be one of .*'delta_orthogonal'"):
        VanillaCNNConfig(initialization="orthogonal")
    with pytest.raises(ValueError, match="init_gain must be a number > 0"):
        VanillaMLPConfig(initialization="orthogonal", init_gain=0)
    with pytest.raises(ValueError, match="init_bias_std must be a number >= 0"):
        VanillaCNNConfig(init_bias_std=-1.0)
    assert VanillaMLPConfig().init_gain is None  # the default init has no gain


def test_bad_input_shape_is_a_clear_error():
    with pytest.raises(ValueError, match="64 values per sample"):
        _mlp()(pixel_values=torch.randn(2, 1, 28, 28))
    with pytest.raises(ValueError, match=r"\(B, 1, 8, 8\)"):
        _cnn()(pixel_values=torch.randn(2, 3, 8, 8))
    with pytest.raises(TypeError, match="floating point"):
        _mlp()(pixel_values=torch.zeros(2, 64, dtype=torch.long))


_REMOTE_LOAD = textwrap.dedent(
    """
    import sys

    class _Block:
        # Make hf_batch_entropy unimportable, even through the editable install's finder.
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "hf_batch_entropy":
                raise ModuleNotFoundError("blocked: " + name)

    sys.meta_path.insert(0, _Block())
    try:
        import hf_batch_entropy  # noqa: F401
    except ModuleNotFoundError:
        pass
    else:
        raise SystemExit("hf_batch_entropy is importable: the test would prove nothing")

    import torch
    from transformers import AutoModelForImageClassification

    folder = sys.argv[1]
    model = AutoModelForImageClassification.from_pretrained(folder, trust_remote_code=True)
    x = torch.load(folder + "/x.pt")
    expected = torch.load(folder + "/logits.pt")
    assert torch.equal(model(pixel_values=x).logits, expected), "logits differ"
    assert not [m for m in sys.modules if m.startswith("hf_batch_entropy")]
    print(type(model).__module__, type(model).__name__)
    """
)


@pytest.mark.parametrize("builder", [_mlp, _cnn])
def test_trust_remote_code_load_without_our_package(builder, tmp_path):
    model = builder()
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    x = torch.randn(2, 1, 8, 8)
    torch.save(x, folder / "x.pt")
    torch.save(model(pixel_values=x).logits.detach(), folder / "logits.pt")
    repo_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"), TRANSFORMERS_VERBOSITY="error")
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    assert not str(workdir).startswith(repo_root)
    result = subprocess.run(
        [sys.executable, "-c", _REMOTE_LOAD, str(folder)],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    module, name = result.stdout.split()[-2:]
    # Loaded from the copied remote code, not from our package.
    assert module.startswith("transformers_modules.") and module.endswith(".modeling_vanilla")
    assert name == type(model).__name__
