"""The benchmark (`scripts/benchmark.py`, `experiments.benchmark`) runs and records what it measured. Its figures
are not checked here: speed claims live in docs/benchmarks.md with the commands that made them."""

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
    assert "| tiny-bert | BatchEntropyTrainer |" in done.stdout


@pytest.mark.parametrize("command,program", [
    (["scripts/benchmark.py", "--steps", "0"], "benchmark.py"),
    (["-m", "experiments.benchmark", "--rounds", "0"], "python -m experiments.benchmark"),
])
def test_bad_counts_are_one_line_naming_the_program(command, program):
    done = subprocess.run([sys.executable, *command], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and done.stdout == ""
    flag, value = command[-2:]
    assert done.stderr.strip() == f"{program}: error: argument {flag}: must be >= 1, got {value}"
