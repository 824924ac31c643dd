"""The paper's other families (experiments/resnet, experiments/autoencoder, experiments/vit): each job runs for a few
steps on a slice of digits, writes its JSON (with provenance) and picture, regularizes the layers it says it does,
and its LBE arm trains differently from its β = 0 arm from the same initial weights."""

from __future__ import annotations

import json

import pytest
import torch

from experiments.autoencoder.cli import main as autoencoder_main
from experiments.autoencoder.cli import scores, ssim_kernel
from experiments.families.data import load_images
from experiments.families.report import mean_std
from experiments.resnet.cli import NoShortcut, build_resnet
from experiments.resnet.cli import main as resnet_main
from experiments.vit.cli import main as vit_main

SLICE = ["--dataset", "digits", "--train_samples", "96", "--test_samples", "40", "--seeds", "0", "--max_steps", "3",
         "--batch_size", "16"]


def _check_files(tmp_path, payload):
    record = json.loads((tmp_path / "r.json").read_text())
    assert {"command", "commit", "versions", "machine"} <= set(record["provenance"])
    assert record["provenance"]["command"].startswith(f"python -m experiments.{payload['experiment']} --dataset digits")
    assert record["runs"] == json.loads(json.dumps(payload["runs"]))
    assert (tmp_path / "r.png").stat().st_size > 1000


def _outputs(tmp_path):
    return ["--output", str(tmp_path / "r.json"), "--plot", str(tmp_path / "r.png")]


@pytest.mark.slow
def test_resnet_regularizes_every_residual_block(tmp_path):
    payload = resnet_main([*SLICE, "--betas", "0,0.5", "--blocks_per_stage", "1", "--widths", "8,16",
                           *_outputs(tmp_path)])
    base, lbe = payload["runs"]
    # One activation per ResNetBasicLayer (2 stages × 1 block), not the 3 per-stage hidden states.
    assert base["layers"] == lbe["layers"] == ["resnet.encoder.stages.0.layers.0", "resnet.encoder.stages.1.layers.0"]
    assert 0 <= base["eval"]["eval_accuracy"] <= 1 and payload["model"]["depth"] == 6
    assert base["init_checksum"] == lbe["init_checksum"]  # the pair starts from the same weights
    assert base["task_loss"] != lbe["task_loss"]  # same init and data order: LBE changed the updates
    assert set(payload["summary_accuracy"]) == {"0", "0.5"}
    _check_files(tmp_path, payload)


def test_plain_resnet_has_no_shortcut():
    torch.manual_seed(0)
    residual = build_resnet(1, [8, 16])
    torch.manual_seed(0)
    plain = build_resnet(1, [8, 16], plain=True)
    blocks = [m for m in plain.modules() if type(m).__name__ == "ResNetBasicLayer"]
    assert len(blocks) == 2 and all(isinstance(b.shortcut, NoShortcut) for b in blocks)
    block = blocks[1].eval()  # the stride-2 block: its output is act(layer(x)) alone
    x = torch.randn(2, 8, 4, 4)
    torch.testing.assert_close(block(x), block.activation(block.layer(x)))
    x = torch.randn(2, 1, 28, 28)
    assert not torch.allclose(residual.eval()(pixel_values=x).logits, plain.eval()(pixel_values=x).logits)


@pytest.mark.slow
def test_vit_regularizes_its_hidden_states(tmp_path):
    payload = vit_main([*SLICE, "--betas", "0,0.5", "--layers", "2", "--hidden", "16", "--heads", "2",
                        *_outputs(tmp_path)])
    base, lbe = payload["runs"]
    assert lbe["layers"] == ["hidden_states.0", "hidden_states.1", "hidden_states.2"]  # embeddings + 2 layers
    assert base["init_checksum"] == lbe["init_checksum"]
    assert base["task_loss"] != lbe["task_loss"]
    _check_files(tmp_path, payload)


@pytest.mark.slow
def test_autoencoder_depths_with_and_without_lbe(tmp_path):
    payload = autoencoder_main([*SLICE, "--depths", "1,2", "--width", "16", "--code_size", "4", *_outputs(tmp_path)])
    assert [(r["depth"], r["beta"]) for r in payload["runs"]] == [(1, 0.0), (1, 0.5), (2, 0.0), (2, 0.5)]
    deep = payload["runs"][3]
    assert len(deep["entropies"]) == 5  # 2 encoder layers, the code, 2 decoder layers
    assert payload["runs"][2]["init_checksum"] == deep["init_checksum"] != payload["runs"][0]["init_checksum"]
    assert payload["runs"][2]["task_loss"] != deep["task_loss"]
    for run in payload["runs"]:
        assert 0 < run["test"]["mse"] < 1 and -1 <= run["test"]["ssim"] <= 1
    assert set(payload["mean_image"]) == {"mse", "ssim"}
    _check_files(tmp_path, payload)


def test_ssim_scores_a_perfect_and_a_constant_reconstruction():
    images = load_images("digits", test_samples=20).test_x
    assert ssim_kernel(8) == 3 and ssim_kernel(28) == 11
    perfect = scores(images, images)
    assert perfect["mse"] == 0 and perfect["ssim"] == pytest.approx(1.0, abs=1e-5)
    flat = scores(torch.full_like(images, float(images.mean())), images)
    assert flat["mse"] > 0.01 and flat["ssim"] < 0.2


def test_digits_subset_is_fixed_and_in_unit_range():
    a, b = load_images("digits", 100, 30), load_images("digits", 100, 30)
    assert torch.equal(a.train_x, b.train_x) and a.train_x.shape == (100, 1, 8, 8) and len(a.test_y) == 30
    assert 0 <= float(a.train_x.min()) and float(a.train_x.max()) <= 1
    with pytest.raises(ValueError, match="digits"):
        load_images("cifar")


def test_mean_std_is_the_sample_spread():
    assert mean_std([1.0, 3.0]) == {"mean": 2.0, "std": pytest.approx(2**0.5), "n": 2}
    assert mean_std([5.0])["std"] == 0.0
