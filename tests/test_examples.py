"""The examples run as written (with a tiny step count), and the README's usage example is examples/finetune_rte.py."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GLUE = os.path.join(REPO, "..", "shared", "data", "glue")
needs_glue = pytest.mark.skipif(not os.path.isdir(GLUE), reason="the GLUE TSVs of ../shared/data/glue are absent")


def run_example(name: str, *args: str) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([sys.executable, os.path.join("examples", name), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_readme_usage_is_the_rte_example_verbatim():
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    with open(os.path.join(REPO, "examples", "finetune_rte.py"), encoding="utf-8") as f:
        example = f.read()
    usage = readme[readme.index("## Usage"):]
    block = re.search(r"```python\n(.*?)```", usage, flags=re.S).group(1)
    assert block == example


@needs_glue
@pytest.mark.slow
def test_finetune_rte(tmp_path):
    out = run_example("finetune_rte.py", "--max_steps", "2", "--output_dir", str(tmp_path))
    assert "eval_accuracy" in out and "learned targets α" in out
    assert (tmp_path / "batch_entropy_regularizer.safetensors").is_file() and (tmp_path / "config.json").is_file()


@pytest.mark.slow
def test_vision_mlp(tmp_path):
    out = run_example("vision_mlp.py", "--depth", "4", "--max_steps", "3", "--output_dir", str(tmp_path))
    assert re.search(r"depth 4, lbe_beta 0.5: test accuracy 0\.\d+", out)
    assert "4 ReLU outputs regularized" in out


@needs_glue
@pytest.mark.slow
def test_sft_with_lbe(tmp_path):
    pytest.importorskip("trl")
    out = run_example("sft_with_lbe.py", "--max_steps", "2", "--output_dir", str(tmp_path))
    assert re.search(r"LBE loss \d\.\d+, batch-entropy mean \d\.\d+ over 5 hidden states", out)
    assert (tmp_path / "batch_entropy_regularizer.safetensors").is_file()
