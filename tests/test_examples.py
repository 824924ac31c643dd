"""The examples run as their docstrings spell them (with a tiny step count); the README's quickstart is the example
file verbatim, and the README's other code blocks run (the site's pages include the example files themselves:
tests/test_docs.py).

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


# A DeepSpeed warning, such as its "Setting accelerator to CPU" notice, which it prints where it is installed (as
# .ci/setup installs it) unless the library drops it (hf_batch_entropy._compat.quiet_deepspeed_cpu_notice).
DEEPSPEED_WARNING = re.compile(r"\[WARNING\].*(deepspeed|real_accelerator)|Setting accelerator to CPU", re.I)


def run_example(name: str, *args: str, check: bool = True, cwd=REPO) -> subprocess.CompletedProcess:
    """Run an example as its docstring does; with `check`, it must succeed and print no DeepSpeed warning."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("DS_ACCELERATOR", None)  # as a user runs it: DeepSpeed left to detect its accelerator
    done = subprocess.run([sys.executable, os.path.join(REPO, "examples", name), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)
    if check:
        assert done.returncode == 0, done.stderr[-3000:]
        warnings = [line for line in (done.stdout + done.stderr).splitlines() if DEEPSPEED_WARNING.search(line)]
        assert not warnings, f"{name} printed DeepSpeed warnings: {warnings}"
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


def python_blocks(doc: str) -> list[str]:
    with open(os.path.join(REPO, doc), encoding="utf-8") as f:
        return re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)


@pytest.mark.parametrize("doc,name", [("README.md", "quickstart.py")])
def test_docs_code_is_the_example_verbatim(doc, name):
    with open(os.path.join(REPO, "examples", name), encoding="utf-8") as f:
        example = f.read()
    assert example in python_blocks(doc)


def test_readme_code_blocks_run(tmp_path, monkeypatch):
    """The README's ways in: the mixin block builds a TRL trainer class and its config; the module-targets block,
    given a CNN and a dataset, trains with one regularized layer per ReLU."""
    pytest.importorskip("trl")
    import torch
    from torch import nn
    from trl import SFTConfig, SFTTrainer

    from hf_batch_entropy import BatchEntropyMixin

    monkeypatch.chdir(tmp_path)
    with open(os.path.join(REPO, "examples", "quickstart.py"), encoding="utf-8") as f:
        quickstart = f.read()
    mixin, targets = [block for block in python_blocks("README.md") if block != quickstart]

    namespace: dict = {}
    exec(mixin, namespace)
    assert issubclass(namespace["SFTWithLBETrainer"], BatchEntropyMixin)
    assert issubclass(namespace["SFTWithLBETrainer"], SFTTrainer)
    config = namespace["SFTWithLBEConfig"](output_dir=str(tmp_path / "sft"), lbe_beta=0.05, bf16=False)  # CPU
    assert isinstance(config, SFTConfig) and config.lbe_beta == 0.05

    class CNN(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU())
            self.head = nn.Linear(4 * 8 * 8, 10)

        def forward(self, pixel_values, labels=None):
            logits = self.head(self.body(pixel_values).flatten(1))
            return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}

    torch.manual_seed(0)
    images = torch.randn(32, 1, 8, 8)
    namespace = {"my_cnn": CNN(), "ds": [{"pixel_values": x, "labels": i % 10} for i, x in enumerate(images)]}
    exec(targets, namespace)
    trainer = namespace["trainer"]
    assert trainer.state.global_step == 12  # 3 epochs of 4 batches of 8
    assert trainer.regularizer.num_layers == 2
    assert (trainer.regularizer.alpha.detach() != 0.5).all()  # the targets trained: the LBE term was in the loss


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
    assert done.returncode == 1 and done.stdout == ""
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr  # one line, no chained tracebacks
    assert done.stderr.startswith(f"{name}: Could not load GLUE task")
    offline = " ".join(["python", f"examples/{name}", *offline_command(name)]).replace(GLUE_SAMPLES, "path/to/glue")
    assert done.stderr.strip().endswith(f"Offline: {offline}")


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


@pytest.mark.slow
def test_readme_offline_command_runs(tmp_path):
    """The README's offline command, as written (run from the repository root), plus an output folder of the test's."""
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        (line,) = [line for line in f.read().splitlines() if line.startswith("HF_HUB_OFFLINE=1 python examples/")]
    env_word, *words = shlex.split(line)
    name = words[1].split("/")[-1]
    done = run_example(name, *words[2:], "--output_dir", str(tmp_path))
    assert env_word == "HF_HUB_OFFLINE=1" and "eval accuracy" in done.stdout
    assert (tmp_path / "batch_entropy_regularizer.safetensors").is_file()
