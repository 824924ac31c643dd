"""scripts/train_vanilla.py in seconds: the frontier (ladder × seeds × runs, summary, provenance, picture), the
single-pair mode, the presets, the reference layer choice, and a re-run of the documented reproducibility
configuration against its stored JSON (docs/results/vanilla_repro_depth20.json)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "scripts", "train_vanilla.py")
REPRO_JSON = os.path.join(REPO, "docs", "results", "vanilla_repro_depth20.json")

TINY = ["--width", "16", "--max_steps", "20", "--logging_steps", "5", "--eval_steps", "10", "--learning_rate", "5e-3",
        "--per_device_train_batch_size", "64", "--disable_tqdm", "true"]


def _load_script():
    if "train_vanilla" in sys.modules:
        return sys.modules["train_vanilla"]
    # On sys.path too, so that the worker processes of --workers 2 (spawned) can import it by name.
    sys.path.insert(0, os.path.dirname(SCRIPT))
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
def tiny_frontier(tmp_path_factory):
    """Depths 4 and 8, 2 seeds, baseline + LBE + the ceiling, in two worker processes."""
    out = tmp_path_factory.mktemp("frontier")
    script = _load_script()
    report = script.main(["--depths", "4,8", "--num_seeds", "2", "--workers", "2", "--output_dir", str(out)] + TINY)
    return out, report, script


def test_frontier_runs_summary_and_picture(tiny_frontier):
    out, report, _ = tiny_frontier
    with open(out / "results.json") as f:
        saved = json.load(f)
    assert saved == json.loads(json.dumps(report))
    runs = saved["runs"]
    assert sorted(r["name"] for r in runs) == sorted(
        [f"{kind}_depth{d}_seed{s}" for kind in ("baseline", "lbe") for d in (4, 8) for s in (0, 1)]
        + ["ceiling_depth2_seed0", "ceiling_depth2_seed1"]
    )
    for r in runs:
        assert r["steps"] == 20 and r["num_layers"] == r["depth"] == len(r["entropies_end"])
        assert [e["step"] for e in r["eval_curve"]] == [10, 20]
        assert all(e["time_s"] > 0 and set(e["effective_rank"]) == {"1", "2"} | ({"5"} if r["depth"] >= 5 else set())
                   for e in r["eval_curve"])
        assert r["seed"] == 42 + r["seed_index"] and r["split_seed"] == 42 + r["seed_index"]
    by_name = {r["name"]: r for r in runs}
    for d in (4, 8):
        for s in (0, 1):
            # A depth's baseline and LBE run of a seed start from the same weights; the seeds do not.
            assert by_name[f"baseline_depth{d}_seed{s}"]["init_checksum"] == by_name[f"lbe_depth{d}_seed{s}"]["init_checksum"]
        assert by_name[f"lbe_depth{d}_seed0"]["init_checksum"] != by_name[f"lbe_depth{d}_seed1"]["init_checksum"]
    assert by_name["ceiling_depth2_seed0"]["init"] == "he_normal" and by_name["lbe_depth4_seed0"]["lbe_beta"] == 0.5
    # The summary is the mean and sample std of the per-seed accuracies.
    assert len(saved["summary"]) == 5
    for s in saved["summary"]:
        accs = [by_name[f"{s['run']}_depth{s['depth']}_seed{i}"]["test_accuracy"] for i in (0, 1)]
        assert s["test_accuracy_per_seed"] == accs and s["seeds"] == 2
        assert s["test_accuracy_mean"] == pytest.approx(np.mean(accs))
        assert s["test_accuracy_std"] == pytest.approx(np.std(accs, ddof=1))
    with open(out / "frontier.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    # Only the two files: no empty per-run folders left behind.
    assert sorted(os.listdir(out)) == ["frontier.png", "results.json"]


def test_results_record_provenance(tiny_frontier):
    _, report, _ = tiny_frontier
    meta = report["meta"]
    assert meta["command"].startswith("python scripts/train_vanilla.py --depths 4,8")
    assert meta["argv"][-len(TINY):] == TINY
    assert meta["commit"] is None or len(meta["commit"]) == 40
    assert meta["dirty"] in (True, False, None)
    assert set(meta["versions"]) >= {"torch", "transformers", "hf_batch_entropy", "numpy", "python"}
    assert meta["versions"]["torch"] == torch.__version__
    assert meta["machine"]["cpu"] and meta["machine"]["logical_cpus"] == os.cpu_count()
    assert meta["machine"]["workers"] == 2 and meta["machine"]["torch_threads_per_run"] == 1
    assert meta["total_wall_time_s"] > 0


def test_workers_do_not_change_the_numbers(tiny_frontier, tmp_path):
    """A run gives the same numbers in this process as in a worker process, and whatever else is in the job."""
    _, report, script = tiny_frontier
    alone = script.main(["--depths", "8", "--num_seeds", "2", "--runs", "lbe", "--workers", "1",
                         "--output_dir", str(tmp_path)] + TINY)
    by_name = {r["name"]: r for r in report["runs"]}
    for r in alone["runs"]:
        twin = by_name[r["name"]]
        assert r["test_loss"] == twin["test_loss"] and r["entropies_end"] == twin["entropies_end"]


def test_single_pair_lbe_raises_entropy(tmp_path):
    script = _load_script()
    report = script.main(["--depth", "24", "--num_seeds", "1", "--workers", "1", "--seed", "0",
                          "--output_dir", str(tmp_path)] + TINY)
    baseline, lbe = sorted(report["runs"], key=lambda r: r["run"])
    assert (baseline["run"], lbe["run"]) == ("baseline", "lbe")
    assert baseline["init_checksum"] == lbe["init_checksum"]
    # Twenty steps of LBE already lift the (tiny) entropies of this depth-24 network and revive dead layers.
    assert lbe["entropy_mean"] > 2 * baseline["entropy_mean"]
    assert lbe["alive_layers"] > baseline["alive_layers"]
    assert lbe["regularized_layers"] == 24
    assert (tmp_path / "batch_entropy.png").stat().st_size > 10_000
    assert sorted(os.listdir(tmp_path)) == ["batch_entropy.png", "results.json"]
    table = script.format_table(report["runs"])
    assert table.splitlines()[0].split() == ["run", "baseline", "lbe"]


def test_reference_layer_choice(tmp_path):
    script = _load_script()
    assert script.reference_target_modules("mlp", 5) == ["layers.1", "layers.2", "layers.3"]
    assert script.reference_target_modules("cnn", 3) == ["layers.1", "layers.2", "fc"]
    report = script.main(["--depth", "6", "--runs", "lbe", "--num_seeds", "1", "--workers", "1",
                          "--lbe_layers", "reference", "--output_dir", str(tmp_path)] + TINY)
    (run,) = report["runs"]
    # The 4 middle layers are regularized; all 6 are still measured at the end.
    assert run["regularized_layers"] == 4 and run["num_layers"] == 6 and run["lbe_layers"] == "reference"


def test_presets_are_flags_the_command_line_overrides():
    script = _load_script()
    argv = script.expand_preset(["--preset", "long", "--max_steps", "7"])
    model_args, data_args, training_args = script.parse_arguments(argv)
    assert model_args.depths == "500" and data_args.runs == "lbe" and data_args.preset == "long"
    assert training_args.max_steps == 7 and training_args.learning_rate == pytest.approx(1e-4)
    model_args, _, training_args = script.parse_arguments(script.expand_preset(["--depth", "30"]))
    assert model_args.depths == "30" and training_args.max_steps == 400  # the frontier's recipe
    assert training_args.lr_scheduler_kwargs == {"power": 2.0}
    with pytest.raises(ValueError, match="--preset"):
        script.expand_preset(["--preset", "nope"])


def test_reproduces_the_documented_short_run(tmp_path):
    """The stored configuration re-run here gives the stored figures (docs/vanilla.md, "Reproducibility"): the same
    test accuracy within one test example, and losses and final entropies within 1e-4 (relative)."""
    with open(REPRO_JSON) as f:
        stored = json.load(f)
    argv = list(stored["meta"]["argv"])
    i = argv.index("--output_dir")
    argv[i + 1] = str(tmp_path)
    report = _load_script().main(argv)
    assert len(report["runs"]) == len(stored["runs"])
    for new, old in zip(report["runs"], stored["runs"]):
        assert new["name"] == old["name"] and new["steps"] == old["steps"]
        assert new["init_checksum"] == pytest.approx(old["init_checksum"], rel=1e-12)
        one_example = 1.0 / 360 + 1e-9
        assert abs(new["test_accuracy"] - old["test_accuracy"]) <= one_example, new["name"]
        assert [e["accuracy"] for e in new["eval_curve"]] == pytest.approx(
            [e["accuracy"] for e in old["eval_curve"]], abs=one_example)
        assert new["test_loss"] == pytest.approx(old["test_loss"], rel=1e-4)
        assert new["entropies_end"] == pytest.approx(old["entropies_end"], rel=1e-4, abs=1e-12)


def test_help_documents_every_flag():
    result = subprocess.run([sys.executable, SCRIPT, "--help"], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 0, result.stderr
    for flag in ("--arch", "--depth", "--depths", "--width", "--dataset", "--max_steps", "--output_dir", "--lbe_beta",
                 "--lbe_alpha", "--lbe_alpha_min", "--lbe_alpha_learning_rate", "--runs", "--flush_denormal",
                 "--preset", "--num_seeds", "--workers", "--lbe_layers", "--ceiling", "--ceiling_depth"):
        assert flag in result.stdout, flag


@pytest.mark.parametrize("argv, match", [
    (["--runs", "lbe,foo"], "--runs"),
    (["--depths", "4,x"], "--depths"),
    (["--num_seeds", "0"], "--num_seeds"),
])
def test_bad_flags(tmp_path, argv, match):
    script = _load_script()
    with pytest.raises(ValueError, match=match):
        script.main(argv + ["--output_dir", str(tmp_path), "--width", "4"])


def test_cnn_single_run(tmp_path):
    script = _load_script()
    report = script.main([
        "--arch", "cnn", "--depth", "3", "--width", "4", "--max_steps", "6", "--logging_steps", "2",
        "--eval_strategy", "no", "--runs", "lbe", "--num_seeds", "1", "--workers", "1", "--output_dir", str(tmp_path),
        "--disable_tqdm", "true", "--per_device_train_batch_size", "32",
    ])
    assert len(report["runs"]) == 1 and report["runs"][0]["num_layers"] == 4  # 3 conv layers + the fully connected one
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
    report = script.main([
        "--dataset", str(tmp_path / "images"), "--image_size", "6", "--depth", "3", "--width", "8",
        "--max_steps", "4", "--per_device_train_batch_size", "8", "--logging_steps", "2", "--eval_strategy", "no",
        "--runs", "lbe", "--num_seeds", "1", "--workers", "1", "--output_dir", str(tmp_path / "out"),
        "--disable_tqdm", "true",
    ])
    (run,) = report["runs"]
    assert run["steps"] == 4 and run["num_layers"] == 3
    # 24 images, no 'test' split: a stratified 20% test split of the train folder.
    assert run["dataset"] == str(tmp_path / "images")


def test_interpretation_follows_the_numbers():
    script = _load_script()

    def row(run, depth, acc, alive=None, layers=None):
        return {"run": run, "depth": depth, "seeds": 3, "test_accuracy_mean": acc, "test_accuracy_std": 0.01,
                "alive_layers_mean": alive or depth, "num_layers": layers or depth}

    summary = [row("ceiling", 2, 0.97), row("baseline", 10, 0.8), row("lbe", 10, 0.7), row("baseline", 30, 0.1),
               row("lbe", 30, 0.3), row("baseline", 500, 0.1), row("lbe", 500, 0.1, alive=300, layers=500)]
    text = script.interpret(summary, 400)
    assert "chance (< 15%) from depth 30 on" in text and "learns up to depth 30 (30.0% ± 1.0)" in text
    assert "at depth 500 neither learns within 400 steps (LBE has revived 300 of its 500 layers" in text
    assert "2-layer network reaches 97.0% ± 1.0" in text
    summary[4] = row("lbe", 30, 0.1)
    assert "learns up to depth 10" in script.interpret(summary, 400)
