"""The fully connected autoencoder (`DenseAutoencoderModel`): shapes, loss, hidden states, Auto classes, remote code,
and LBE through `BatchEntropyTrainer` (hidden states by default, forward hooks on one half when asked)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModel

from hf_batch_entropy import BatchEntropyConfig, BatchEntropyTrainer
from experiments.models import AutoencoderOutput, DenseAutoencoderConfig, DenseAutoencoderModel


def _model(depth: int = 3, **kwargs) -> DenseAutoencoderModel:
    torch.manual_seed(0)
    return DenseAutoencoderModel(DenseAutoencoderConfig(depth=depth, width=16, code_size=4, image_size=8, **kwargs))


def test_forward_loss_reconstruction_and_hidden_states():
    model = _model(depth=3)
    x = torch.rand(5, 1, 8, 8)
    out = model(pixel_values=x, output_hidden_states=True)
    assert isinstance(out, AutoencoderOutput)
    assert out.reconstruction.shape == (5, 1, 8, 8)
    assert ((out.reconstruction > 0) & (out.reconstruction < 1)).all()
    assert out.code.shape == (5, 4)
    torch.testing.assert_close(out.loss, ((out.reconstruction - x) ** 2).mean())
    # encoder (3), code, decoder (3)
    assert [tuple(h.shape) for h in out.hidden_states] == [(5, 16)] * 3 + [(5, 4)] + [(5, 16)] * 3
    assert out.hidden_states[3] is out.code
    assert model(pixel_values=x).hidden_states is None
    # Flattened images are accepted, and the tuple form carries the same values.
    loss, rec, code = model(pixel_values=x.flatten(1), return_dict=False)
    torch.testing.assert_close(rec, out.reconstruction)


def test_no_skip_norm_or_dropout_and_pytorch_default_init():
    model = _model(depth=4)
    kinds = {type(m) for m in model.modules()}
    assert not any(issubclass(k, (nn.LayerNorm, nn.BatchNorm1d, nn.Dropout)) for k in kinds)
    w = model.encoder[1].dense.weight
    bound = 1 / 16**0.5  # kaiming_uniform(a=√5) on fan_in 16: U(±1/√fan_in), not normal(0, 0.02)
    assert w.abs().max() <= bound and w.abs().max() > 0.8 * bound


def test_deep_autoencoder_collapses_at_init():
    # Depth 50 per half with PyTorch's default init: every input gets the same code (the batch-entropy problem).
    model = DenseAutoencoderModel(DenseAutoencoderConfig(depth=50, width=32, code_size=4, image_size=8))
    with torch.no_grad():
        hs = model(pixel_values=torch.rand(32, 64), output_hidden_states=True).hidden_states
    assert hs[0].std(0).mean() > 1e-2
    assert hs[50].std(0).max() < 1e-6  # the code


def test_config_validation_and_bad_input():
    with pytest.raises(ValueError, match="depth"):
        DenseAutoencoderConfig(depth=0)
    with pytest.raises(ValueError, match="activation"):
        DenseAutoencoderConfig(activation="relux")
    with pytest.raises(ValueError, match="1×8×8 = 64"):
        _model()(pixel_values=torch.rand(2, 1, 28, 28))
    with pytest.raises(TypeError, match="floating point"):
        _model()(pixel_values=torch.zeros(2, 64, dtype=torch.long))


def test_auto_classes_round_trip(tmp_path):
    model = _model()
    config = AutoConfig.for_model("dense_autoencoder", depth=3, width=16, code_size=4, image_size=8)
    assert type(config) is DenseAutoencoderConfig
    assert type(AutoModel.from_config(config)) is DenseAutoencoderModel
    model.save_pretrained(tmp_path)
    assert {"configuration_autoencoder.py", "modeling_autoencoder.py"} <= set(os.listdir(tmp_path))
    loaded = AutoModel.from_pretrained(tmp_path)
    assert type(loaded) is DenseAutoencoderModel
    x = torch.rand(3, 1, 8, 8)
    assert torch.equal(model(pixel_values=x).reconstruction, loaded(pixel_values=x).reconstruction)


_REMOTE_LOAD = textwrap.dedent(
    """
    import sys

    class _Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "hf_batch_entropy":
                raise ModuleNotFoundError("blocked: " + name)

    sys.meta_path.insert(0, _Block())
    import torch
    from transformers import AutoModel

    folder = sys.argv[1]
    model = AutoModel.from_pretrained(folder, trust_remote_code=True)
    x = torch.load(folder + "/x.pt")
    assert torch.equal(model(pixel_values=x).reconstruction, torch.load(folder + "/rec.pt")), "reconstructions differ"
    assert not [m for m in sys.modules if m.startswith("hf_batch_entropy")]
    print(type(model).__module__, type(model).__name__)
    """
)


def test_trust_remote_code_load_without_our_package(tmp_path):
    model = _model()
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    x = torch.rand(2, 1, 8, 8)
    torch.save(x, folder / "x.pt")
    torch.save(model(pixel_values=x).reconstruction.detach(), folder / "rec.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"), TRANSFORMERS_VERBOSITY="error")
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    result = subprocess.run([sys.executable, "-c", _REMOTE_LOAD, str(folder)], cwd=workdir, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    module, name = result.stdout.split()[-2:]
    assert module.endswith(".modeling_autoencoder") and name == "DenseAutoencoderModel"


class _Images(torch.utils.data.Dataset):
    def __init__(self, n: int):
        g = torch.Generator().manual_seed(0)
        self.x = torch.rand(n, 1, 8, 8, generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"pixel_values": self.x[i]}


def _trainer(tmp_path, **lbe) -> BatchEntropyTrainer:
    args = BatchEntropyConfig(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=16,
                              learning_rate=1e-3, report_to="none", save_strategy="no", use_cpu=True,
                              logging_steps=1, lbe_log_per_layer=True, **lbe)
    return BatchEntropyTrainer(model=_model(depth=3), args=args, train_dataset=_Images(48))


def test_trainer_regularizes_both_halves_and_the_code(tmp_path):
    trainer = _trainer(tmp_path, lbe_beta=0.5)
    trainer.train()
    assert trainer.regularizer.num_layers == 7  # 3 encoder layers, the code, 3 decoder layers
    logs = [entry for entry in trainer.state.log_history if "batch_entropy/layer_6" in entry]
    assert logs and "batch_entropy/layer_7" not in logs[-1]


def test_trainer_targets_one_half_by_module_names(tmp_path):
    trainer = _trainer(tmp_path, lbe_beta=0.5, lbe_target_modules=["re:encoder\\.\\d+\\.act"])
    trainer.train()
    assert trainer.regularizer.num_layers == 3
