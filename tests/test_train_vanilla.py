"""scripts/train_vanilla.py in seconds: the frontier (ladder × seeds × runs, summary, provenance, picture, what it
prints and the per-run logs), the single-pair mode, the presets, the reference layer choice, usage errors, and the
reproducibility check: the stored configuration run twice here is identical, and it matches its stored JSON
(experiments/frontier/results/vanilla_repro_depth4.json) within tolerances that hold on other x86-64 hosts."""

from __future__ import annotations

import ast
import contextlib
import io
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import experiments.frontier as frontier
from experiments.frontier import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "scripts", "train_vanilla.py")
REPRO_JSON = os.path.join(REPO, "experiments", "frontier", "results", "vanilla_repro_depth4.json")

TINY = ["--width", "16", "--max_steps", "20", "--logging_steps", "5", "--eval_steps", "10", "--learning_rate", "5e-3",
        "--per_device_train_batch_size", "64", "--disable_tqdm", "true"]


pytestmark = pytest.mark.usefixtures("restore_torch_globals")


@pytest.fixture(scope="module")
def tiny_frontier(tmp_path_factory):
    """Depths 4 and 8, 2 seeds, baseline + LBE + the ceiling, in two worker processes."""
    out = tmp_path_factory.mktemp("frontier")
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):  # what the job prints (the workers print nothing without --verbose)
        report = frontier.main(["--depths", "4,8", "--num_seeds", "2", "--workers", "2", "--output_dir", str(out)]
                               + TINY)
    return out, report, frontier, stdout.getvalue()


def test_frontier_runs_summary_and_picture(tiny_frontier):
    out, report, _, _ = tiny_frontier
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
    # The two files and one folder of logs per run, nothing else.
    assert sorted(os.listdir(out)) == sorted(["frontier.png", "results.json"] + [r["name"] for r in runs])


def test_job_prints_one_line_per_run_then_the_table(tiny_frontier):
    _, report, _, stdout = tiny_frontier
    lines = stdout.splitlines()
    progress = [line for line in lines if re.match(r"run +\d+/", line)]
    assert len(progress) == 10
    by_name = {r["name"]: r for r in report["runs"]}
    for k, line in enumerate(progress, 1):
        m = re.fullmatch(r"run +(\d+)/10  (\w+) +depth (\d+) +seed (\d)  test accuracy +([\d.]+)% +(\d+) s  "
                         r"\((about [\d.]+ (s|min) left|all done in [\d.]+ (s|min))\)", line)
        assert m, line
        assert int(m[1]) == k and ("all done" in line) == (k == 10)
        run = by_name[f"{m[2]}_depth{m[3]}_seed{m[4]}"]
        assert m[5] == f"{100 * run['test_accuracy']:.1f}"
    # No Trainer log dict on stdout (they are in the runs' folders), and the table and interpretation come last.
    assert not any("{" in line for line in lines)
    header = next(i for i, line in enumerate(lines) if re.match(r"run +depth +seeds +test accuracy", line))
    assert lines.index(progress[-1]) < lines.index(next(line for line in lines if line.startswith("results: "))) < header
    assert len(lines) == header + 2 + 5 + 2  # header, rule, 5 rows, a blank line, the interpretation
    assert lines[-1].startswith(("Without LBE", "A well-initialized"))


def test_each_run_folder_holds_its_logs(tiny_frontier):
    out, report, _, _ = tiny_frontier
    for r in report["runs"]:
        assert sorted(os.listdir(out / r["name"])) == ["run.log", "trainer_log.jsonl"]
        with open(out / r["name"] / "trainer_log.jsonl") as f:
            logs = [json.loads(line) for line in f]
        train_logs = [log for log in logs if "loss" in log]
        assert [log["step"] for log in train_logs] == [5, 10, 15, 20]
        assert all(len([k for k in log if k.startswith("batch_entropy/layer_")]) == r["depth"] for log in train_logs)
        assert [log["eval_accuracy"] for log in logs if "eval_accuracy" in log][:2] == [
            e["accuracy"] for e in r["eval_curve"]]
        with open(out / r["name"] / "run.log") as f:
            text = f.read()
        # β = 0 runs say that the layers are measured, not regularized.
        if r["lbe_beta"] == 0:
            assert "lbe_beta=0: the batch-entropy of these" in text and "LBE regularizes" not in text
            assert r["regularized_layers"] == 0 and r["measured_layers"] == r["depth"]
        else:
            assert f"LBE regularizes these {r['depth']} layers" in text and "not regularized" not in text
            assert r["regularized_layers"] == r["measured_layers"] == r["depth"]


def _git(cwd, *args):
    return subprocess.run(["git", "-C", str(cwd), *args], capture_output=True, text=True, check=True).stdout.strip()


def test_results_record_provenance(tiny_frontier):
    _, report, _, _ = tiny_frontier
    meta = report["meta"]
    assert meta["command"].startswith("python scripts/train_vanilla.py --depths 4,8")
    assert meta["argv"][-len(TINY):] == TINY
    # The commit and the state of the tracked files of this checkout, as git tells them to the test.
    assert meta["commit"] == _git(REPO, "rev-parse", "HEAD")
    assert meta["dirty"] == bool(_git(REPO, "status", "--porcelain", "--untracked-files=no"))
    assert set(meta["versions"]) >= {"torch", "transformers", "hf_batch_entropy", "numpy", "python"}
    assert meta["versions"]["torch"] == torch.__version__
    assert meta["machine"]["cpu"] and meta["machine"]["logical_cpus"] == os.cpu_count()
    assert meta["machine"]["workers"] == 2 and meta["machine"]["torch_threads_per_run"] == 1
    assert meta["total_wall_time_s"] > 0


def test_provenance_tells_clean_dirty_and_no_repository(tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    (repo / "f.txt").write_text("a")
    _git(repo, "add", "f.txt")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "one")
    monkeypatch.setattr(cli, "REPO", str(repo))
    meta = cli.provenance([], [])
    assert meta["commit"] == _git(repo, "rev-parse", "HEAD") and meta["dirty"] is False
    (repo / "untracked.txt").write_text("x")  # untracked files do not count
    assert cli.provenance([], [])["dirty"] is False
    (repo / "f.txt").write_text("b")
    assert cli.provenance([], [])["dirty"] is True
    monkeypatch.setattr(cli, "REPO", str(tmp_path / "not_a_repository"))
    meta = cli.provenance([], [])
    assert meta["commit"] is None and meta["dirty"] is None


def test_workers_do_not_change_the_numbers(tiny_frontier, tmp_path):
    """A run gives the same numbers in this process as in a worker process, and whatever else is in the job."""
    _, report, _, _ = tiny_frontier
    alone = frontier.main(["--depths", "8", "--num_seeds", "2", "--runs", "lbe", "--workers", "1",
                           "--output_dir", str(tmp_path)] + TINY)
    by_name = {r["name"]: r for r in report["runs"]}
    for r in alone["runs"]:
        twin = by_name[r["name"]]
        assert r["test_loss"] == twin["test_loss"] and r["entropies_end"] == twin["entropies_end"]


def test_single_pair_lbe_raises_entropy(tmp_path):
    report = frontier.main(["--depth", "24", "--num_seeds", "1", "--workers", "1", "--seed", "0",
                            "--output_dir", str(tmp_path)] + TINY)
    baseline, lbe = sorted(report["runs"], key=lambda r: r["run"])
    assert (baseline["run"], lbe["run"]) == ("baseline", "lbe")
    assert baseline["init_checksum"] == lbe["init_checksum"]
    # Twenty steps of LBE already lift the (tiny) entropies of this depth-24 network and revive dead layers.
    assert lbe["entropy_mean"] > 2 * baseline["entropy_mean"]
    assert lbe["alive_layers"] > baseline["alive_layers"]
    assert lbe["regularized_layers"] == 24 and baseline["regularized_layers"] == 0 and baseline["measured_layers"] == 24
    assert (tmp_path / "batch_entropy.png").stat().st_size > 10_000
    assert sorted(os.listdir(tmp_path)) == ["baseline_depth24_seed0", "batch_entropy.png", "lbe_depth24_seed0",
                                            "results.json"]
    table = frontier.format_table(report["runs"])
    assert table.splitlines()[0].split() == ["run", "baseline", "lbe"]


def test_reference_layer_choice(tmp_path):
    assert frontier.reference_target_modules("mlp", 5) == ["layers.1", "layers.2", "layers.3"]
    assert frontier.reference_target_modules("cnn", 3) == ["layers.1", "layers.2", "fc"]
    report = frontier.main(["--depth", "6", "--runs", "lbe", "--num_seeds", "1", "--workers", "1",
                            "--lbe_layers", "reference", "--output_dir", str(tmp_path)] + TINY)
    (run,) = report["runs"]
    # The 4 middle layers are regularized; all 6 are still measured at the end.
    assert run["regularized_layers"] == 4 and run["num_layers"] == 6 and run["lbe_layers"] == "reference"


def test_presets_are_flags_the_command_line_overrides():
    argv = frontier.expand_preset(["--preset", "long", "--max_steps", "7"])
    model_args, data_args, training_args = frontier.parse_arguments(argv)
    assert model_args.depths == "500" and data_args.runs == "lbe" and data_args.preset == "long"
    assert training_args.max_steps == 7 and training_args.learning_rate == pytest.approx(1e-4)
    # The frontier's recipe, the default preset: a fast revival at 1e-3, then 0.3 × that rate (warmup_stable_decay).
    model_args, _, training_args = frontier.parse_arguments(frontier.expand_preset(["--depth", "30"]))
    assert model_args.depths == "30" and training_args.max_steps == 1000
    assert training_args.learning_rate == pytest.approx(1e-3) \
        and str(training_args.lr_scheduler_type.value) == "warmup_stable_decay"
    assert training_args.lr_scheduler_kwargs == {"num_stable_steps": 400, "num_decay_steps": 100, "min_lr_ratio": 0.3}
    # Another schedule from the command line gets its own defaults, not the frontier's kwargs.
    _, _, training_args = frontier.parse_arguments(frontier.expand_preset(["--lr_scheduler_type", "polynomial"]))
    assert training_args.lr_scheduler_kwargs == {"power": 2.0}
    with pytest.raises(ValueError, match="--preset"):
        frontier.expand_preset(["--preset", "nope"])


# Tolerances of the comparison with the stored reference (a 4-layer MLP, baseline and LBE runs, 50 steps, float32),
# measured with experiments/frontier/repro_perturbations.py (experiments/frontier/results/vanilla_repro_perturbations.json). Perturbing
# the last bits, as another x86-64 host with the same software does (AVX2 or scalar instead of AVX-512 kernels in
# ATen, MKL and oneDNN, MKL's reproducibility mode, 2 threads instead of 1, every input pixel moved by one ulp), moved
# the losses and final entropies of this configuration by at most 2.4e-7 relative (3 float32 ulps) and no test
# prediction. REL = 1e-5 leaves 40 times that. The old 20-layer, 200-step configuration moved by up to 2e-2 and by 6
# test examples under the same AVX2 perturbation (exactly the difference seen between two hosts): depth and steps
# amplify last-bit differences, so the check stays shallow and short. Each small change of our code tried (α's
# learning rate +10%, the π·e of the entropy formula ×1.001, β 0.5 → 0.49, α₀ 2 → 2.02, the model's learning rate
# ×1.001) moves its most-moved compared figure by 8.8e-4 to 1.5e-2, 88 times REL or more. float32 is enough: its
# noise here is 40 times below REL. The accuracy is allowed one test example of 360 (a near-tie can flip; the losses
# catch what moves it).
REL = 1e-5
ONE_EXAMPLE = 1.0 / 360 + 1e-9


def _figures(run: dict) -> dict:
    """What a run must reproduce."""
    return {k: run[k] for k in ("name", "steps", "init_checksum", "test_accuracy", "test_loss", "train_loss",
                                "train_task_loss", "entropies_end")} | {
        "eval": [(e["step"], e["accuracy"], e["loss"]) for e in run["eval_curve"]]}


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """The stored configuration (its `meta.argv`) re-run here."""
    with open(REPRO_JSON) as f:
        stored = json.load(f)
    argv = list(stored["meta"]["argv"])
    argv[argv.index("--output_dir") + 1] = str(tmp_path_factory.mktemp("repro"))
    return stored, argv, frontier.main(argv)


def test_same_host_same_software_is_exact(reference_run, tmp_path):
    """The same run twice on one host: identical to the last bit (losses, entropies, evaluation curve)."""
    _, argv, first = reference_run
    argv = list(argv)
    argv[argv.index("--output_dir") + 1] = str(tmp_path)
    second = frontier.main(argv)
    assert [_figures(r) for r in second["runs"]] == [_figures(r) for r in first["runs"]]


def test_matches_the_stored_reference(reference_run):
    """The stored configuration gives the stored figures within REL (any x86-64 host with the same software)."""
    stored, _, report = reference_run
    assert stored["meta"]["command"].startswith("python scripts/train_vanilla.py ") and not stored["meta"]["dirty"]
    assert [r["name"] for r in report["runs"]] == [r["name"] for r in stored["runs"]] == [
        "baseline_depth4_seed0", "lbe_depth4_seed0"]
    for new, old in zip(map(_figures, report["runs"]), map(_figures, stored["runs"])):
        assert new["steps"] == old["steps"] == 50
        assert new["init_checksum"] == pytest.approx(old["init_checksum"], rel=1e-12)
        assert abs(new["test_accuracy"] - old["test_accuracy"]) <= ONE_EXAMPLE, new["name"]
        assert [e[1] for e in new["eval"]] == pytest.approx([e[1] for e in old["eval"]], abs=ONE_EXAMPLE)
        assert [e[2] for e in new["eval"]] == pytest.approx([e[2] for e in old["eval"]], rel=REL)
        for key in ("test_loss", "train_loss", "train_task_loss", "entropies_end"):
            assert new[key] == pytest.approx(old[key], rel=REL), (new["name"], key)


def test_other_cpu_kernels_stay_within_the_tolerance(reference_run, tmp_path):
    """A stand-in for another host, here: the same run with ATen's scalar kernels, MKL at SSE4.2 and oneDNN at SSE4.1
    (other summation orders in the matrix products and reductions) stays within REL of this process's run."""
    _, argv, here = reference_run
    argv = list(argv)
    argv[argv.index("--output_dir") + 1] = str(tmp_path)
    env = {**os.environ, "PYTHONPATH": REPO, "ATEN_CPU_CAPABILITY": "default", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2",
           "ONEDNN_MAX_CPU_ISA": "SSE41"}
    subprocess.run([sys.executable, SCRIPT] + argv, env=env, cwd=REPO, check=True, capture_output=True, timeout=300)
    with open(tmp_path / "results.json") as f:
        other = json.load(f)
    # Run through the door, results.json records the documented command and this checkout's commit.
    assert other["meta"]["command"].startswith("python scripts/train_vanilla.py ")
    assert other["meta"]["commit"] == _git(REPO, "rev-parse", "HEAD")
    for new, old in zip(map(_figures, other["runs"]), map(_figures, here["runs"])):
        assert abs(new["test_accuracy"] - old["test_accuracy"]) <= ONE_EXAMPLE
        for key in ("test_loss", "train_loss", "entropies_end"):
            assert new[key] == pytest.approx(old[key], rel=REL), (new["name"], key)


def test_help_documents_every_flag():
    result = subprocess.run([sys.executable, SCRIPT, "--help"], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 0, result.stderr
    for flag in ("--arch", "--depth", "--depths", "--width", "--dataset", "--max_steps", "--output_dir", "--lbe_beta",
                 "--lbe_alpha", "--lbe_alpha_min", "--lbe_alpha_learning_rate", "--runs", "--flush_denormal",
                 "--preset", "--num_seeds", "--workers", "--lbe_layers", "--ceiling", "--ceiling_depth", "--verbose"):
        assert flag in result.stdout, flag
    # The measured times live in the README (one figure per command); --help and the docstring quote none.
    text = result.stdout + ast.get_docstring(ast.parse(open(SCRIPT).read()))
    assert not re.search(r"\d\s*(min|minutes|s per|seconds)\b", text), re.findall(r".{40}\d\s*min.{20}", text)


def test_module_entry_point_is_the_same_job():
    """`python -m experiments.frontier` has the script's flags, and records itself as the command that ran."""
    script = subprocess.run([sys.executable, SCRIPT, "--help"], capture_output=True, text=True, timeout=120, cwd=REPO)
    module = subprocess.run([sys.executable, "-m", "experiments.frontier", "--help"], capture_output=True,
                            text=True, timeout=120, cwd=REPO, env={**os.environ, "PYTHONPATH": REPO})
    assert module.returncode == 0 and module.stdout == script.stdout, module.stderr
    as_module = cli.provenance([], [], ("-m", "experiments.frontier"))
    assert as_module["command"] == "python -m experiments.frontier"
    assert cli.provenance(["--depth", "3"], [])["command"] == "python scripts/train_vanilla.py --depth 3"


@pytest.mark.parametrize("argv, message", [
    (["--preset", "fast"], "argument --preset: invalid choice: 'fast' (choose from 'depth50', 'frontier', 'long')"),
    (["--max_steps", "0"], "argument --max_steps: must be >= 1 (or -1: train for --num_train_epochs), got 0"),
    (["--preset=fast"], "argument --preset: invalid choice: 'fast'"),
    (["--dataset", "/nonexistent/dir"], "argument --dataset: no such folder: /nonexistent/dir"),
    (["--dataset", "./missing_images"], "argument --dataset: no such folder: ./missing_images"),
    (["--arch", "rnn"], "argument --arch: invalid choice: 'rnn' (choose from 'mlp', 'cnn')"),
    (["--lbe_layers", "middle"], "invalid choice: 'middle' (choose from 'all', 'reference')"),
    (["--runs", "lbe,foo"], "argument --runs: invalid choice: 'foo' (choose from 'baseline', 'lbe'"),
    (["--depths", "4,x"], "argument --depths: expected comma-separated integers >= 1, got '4,x'"),
    (["--depths", "0"], "argument --depths"),
    (["--num_seeds", "0"], "argument --num_seeds: must be >= 1"),
    (["--activation", "relux"], "argument --activation: invalid choice: 'relux' (choose from "),
    (["--per_device_train_batch_size", "1"], "argument --per_device_train_batch_size: must be >= 2"),
    (["--lbe_layers", "reference", "--depth", "2", "--runs", "lbe"], "argument --lbe_layers: 'reference' leaves"),
    (["--initialization", "delta_orthogonal"], "argument --initialization: 'delta_orthogonal' is not for --arch mlp "
                                               "(choose 'default' or 'orthogonal')"),
    (["--init_gain", "1.1"], "--init_gain and --init_bias_std set the orthogonal initializations: give "
                             "--initialization orthogonal too"),
])
def test_bad_input_is_a_one_line_usage_error(tmp_path, capsys, argv, message):
    """Exit status 2 and one line on stderr naming the flag (and the valid choices), before anything is written."""
    with pytest.raises(SystemExit) as exit_info:
        frontier.main(argv + ["--output_dir", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.splitlines()) == 1
    assert captured.err.startswith("train_vanilla.py: error: ") and message in captured.err
    assert not (tmp_path / "out").exists()


def test_run_order():
    """One worker: the table's order (the order cannot change one process's total time). Several: the short runs
    (ceilings, shallowest depth) first, so that results come within seconds, then the others longest first."""
    model_args, data_args, _ = frontier.parse_arguments(["--depths", "10,100,500", "--num_seeds", "2"])
    names = [j.name for j in frontier.plan_jobs(model_args, data_args, workers=1)]
    assert names[:4] == ["ceiling_depth2_seed0", "ceiling_depth2_seed1", "baseline_depth10_seed0", "lbe_depth10_seed0"]
    assert names[-1] == "lbe_depth500_seed1" and len(names) == 14
    names = [j.name for j in frontier.plan_jobs(model_args, data_args, workers=2)]
    assert names[:6] == ["ceiling_depth2_seed0", "ceiling_depth2_seed1", "baseline_depth10_seed0", "lbe_depth10_seed0",
                         "baseline_depth10_seed1", "lbe_depth10_seed1"]
    assert names[6:8] == ["lbe_depth500_seed0", "lbe_depth500_seed1"] and names[-1] == "baseline_depth100_seed1"


def test_the_job_prints_no_deepspeed_warning(tmp_path):
    """DeepSpeed, imported by Trainer whenever it is installed, warns in every process that it falls back to the CPU
    unless told; the job (on the CPU, without DeepSpeed) tells it, so its output carries no such warning."""
    pytest.importorskip("deepspeed")
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    done = subprocess.run([sys.executable, SCRIPT, "--depths", "3,4", "--num_seeds",
                           "1", "--ceiling", "false", "--workers", "2", "--output_dir", str(tmp_path / "out"), *TINY],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "run 4/4" in done.stdout
    assert "accelerator" not in done.stdout + done.stderr


def test_progress_line_estimates_the_time_left():
    """Work in run-seconds (finished as measured, the rest predicted) over the workers, minus the wall time since
    the first run started: runs in flight count, and a deep finished run calibrates the cost per layer."""
    jobs = [frontier.Job("baseline", 10, 0), frontier.Job("baseline", 100, 0), frontier.Job("lbe", 100, 0)]
    now = [35.0]
    progress = frontier.Progress(jobs, workers=1, clock=lambda: now[0])
    # 35 s for a run of prior cost 10 + 17: 35/27 s per unit; 2 × 117 units left → 303 s.
    assert progress.line(jobs[0], {"test_accuracy": 0.834, "wall_time_s": 35.0}) == (
        "run 1/3  baseline  depth 10   seed 0  test accuracy  83.4%     35 s  (about 5.1 min left)")
    # Depth 100 took 125 s: the fit through (10, 35 s) and (100, 125 s) predicts 125 s for the last run; 285 s of work
    # in all, 160 s spent.
    now[0] = 160.0
    line = progress.line(jobs[1], {"test_accuracy": 0.1, "wall_time_s": 125.0})
    assert line == "run 2/3  baseline  depth 100  seed 0  test accuracy  10.0%    125 s  (about 2.1 min left)"
    now[0] = 285.0
    assert "all done in 4.2 min" in progress.line(jobs[2], {"test_accuracy": 0.25, "wall_time_s": 125.0})
    # Two workers: the same work spread over both (338 s / 2), minus the 35 s already spent: 134 s.
    now[0] = 35.0
    progress = frontier.Progress(jobs, workers=2, clock=lambda: now[0])
    assert progress.line(jobs[0], {"test_accuracy": 0.5, "wall_time_s": 35.0}).endswith("(about 2.2 min left)")


def test_picture_titles_and_legend(tmp_path, monkeypatch):
    run = {"run": "baseline", "depth": 500, "lbe_beta": 0.0, "test_accuracy": 0.1, "seed_index": 0}
    assert frontier.run_title(run) == "without LBE (β = 0), depth 500\ntest accuracy 10.0 % (seed 0)"
    assert frontier.run_title(run | {"run": "lbe", "lbe_beta": 0.5, "test_accuracy": 0.254}) == (
        "with LBE (β = 0.5), depth 500\ntest accuracy 25.4 % (seed 0)")
    # The frontier's legend lies below its axes, off the curves.
    import matplotlib.pyplot as plt

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    runs = [{"name": f"{kind}_depth{d}_seed0", "run": kind, "depth": d, "seed_index": 0, "test_accuracy": acc,
             "lbe_beta": 0.5 if kind == "lbe" else 0.0, "model": f"vanilla MLP depth {d} width 64 relu on digits",
             "steps": 400, "learning_rate": 2e-3, "lr_scheduler_type": "polynomial"}
            for kind, d, acc in [("baseline", 10, 0.83), ("lbe", 10, 0.76), ("baseline", 30, 0.1), ("lbe", 30, 0.27)]]
    summary = [{"run": r["run"], "depth": r["depth"], "seeds": 1, "test_accuracy_mean": r["test_accuracy"],
                "test_accuracy_std": 0.0} for r in runs] + [
        {"run": "ceiling", "depth": 2, "seeds": 1, "test_accuracy_mean": 0.97, "test_accuracy_std": 0.0}]
    records = {r["name"]: {"steps": [10, 20], "entropies": [[1.0] * r["depth"], [0.5] * r["depth"]]} for r in runs}
    frontier.plot_frontier(summary, runs, records, str(tmp_path / "frontier.png"))
    (fig,) = figures
    renderer = fig.canvas.get_renderer()
    ax = fig.axes[0]
    assert ax.get_legend().get_window_extent(renderer).y1 < ax.get_window_extent(renderer).y0
    assert [a.get_title() for a in fig.axes[1:3]] == [frontier.run_title(r) for r in runs if r["depth"] == 30]


def test_cnn_single_run_verbose(tmp_path, capsys):
    argv = ["--arch", "cnn", "--depth", "3", "--width", "4", "--max_steps", "6", "--logging_steps", "2",
            "--eval_strategy", "no", "--runs", "lbe", "--num_seeds", "1", "--workers", "1", "--disable_tqdm", "true",
            "--per_device_train_batch_size", "32"]
    report = frontier.main(argv + ["--output_dir", str(tmp_path), "--verbose"])
    assert len(report["runs"]) == 1 and report["runs"][0]["num_layers"] == 4  # 3 conv layers + the fully connected one
    assert (tmp_path / "batch_entropy.png").exists()
    # --verbose: the Trainer's log dicts (compact) and the run's log lines come back to stdout.
    out = capsys.readouterr().out
    assert len(re.findall(r"^\{'loss': ", out, re.M)) == 3 and "LBE regularizes these 4 layers" in out
    frontier.main(argv + ["--output_dir", str(tmp_path / "quiet")])
    out = capsys.readouterr().out
    assert "{'loss'" not in out and "LBE regularizes" not in out


def test_orthogonal_initializations(tmp_path):
    """--initialization: the deep runs start from the scheme (recorded per run and in the model's config), the
    baseline and the LBE run from the same weights; the ceiling stays He-normal."""
    argv = ["--arch", "cnn", "--activation", "tanh", "--initialization", "delta_orthogonal", "--init_bias_std", "0.01",
            "--depths", "2,3", "--width", "4", "--max_steps", "2", "--eval_strategy", "no", "--num_seeds", "1",
            "--workers", "1", "--disable_tqdm", "true", "--per_device_train_batch_size", "32", "--logging_steps", "1"]
    report = frontier.main(argv + ["--output_dir", str(tmp_path)])
    runs = {r["name"]: r for r in report["runs"]}
    assert runs["ceiling_depth2_seed0"]["init"] == "he_normal" and runs["ceiling_depth2_seed0"]["init_gain"] is None
    for depth in (2, 3):
        baseline, lbe = runs[f"baseline_depth{depth}_seed0"], runs[f"lbe_depth{depth}_seed0"]
        assert (lbe["init"], lbe["init_gain"], lbe["init_bias_std"]) == ("delta_orthogonal", 1.05, 0.01)
        assert baseline["init_checksum"] == lbe["init_checksum"]
    # The same depth with the default init starts elsewhere.
    default = frontier.main(argv[:4] + argv[8:] + ["--output_dir", str(tmp_path / "default")])
    assert {r["init"] for r in default["runs"] if r["run"] != "ceiling"} == {"pytorch_default"}
    assert default["runs"][-1]["init_checksum"] != runs["lbe_depth3_seed0"]["init_checksum"]


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
    report = frontier.main([
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
    def row(run, depth, acc, alive=None, layers=None):
        return {"run": run, "depth": depth, "seeds": 3, "test_accuracy_mean": acc, "test_accuracy_std": 0.01,
                "alive_layers_mean": alive or depth, "num_layers": layers or depth}

    summary = [row("ceiling", 2, 0.97), row("baseline", 10, 0.8), row("lbe", 10, 0.7), row("baseline", 30, 0.1),
               row("lbe", 30, 0.3), row("baseline", 500, 0.1), row("lbe", 500, 0.1, alive=300, layers=500)]
    text = frontier.interpret(summary, 400)
    assert "chance (< 15%) from depth 30 on" in text and "learns up to depth 30 (30.0% ± 1.0)" in text
    assert "at depth 500 neither learns within 400 steps (LBE has revived 300 of its 500 layers" in text
    assert "2-layer network reaches 97.0% ± 1.0" in text
    # Depth 10, where both learn: the difference against twice its standard error over the seeds.
    assert ("At depth 10, where the network learns without it, LBE gives 70.0% ± 1.0 against 80.0% ± 1.0 without: "
            "10.0 points lower, more than twice the standard error of the difference over 3 seeds (1.6 points): LBE "
            "costs accuracy at this depth.") in text
    summary[1], summary[2] = row("baseline", 10, 0.834), row("lbe", 10, 0.76)
    summary[1]["test_accuracy_std"], summary[2]["test_accuracy_std"] = 0.068, 0.039
    assert ("LBE gives 76.0% ± 3.9 against 83.4% ± 6.8 without: 7.4 points lower, within twice the standard error of "
            "the difference over 3 seeds (9.1 points): no clear difference.") in frontier.interpret(summary, 400)
    summary[4] = row("lbe", 30, 0.1)
    assert "learns up to depth 10" in frontier.interpret(summary, 400)


def test_the_diagnosis_suggests_the_frontiers_recipe():
    """For a network with dead layers the diagnosis suggests the recipe the frontier measured: the same settings."""
    import torch

    from hf_batch_entropy.diagnosis import suggest_settings

    suggested, _ = suggest_settings(torch.tensor([0.5, 1e-20]), flagged=[1], pretrained=False)
    _, _, args = frontier.parse_arguments(frontier.expand_preset([]))
    for key, value in suggested.items():
        got = getattr(args, key)
        assert getattr(got, "value", got) == value, key


def test_plot_curves_mean_and_std_over_seeds(tmp_path):
    """plot_curves: per run kind at one depth, the steps every seed evaluated, mean and sample std of the accuracy."""
    from experiments.frontier import plot_curves

    def run(kind, depth, seed, accs):
        return {"run": kind, "depth": depth, "seed_index": seed,
                "eval_curve": [{"step": 100 * (i + 1), "accuracy": a} for i, a in enumerate(accs)]}

    runs = [run("lbe", 500, 0, [0.1, 0.2]), run("lbe", 500, 1, [0.1, 0.4, 0.5]), run("baseline", 500, 0, [0.1, 0.1]),
            run("lbe", 30, 0, [0.9, 0.9]), run("ceiling", 2, 0, [0.9, 0.97])]
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"runs": runs}))
    got = plot_curves.curves(str(path), 500)
    steps, mean, std, n = got["lbe"]
    assert steps.tolist() == [100, 200] and n == 2
    assert np.allclose(mean, [10, 30]) and np.allclose(std, [0, np.sqrt(200)])
    assert got["baseline"][3] == 1 and got["baseline"][2].tolist() == [0, 0] and "ceiling" in got
    plot_curves.main([f"default={path}", "--depth", "500", "--out", str(tmp_path / "c.png")])
    assert (tmp_path / "c.png").stat().st_size > 1000


def _children(pid: int) -> list[int]:
    """The live (not zombie) child processes of `pid`, from /proc."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                found.append(int(entry))
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("stop", ["SIGKILL", "SIGTERM", "SIGINT"])
def test_workers_exit_when_the_job_is_stopped(tmp_path, stop):
    """The job's two worker processes end within a few seconds of the job, however it is stopped: killed (they watch
    their parent), terminated (Python does not catch SIGTERM: the same) or interrupted (it terminates them)."""
    import signal
    import time

    out = tmp_path / "out"
    job = subprocess.Popen([sys.executable, SCRIPT, "--depths", "3,4", "--num_seeds", "1", "--ceiling", "false",
                            "--workers", "2", "--width", "16", "--max_steps", "100000", "--eval_steps", "100000",
                            "--logging_steps", "100000", "--disable_tqdm", "true", "--output_dir", str(out)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 240
        while len([p for p in out.glob("*") if p.is_dir()]) < 2:  # both workers are training a run
            assert job.poll() is None and time.monotonic() < deadline, "the job did not start its runs"
            time.sleep(0.2)
        workers = _children(job.pid)
        assert len(workers) >= 2
        os.kill(job.pid, getattr(signal, stop))
        job.wait(timeout=60)
        deadline = time.monotonic() + 5
        while any(_alive(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [w for w in workers if _alive(w)], f"workers still running {5} s after the job's {stop}"
    finally:
        job.kill()
        for w in workers:
            if _alive(w):
                os.kill(w, signal.SIGKILL)


def _one_seed_report(path, run, seed, accuracy, checksum, learning_rate=1e-4):
    record = {"run": run, "depth": 500, "seed": seed, "seed_index": 0, "test_accuracy": accuracy, "alive_layers": 501,
              "num_layers": 501, "wall_time_s": 1.0, "init_checksum": checksum, "learning_rate": learning_rate,
              "lbe_beta": 0.1 if run == "lbe" else 0.0, "steps": 3000, "eval_curve": []}
    with open(path, "w") as f:
        json.dump({"meta": {"command": f"job {run} {seed}"}, "runs": [record]}, f)
    return str(path)


def test_merge_seeds_summarizes_over_seeds_and_checks_the_pairs(tmp_path):
    from experiments.frontier.merge_seeds import main as merge_main

    files = [_one_seed_report(tmp_path / f"{run}{seed}.json", run, seed, acc, checksum)
             for run, seed, acc, checksum in [("lbe", 43, 0.3, 7.0), ("lbe", 42, 0.4, 5.0), ("baseline", 42, 0.1, 5.0),
                                              ("baseline", 43, 0.1, 6.0)]]
    report = merge_main([*files, "--out", str(tmp_path / "merged.json")])
    lbe = next(s for s in report["summary"] if s["run"] == "lbe")
    assert lbe["test_accuracy_per_seed"] == [0.4, 0.3]  # ordered by training seed, renumbered
    assert lbe["test_accuracy_mean"] == pytest.approx(0.35) and lbe["test_accuracy_std"] == pytest.approx(0.0707107)
    assert [(p["seed"], p["same_initial_weights"]) for p in report["pairs"]] == [(42, True), (43, False)]
    assert {r["source_meta"]["command"] for r in report["runs"]} == {"job lbe 42", "job lbe 43", "job baseline 42",
                                                                      "job baseline 43"}
    with open(tmp_path / "merged.json") as f:
        assert json.load(f)["summary"] == report["summary"]


def test_merge_seeds_refuses_another_recipe_or_a_seed_twice(tmp_path, capsys):
    from experiments.frontier.merge_seeds import main as merge_main

    first = _one_seed_report(tmp_path / "a.json", "lbe", 42, 0.4, 5.0)
    other_rate = _one_seed_report(tmp_path / "b.json", "lbe", 43, 0.3, 6.0, learning_rate=3e-4)
    for files in ([first, other_rate], [first, first]):
        with pytest.raises(SystemExit) as exit_info:
            merge_main([*files, "--out", str(tmp_path / "merged.json")])
        assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "learning_rate = 0.0003" in err and "already in an earlier file" in err
    assert not (tmp_path / "merged.json").exists()
