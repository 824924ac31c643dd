"""A seconds-long run of scripts/train_vanilla.py: both runs, the table, results.json and the picture."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "scripts", "train_vanilla.py")


def _load_script():
    if "train_vanilla" in sys.modules:
        return sys.modules["train_vanilla"]
    spec = importlib.util.spec_from_file_location("train_vanilla", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["train_vanilla"] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True, scope="module")
def _restore_torch_globals():
    # main() sets the thread count and flush-denormal mode for its CPU runs; leave the rest of the session as it was.
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
    torch.set_flush_denormal(False)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """Both runs of a depth-24 MLP for 20 steps, in-process (the script's main() with an argv)."""
    out = tmp_path_factory.mktemp("vanilla")
    script = _load_script()
    argv = [
        "--depth", "24", "--width", "16", "--max_steps", "20", "--logging_steps", "5", "--eval_steps", "10",
        "--learning_rate", "5e-3", "--per_device_train_batch_size", "64", "--output_dir", str(out),
        "--disable_tqdm", "true", "--seed", "0",
    ]
    results = script.main(argv)
    return out, results, script


def test_writes_results_and_picture(tiny_run):
    out, results, _ = tiny_run
    assert [r["run"] for r in results] == ["baseline", "lbe"]
    with open(out / "results.json") as f:
        saved = json.load(f)
    assert saved == json.loads(json.dumps(results))
    for r in saved:
        assert r["steps"] == 20 and r["depth"] == 24 and r["num_layers"] == 24
        assert 0.0 <= r["test_accuracy"] <= 1.0 and r["test_loss"] > 0
        assert len(r["entropies_end"]) == 24
        assert r["entropy_min"] == min(r["entropies_end"])
        assert r["wall_time_s"] > 0 and r["train_task_loss"] is not None
        assert [e["step"] for e in r["eval_curve"]] == [10, 20]
        assert r["lr_scheduler_type"] == "polynomial"  # the flag's name, not the enum's repr
    assert saved[0]["lbe_beta"] == 0.0 and saved[1]["lbe_beta"] == 0.5
    png = out / "batch_entropy.png"
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 10_000


def test_same_init_and_lbe_raises_entropy(tiny_run):
    out, results, _ = tiny_run
    baseline, lbe = results
    # Both runs start from the same weights (same seed before the model is built).
    assert baseline["init_checksum"] == lbe["init_checksum"]
    # Twenty steps of LBE already lift the (tiny) entropies of this depth-24 network and revive dead layers.
    assert lbe["entropy_mean"] > 2 * baseline["entropy_mean"]
    assert lbe["alive_layers"] > baseline["alive_layers"]


def test_table_lists_both_runs(tiny_run):
    _, results, script = tiny_run
    table = script.format_table(results)
    assert "baseline" in table and "lbe" in table and "test accuracy" in table and "wall time" in table


def test_help_documents_every_flag():
    result = subprocess.run([sys.executable, SCRIPT, "--help"], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 0, result.stderr
    for flag in ("--arch", "--depth", "--width", "--dataset", "--max_steps", "--output_dir", "--lbe_beta",
                 "--lbe_alpha", "--lbe_alpha_min", "--lbe_alpha_learning_rate", "--runs", "--flush_denormal"):
        assert flag in result.stdout, flag


def test_bad_runs_flag(tmp_path):
    script = _load_script()
    with pytest.raises(ValueError, match="--runs"):
        script.main(["--runs", "lbe,foo", "--output_dir", str(tmp_path), "--depth", "2", "--width", "4"])


def test_cnn_single_run(tmp_path):
    script = _load_script()
    results = script.main([
        "--arch", "cnn", "--depth", "3", "--width", "4", "--max_steps", "6", "--logging_steps", "2",
        "--eval_strategy", "no", "--runs", "lbe", "--output_dir", str(tmp_path), "--disable_tqdm", "true",
        "--per_device_train_batch_size", "32",
    ])
    assert len(results) == 1 and results[0]["num_layers"] == 4  # 3 conv layers + the fully connected one
    assert (tmp_path / "batch_entropy.png").exists()


def test_local_image_folder_dataset(tmp_path):
    """--dataset PATH: an image folder (class subfolders) through datasets' imagefolder loader, resized."""
    pytest.importorskip("datasets")
    from PIL import Image

    rng = torch.Generator().manual_seed(0)
    for label in ("cat", "dog"):
        (tmp_path / "images" / label).mkdir(parents=True)
        for i in range(12):
            pixels = (torch.rand(10, 10, generator=rng) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(tmp_path / "images" / label / f"{i}.png")
    script = _load_script()
    results = script.main([
        "--dataset", str(tmp_path / "images"), "--image_size", "6", "--depth", "3", "--width", "8",
        "--max_steps", "4", "--per_device_train_batch_size", "8", "--logging_steps", "2", "--eval_strategy", "no",
        "--runs", "lbe", "--output_dir", str(tmp_path / "out"), "--disable_tqdm", "true",
    ])
    assert results[0]["steps"] == 4 and results[0]["num_layers"] == 3
    # 24 images, no 'test' split: a stratified 20% test split of the train folder.
    assert results[0]["dataset"] == str(tmp_path / "images")
