"""The benchmark (`scripts/benchmark.py`, `experiments.benchmark`) runs and records what it measured. Its figures
are not checked here: speed claims live in experiments/benchmark/benchmarks.md with the commands that made them."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_tiny_case_writes_its_table_and_provenance(tmp_path):
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, os.path.join(REPO, "scripts", "benchmark.py"), "--device", "cpu", "--threads", "1",
         "--cases", "tiny-bert", "--steps", "2", "--warmup", "1", "--rounds", "1", "--memory_repeats", "1",
         "--output", str(out)],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["complete"] and report["meta"]["command"].startswith("python ") and "--cases tiny-bert" in report["meta"]["command"]
    assert report["meta"]["versions"]["torch"] and report["meta"]["machine"]["torch_threads"] == 1
    (case,) = report["results"]
    assert case["case"] == "tiny-bert" and set(case["variants"]) == {"trainer", "lbe"}
    for variant in case["variants"].values():  # 1 round of 2 measured steps each
        assert len(variant["step_times_s"]) == 2 and all(t > 0 for t in variant["step_times_s"])
        assert variant["peak_memory_bytes"] > 0
    assert case["variants"]["trainer"]["time_ratio"] == 1.0 and case["variants"]["lbe"]["time_ratio"] > 0
    lbe = case["variants"]["lbe"]  # one round: its paired ratio, but no interval from a bootstrap over rounds
    assert len(lbe["round_time_ratios"]) == 1 and lbe["paired_time_ratio"] == lbe["round_time_ratios"][0]
    assert lbe["time_ratio_ci95"] is None and lbe["paired_time_ratio_ci95"] is None
    assert "| tiny-bert | BatchEntropyTrainer |" in done.stdout


def test_rounds_are_paired_and_resampled_whole():
    from experiments.benchmark.cli import _round_bootstrap_ci, _round_ratios

    # The machine's speed drifts between rounds (1×, 2×, 1.5×, 1×); within a round LBE's turn is 10 % slower.
    base = [1.0, 1.0, 2.0, 2.0, 1.5, 1.5, 1.0, 1.0]
    lbe = [1.1 * t for t in base]
    assert _round_ratios(base, lbe, steps=2) == pytest.approx([1.1] * 4)
    for pooled in (True, False):  # every resample keeps the pairs
        assert _round_bootstrap_ci(base, lbe, steps=2, pooled=pooled) == pytest.approx([1.1, 1.1])
        assert _round_bootstrap_ci(base[:4], lbe[:4], steps=2, pooled=pooled) is None  # 2 rounds: too few
    # One round in which LBE's turn ran on a slow machine (1.5×): it moves the ratio of the pooled medians, not the
    # median of the rounds' ratios.
    disturbed = lbe[:2] + [1.5 * t for t in lbe[2:4]] + lbe[4:]
    assert _round_ratios(base, disturbed, steps=2) == pytest.approx([1.1, 1.65, 1.1, 1.1])
    low, high = _round_bootstrap_ci(base, disturbed, steps=2, pooled=True)
    assert high > 1.3 and _round_bootstrap_ci(base, disturbed, steps=2, pooled=True) == [low, high]  # seeded
    low, high = _round_bootstrap_ci(base, disturbed, steps=2, pooled=False)
    assert low == pytest.approx(1.1) and high == pytest.approx(1.65)  # the median of 4 draws can hold 2 of the 1.65s


@pytest.mark.parametrize("command,program", [
    (["scripts/benchmark.py", "--steps", "0"], "benchmark.py"),
    (["-m", "experiments.benchmark", "--rounds", "0"], "python -m experiments.benchmark"),
])
def test_bad_counts_are_one_line_naming_the_program(command, program):
    done = subprocess.run([sys.executable, *command], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and done.stdout == ""
    flag, value = command[-2:]
    assert done.stderr.strip() == f"{program}: error: argument {flag}: must be >= 1, got {value}"


def test_mlp_cases_are_the_depth_500_mlp_at_their_width():
    """`mlp64` … `mlp1000`: the same depth-500 MLP, batch 128, at the width in the name (built small here: the
    builder's model at depth 2)."""
    from experiments.benchmark import cases

    for name, width in cases.MLP_WIDTHS.items():
        case = cases.get_case(name)
        assert name in cases.ALL_CASES and case.batch_size == 128
        assert case.description == f"vanilla MLP depth 500 width {width}, batch 128"
        model = cases._vanilla_mlp(width, depth=2)()
        assert model.config.width == width and [layer.dense.out_features for layer in model.layers] == [width, width]


def _can_compile_cpp_extensions() -> bool:
    import shutil

    try:
        import ninja  # noqa: F401
    except ImportError:
        return False
    return shutil.which("c++") is not None or shutil.which("g++") is not None


@pytest.mark.skipif(not _can_compile_cpp_extensions(), reason="the probe compiles C++: needs a compiler and ninja")
@pytest.mark.parametrize("in_place", [False, True])
def test_fused_cpu_probe_gives_the_estimators_values_and_gradients(in_place):
    """The probe whose figures experiments/benchmark/benchmarks.md quotes computes what the package does (to float32 rounding), on a
    chain of layers as in a model, so that what it times is the estimator's work."""
    import torch

    from experiments.benchmark.fused_cpu_probe import install
    from hf_batch_entropy import batch_entropies

    torch.manual_seed(0)
    layers = [torch.nn.Linear(32, 32) for _ in range(12)]
    for layer in layers:
        torch.nn.init.orthogonal_(layer.weight, gain=1.4)
    inputs = torch.randn(16, 32)
    weights = torch.linspace(-1, 1, len(layers))

    def step():
        for layer in layers:
            layer.zero_grad(set_to_none=True)
        hidden, activations = inputs, []
        for layer in layers:
            hidden = torch.relu(layer(hidden))
            activations.append(hidden)
        entropies = batch_entropies(activations)
        (hidden.square().mean() + (entropies * weights).sum()).backward()
        return entropies.detach(), [layer.weight.grad.clone() for layer in layers]

    expected, expected_grads = step()
    restore = install(in_place=in_place)
    try:
        got, got_grads = step()
    finally:
        restore()
    assert restore.calls["forward"] >= 1 and restore.calls["backward"] >= 1  # the C++ loops ran, not a fallback
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    for got_grad, expected_grad in zip(got_grads, expected_grads):
        torch.testing.assert_close(got_grad, expected_grad, rtol=1e-4, atol=1e-6)
    # Restored: the package's own path again, bit for bit.
    again, _ = step()
    assert torch.equal(again, expected)
