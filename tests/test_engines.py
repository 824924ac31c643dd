"""The scale-out engines on CPU: `BatchEntropyTrainer` under DeepSpeed ZeRO-2, ZeRO-3 and FSDP2, launched with the
bundled `accelerate` configurations exactly as a user launches them, 2 processes with gloo; and DDP across two
"machines" on the loopback.

Every launch is `accelerate launch --config_file <bundled config> --num_processes 2 tests/engine_worker.py ...
--use_cpu` (`--use_cpu` is `TrainingArguments.use_cpu`: without GPUs the processes train on CPU with gloo). The
worker trains the tiny BERT 6 steps with a checkpoint at step 3 and `save_model()`, then resumes that checkpoint in
a new trainer (see `tests/engine_worker.py`). For each engine the tests check:

- the engine really ran (ZeRO stage and partitioned parameters; DTensor parameters for FSDP2): a silent fallback to
  DDP fails;
- `α` is bitwise identical on both ranks after every step and equal to the saved `batch_entropy_regularizer`;
- resuming from the middle checkpoint gives bitwise the same steps, `α` and weights as the run that was not
  interrupted;
- the final folder loads with plain `AutoModelForSequenceClassification` and holds the trained weights;
- entropies, losses and `α` agree with the DDP run within `ENGINE_ATOL`, the weights within `PARAM_ATOL`.

FSDP2 on CPU needs the test-only shim `tests/fsdp_cpu_shim.py` (Accelerate drops the FSDP plugin on CPU processes; the
shim's docstring names the line); plain `Trainer` runs under the same shim as the control. On a machine with 2 GPUs or
more, `HF_BATCH_ENTROPY_TEST_ENGINE_DEVICE=cuda` runs the same tests with NCCL and bf16 (`scripts/gpu_check.sh`).
DeepSpeed needs the `[deepspeed]` extra (`DS_BUILD_OPS=0 pip install deepspeed`, as `.ci/setup`
does). The bundled MLP/CNN models are not run here: they fail under FSDP2 (see docs/distributed.md).

Four 2-process launches and one pair of 1-process launches (the two "machines"); under 2 minutes on 2 busy CPU
cores, most of it process start-up.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from hf_batch_entropy import accelerate_configs

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.slow,
    pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed (gloo)"),
]

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
WORKER = TESTS / "engine_worker.py"

# "cpu" (the default, and CI): gloo, float32. "cuda" (scripts/gpu_check.sh, 2 GPUs or more): NCCL, bf16 autocast.
DEVICE = os.environ.get("HF_BATCH_ENTROPY_TEST_ENGINE_DEVICE", "cpu")
# Optional: a JSON file that receives the measured differences to DDP (scripts/gpu_check.sh records them).
REPORT = os.environ.get("HF_BATCH_ENTROPY_TEST_ENGINE_REPORT")

# DeepSpeed and FSDP2 reduce gradients in another order than DDP (bucketed, reduce-scatter): on CPU in float32 only
# round-off separates them; under bf16 on GPUs, DeepSpeed also communicates gradients in bf16.
ENGINE_ATOL = 1e-5 if DEVICE == "cpu" else 2e-2  # per-step entropies, losses, and α after every step
PARAM_ATOL = 1e-4 if DEVICE == "cpu" else 5e-2  # the weights after 6 AdamW steps at learning rate 1e-2
# Resuming is bitwise exact on CPU; CUDA kernels with atomics (embedding backward) are not bitwise reproducible.
RESUME_ATOL = 0.0 if DEVICE == "cpu" else 1e-3

# engine → (bundled config, worker parts); the DDP run is the reference.
ENGINES = {
    "ddp": ("ddp", ["full"]),
    "zero2": ("deepspeed_zero2", ["full", "resume"]),
    "zero3": ("deepspeed_zero3", ["full", "resume", "llama"]),
    "fsdp2": ("fsdp", ["full", "resume", "plain", "llama", "vanilla"]),
}
SCALE_OUT = ("zero2", "zero3", "fsdp2")


def _needs(engine: str) -> None:
    if engine.startswith("zero") and importlib.util.find_spec("deepspeed") is None:
        pytest.skip('needs deepspeed: DS_BUILD_OPS=0 pip install deepspeed (.ci/setup installs it)')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(fsdp_shim: bool = False, **extra: str) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", **extra}
    if DEVICE == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
        if fsdp_shim:
            env["HF_BATCH_ENTROPY_TEST_FSDP_CPU"] = "1"  # the worker installs tests/fsdp_cpu_shim.py
    # The launched processes import this checkout's package, whatever is installed.
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def _launch_command(config: str, out: Path, parts, *launch_args: str) -> list[str]:
    device_args = ["--use_cpu"] if DEVICE == "cpu" else ["--bf16"]
    return [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", accelerate_configs.path(config),
        *launch_args, str(WORKER), "--out", str(out), *device_args, "--parts", *parts,
    ]  # fmt: skip


def _report(name: str, **figures: float) -> None:
    if REPORT:
        import json

        from experiments.provenance import provenance

        data = json.loads(Path(REPORT).read_text()) if Path(REPORT).is_file() else {}
        argv = ["-m", "pytest", *sys.argv[1:]]  # the command as typed, not pytest's own entry point
        data.setdefault("provenance", provenance(argv, packages=("deepspeed",), processes=2))
        data[name] = {**figures, "device": DEVICE, "torch": torch.__version__}
        if DEVICE == "cuda":
            data[name]["card"] = torch.cuda.get_device_name(0)
        Path(REPORT).write_text(json.dumps(data, indent=2) + "\n")


def _check(procs) -> None:
    failed = [(cmd, p) for cmd, p in procs if p.returncode != 0]
    if failed:
        cmd, p = failed[0]
        pytest.fail(f"{' '.join(cmd)} exited with {p.returncode}:\n{p.stdout[-3000:]}\n{p.stderr[-8000:]}")


def _results(out: Path, parts) -> dict:
    return {part: [torch.load(out / f"{part}.rank{r}.pt", weights_only=False) for r in range(2)] for part in parts}


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """engine → {"out": folder, part: [rank-0 result, rank-1 result]}; each engine launched once, when first needed."""
    cache: dict[str, dict] = {}

    def get(engine: str) -> dict:
        _needs(engine)
        if engine not in cache:
            config, parts = ENGINES[engine]
            out = tmp_path_factory.mktemp(engine)
            cmd = _launch_command(config, out, parts, "--num_processes", "2", "--main_process_port", str(_free_port()))
            proc = subprocess.run(
                cmd, env=_env(fsdp_shim=engine == "fsdp2"), capture_output=True, text=True, timeout=600
            )
            _check([(cmd, proc)])  # exit status 0: the processes end cleanly (ZeRO-3 included)
            cache[engine] = {"out": out, **_results(out, parts)}
        return cache[engine]

    return get


def _tiny_bert():
    from conftest import tiny_bert  # the worker's model, with the worker's seed

    return tiny_bert()


def _tiny_bert_init() -> dict[str, torch.Tensor]:
    return _tiny_bert().state_dict()


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.mark.parametrize("engine", list(ENGINES))
def test_the_engine_really_runs(launched, engine):
    for part, results in launched(engine).items():
        if part == "out":
            continue
        assert [r["world_size"] for r in results] == [2, 2]
        for r in results:
            assert Path(r["package_file"]).resolve().is_relative_to(REPO)  # this checkout, not an installed copy
            facts = r["engine"]
            if engine == "ddp":
                assert facts["distributed_type"] == ("MULTI_CPU" if DEVICE == "cpu" else "MULTI_GPU")
                assert facts["wrapped_class"] == "DistributedDataParallel"
                assert facts["local_numel"] == facts["numel"]
            elif engine in ("zero2", "zero3"):
                assert facts["distributed_type"] == "DEEPSPEED"
                assert facts["wrapped_class"] == "DeepSpeedEngine"
                assert facts["zero_stage"] == int(engine[-1])
                if engine == "zero3":  # parameters partitioned: each rank holds about half of them
                    assert facts["zero_optimizer_class"] == "DeepSpeedZeroOptimizer_Stage3"
                    assert facts["zero3_partitioned_params"] == facts["num_params"]
                    assert facts["local_numel"] <= facts["numel"] // 2 + facts["num_params"]
                else:
                    assert facts["zero_optimizer_class"] == "DeepSpeedZeroOptimizer"
            else:  # FSDP2: every parameter a DTensor sharded over the 2 ranks
                assert facts["distributed_type"] == "FSDP"
                assert facts["fsdp_version"] == 2
                assert facts["model_class"].startswith("FSDP")
                assert facts["dtensor_params"] == facts["num_params"]
                assert facts["local_numel"] < facts["numel"]
            if part not in ("llama", "vanilla"):
                assert facts["numel"] == sum(p.numel() for p in _tiny_bert().parameters())


@pytest.mark.parametrize("engine", list(ENGINES))
def test_alpha_identical_on_both_ranks_and_saved(launched, engine):
    from safetensors.torch import load_file

    run = launched(engine)
    for part in ("full", "resume"):
        if part not in run:
            continue
        rank0, rank1 = run[part]
        assert len(rank0["alphas"]) == len(rank1["alphas"]) == (6 if part == "full" else 3)
        for a, b in zip(rank0["alphas"], rank1["alphas"]):
            assert torch.equal(a, b)
        saved = load_file(run["out"] / part / "batch_entropy_regularizer.safetensors")["alpha"]
        assert torch.equal(saved, rank0["alpha"]) and torch.equal(saved, rank1["alpha"])
    assert (run["full"][0]["alpha"] - 0.8).abs().min() > 1e-3, "α did not train"
    assert torch.equal(
        load_file(run["out"] / "full" / "checkpoint-3" / "batch_entropy_regularizer.safetensors")["alpha"],
        run["full"][0]["alphas"][2],
    )


@pytest.mark.parametrize("engine", SCALE_OUT)
def test_resume_from_the_middle_checkpoint_is_exact(launched, engine):
    run = launched(engine)
    for full, resumed in zip(run["full"], run["resume"]):
        assert resumed["global_step"] == 6
        assert len(resumed["steps"]) == 3  # steps 4-6 only
        for got, want in zip(resumed["steps"], full["steps"][3:]):
            for key in ("entropies", "task_loss", "lbe_loss", "loss"):
                torch.testing.assert_close(got[key], want[key], atol=RESUME_ATOL, rtol=0, msg=key)
        for got, want in zip(resumed["alphas"], full["alphas"][3:]):
            torch.testing.assert_close(got, want, atol=RESUME_ATOL, rtol=0)
    full_weights, resumed_weights = run["full"][0]["state_dict"], run["resume"][0]["state_dict"]
    assert full_weights.keys() == resumed_weights.keys()
    assert _max_diff(full_weights, resumed_weights) <= RESUME_ATOL


@pytest.mark.parametrize("engine", list(ENGINES))
def test_final_folder_loads_with_plain_transformers(launched, engine):
    from transformers import AutoModelForSequenceClassification

    run = launched(engine)
    init = _tiny_bert_init()
    for part in ("full", "resume", "plain"):
        if part not in run:
            continue
        model = AutoModelForSequenceClassification.from_pretrained(run["out"] / part)
        assert type(model).__name__ == "BertForSequenceClassification"
        assert model.config.architectures == ["BertForSequenceClassification"]  # not the engine's wrapper class
        loaded = model.state_dict()
        trained = run[part][0]["state_dict"]  # gathered from the engine on the main process
        assert set(trained) <= set(loaded)
        for k, v in trained.items():
            assert torch.equal(loaded[k].to(v.dtype), v), k  # bf16 on GPUs under DeepSpeed: saved as trained
        assert _max_diff(loaded, init) > 1e-3, "the folder holds the initial weights"


@pytest.mark.parametrize("engine", SCALE_OUT)
def test_same_training_as_ddp(launched, engine):
    ddp, run = launched("ddp"), launched(engine)
    differences = {"losses_entropies": 0.0, "alpha": 0.0}
    for rank in range(2):
        got, want = run["full"][rank], ddp["full"][rank]
        assert len(got["steps"]) == len(want["steps"]) == 6
        for step, (a, b) in enumerate(zip(got["steps"], want["steps"])):
            for key in ("entropies", "task_loss", "lbe_loss", "loss"):
                difference = (a[key] - b[key]).abs().max().item()
                differences["losses_entropies"] = max(differences["losses_entropies"], difference)
                assert difference <= ENGINE_ATOL, f"{key}, step {step + 1}: {difference}"
        for a, b in zip(got["alphas"], want["alphas"]):
            differences["alpha"] = max(differences["alpha"], (a - b).abs().max().item())
        assert differences["alpha"] <= ENGINE_ATOL
    differences["weights"] = _max_diff(run["full"][0]["state_dict"], ddp["full"][0]["state_dict"])
    _report(f"{engine}_vs_ddp_max_abs_difference", **differences)
    assert differences["weights"] < PARAM_ATOL


@pytest.mark.parametrize("engine", ["zero3", "fsdp2"])
def test_a_llama_trains_and_saves(launched, engine):
    """Beyond BERT: a causal LM with untied embeddings and a final norm (FSDP2 shards those on their own) trains under
    the bundled configuration, and its final folder loads with plain `AutoModelForCausalLM`."""
    from transformers import AutoModelForCausalLM

    run = launched(engine)
    for result in run["llama"]:
        assert result["global_step"] == 2 and len(result["steps"]) == 2
        assert result["engine"]["distributed_type"] == ("FSDP" if engine == "fsdp2" else "DEEPSPEED")
        assert result["engine"]["local_numel"] < result["engine"]["numel"]
        assert torch.isfinite(torch.stack([s["loss"] for s in result["steps"]])).all()
    assert torch.equal(run["llama"][0]["alpha"], run["llama"][1]["alpha"])
    model = AutoModelForCausalLM.from_pretrained(run["out"] / "llama")
    assert type(model).__name__ == "LlamaForCausalLM"
    loaded = model.state_dict()
    for k, v in run["llama"][0]["state_dict"].items():
        assert torch.equal(loaded[k].to(v.dtype), v), k


def test_the_vanilla_mlp_trains_and_saves_under_fsdp2(launched):
    """A model without input embeddings (the vanilla MLP: pixels go straight into its first layer) goes through
    accelerate's FSDP2 preparation, which asks every model for them, and its folder loads with the Auto classes."""
    import experiments.models  # noqa: F401  (registers the vanilla configs with the Auto classes)
    from transformers import AutoModelForImageClassification

    run = launched("fsdp2")
    for result in run["vanilla"]:
        assert result["global_step"] == 2 and result["engine"]["distributed_type"] == "FSDP"
        assert result["engine"]["local_numel"] < result["engine"]["numel"]
    assert torch.equal(run["vanilla"][0]["alpha"], run["vanilla"][1]["alpha"])
    loaded = AutoModelForImageClassification.from_pretrained(run["out"] / "vanilla").state_dict()
    for k, v in run["vanilla"][0]["state_dict"].items():
        assert torch.equal(loaded[k].to(v.dtype), v), k


def test_plain_trainer_runs_fsdp2_under_the_shim(launched):
    """The control: the shim makes Accelerate run FSDP2 for plain `Trainer` too, and plain `Trainer` sees the same
    first-step task loss as `BatchEntropyTrainer` (same model, same batches; LBE only changes the updates)."""
    run = launched("fsdp2")
    for plain, lbe in zip(run["plain"], run["full"]):
        assert plain["engine"]["distributed_type"] == "FSDP"
        assert plain["engine"]["dtensor_params"] == plain["engine"]["num_params"]
        assert plain["alpha"] is None and plain["steps"] == []
        assert plain["global_step"] == 6
    first_plain = [h for h in run["plain"][0]["log_history"] if "loss" in h][0]
    first_lbe = [h for h in run["full"][0]["log_history"] if "task_loss" in h][0]
    assert first_plain["loss"] == pytest.approx(first_lbe["task_loss"], abs=ENGINE_ATOL)
    assert not (run["out"] / "plain" / "batch_entropy_regularizer.safetensors").exists()


def test_two_machines_on_the_loopback(launched, tmp_path):
    """The documented multi-machine command, both "machines" on 127.0.0.1: one process each, the same steps, α and
    weights as 2 processes on one machine."""
    out, port = tmp_path / "two_machines", _free_port()
    procs = []
    for machine_rank in (0, 1):
        cmd = _launch_command(
            "ddp", out, ["full"], "--num_machines", "2", "--num_processes", "2", "--machine_rank", str(machine_rank),
            "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
        )  # fmt: skip
        env = _env() if DEVICE == "cpu" else _env(CUDA_VISIBLE_DEVICES=str(machine_rank))  # one GPU per "machine"
        procs.append((cmd, subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)))
    finished = []
    for cmd, proc in procs:
        try:
            stdout, stderr = proc.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            for _, p in procs:
                p.kill()
            raise
        finished.append((cmd, subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)))
    _check(finished)
    two = _results(out, ["full"])["full"]
    one = launched("ddp")["full"]
    assert [r["world_size"] for r in two] == [2, 2] and [r["rank"] for r in two] == [0, 1]
    for got, want in zip(two, one):
        assert len(got["steps"]) == len(want["steps"]) == 6
        for a, b in zip(got["steps"], want["steps"]):
            for key in ("entropies", "task_loss", "lbe_loss", "loss"):
                torch.testing.assert_close(a[key], b[key], atol=RESUME_ATOL, rtol=0, msg=key)  # CPU: bitwise
        for a, b in zip(got["alphas"], want["alphas"]):
            torch.testing.assert_close(a, b, atol=RESUME_ATOL, rtol=0)
    assert _max_diff(two[0]["state_dict"], one[0]["state_dict"]) <= RESUME_ATOL


def test_every_bundled_config_is_launched_here():
    assert set(accelerate_configs.CONFIGS) == {config for config, _ in ENGINES.values()}
