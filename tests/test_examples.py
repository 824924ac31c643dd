"""The examples run as their docstrings spell them (with a tiny step count), and the README's usage example is
examples/finetune_rte.py verbatim.

The Hub is out of reach in the tests, so each example runs its documented offline command (the line marked
"offline" in its docstring) on the GLUE samples of tests/fixtures/glue, and its default command is checked to stop
with a message that says how to run without the Hub.
"""

from __future__ import annotations

import ast
import os
import re
import shlex
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GLUE_SAMPLES = os.path.join(REPO, "tests", "fixtures", "glue")


def run_example(name: str, *args: str, check: bool = True, cwd=REPO) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([sys.executable, os.path.join(REPO, "examples", name), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)
    if check:
        assert done.returncode == 0, done.stderr[-3000:]
    return done


def offline_command(name: str) -> list[str]:
    """The arguments of the docstring's offline command, with `path/to/glue` pointing at the test samples."""
    with open(os.path.join(REPO, "examples", name), encoding="utf-8") as f:
        doc = ast.get_docstring(ast.parse(f.read()))
    lines = [line.split("#")[0].strip() for line in doc.splitlines() if "# offline" in line]
    assert len(lines) == 1, f"{name}: its docstring needs exactly one command marked '# offline'"
    words = shlex.split(lines[0])
    assert words[:2] == ["python", f"examples/{name}"]
    return [w.replace("path/to/glue", GLUE_SAMPLES) for w in words[2:]]


@pytest.mark.parametrize("section,name", [("## Quickstart", "quickstart.py"), ("## Usage", "finetune_rte.py")])
def test_readme_code_is_the_example_verbatim(section, name):
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    with open(os.path.join(REPO, "examples", name), encoding="utf-8") as f:
        example = f.read()
    block = re.search(r"```python\n(.*?)```", readme[readme.index(section):], flags=re.S).group(1)
    assert block == example


def test_quickstart(tmp_path):
    out = run_example("quickstart.py", cwd=tmp_path).stdout
    logged = ast.literal_eval(out.strip().splitlines()[-1])
    assert set(logged) == {"task_loss", "lbe_loss", "batch_entropy_mean", "batch_entropy_min", "lbe_alpha_mean"}
    assert logged["lbe_loss"] > 0 and 0 < logged["batch_entropy_min"] <= logged["batch_entropy_mean"]
    assert (tmp_path / "runs" / "quickstart" / "batch_entropy_regularizer.safetensors").is_file()


@pytest.mark.parametrize("name", ["finetune_rte.py", "sft_with_lbe.py"])
def test_default_command_without_the_hub_says_how_to_run_offline(name, tmp_path):
    pytest.importorskip("trl")
    done = run_example(name, "--output_dir", str(tmp_path), check=False)
    assert done.returncode != 0
    assert "Could not load GLUE task" in done.stderr and "local files" in done.stderr


@pytest.mark.slow
def test_finetune_rte_offline_command(tmp_path):
    out = run_example("finetune_rte.py", *offline_command("finetune_rte.py"), "--max_steps", "2",
                      "--output_dir", str(tmp_path)).stdout
    assert re.search(r"eval accuracy 0\.\d{3} \(majority class: 0\.5\d\d\)", out) and "learned targets α" in out
    assert (tmp_path / "batch_entropy_regularizer.safetensors").is_file() and (tmp_path / "config.json").is_file()


@pytest.mark.slow
def test_vision_mlp(tmp_path):
    out = run_example("vision_mlp.py", "--depth", "4", "--max_steps", "3", "--output_dir", str(tmp_path)).stdout
    assert re.search(r"depth 4, lbe_beta 0.5: test accuracy 0\.\d+", out)
    assert "4 ReLU outputs regularized" in out


@pytest.mark.slow
def test_vision_mlp_without_lbe_says_it_regularizes_nothing(tmp_path):
    out = run_example("vision_mlp.py", "--depth", "4", "--max_steps", "3", "--lbe_beta", "0",
                      "--output_dir", str(tmp_path)).stdout
    assert "4 ReLU outputs measured, none regularized" in out and "regularized;" not in out


@pytest.mark.slow
def test_sft_with_lbe_offline_command(tmp_path):
    pytest.importorskip("trl")
    out = run_example("sft_with_lbe.py", *offline_command("sft_with_lbe.py"), "--max_steps", "2",
                      "--output_dir", str(tmp_path)).stdout
    assert re.search(r"LBE loss \d\.\d+, batch-entropy mean \d\.\d+ over 5 hidden states", out)
    assert (tmp_path / "batch_entropy_regularizer.safetensors").is_file()
