"""The documentation: the site's pages and the API reference cover the package, their code blocks run, and the links of
every markdown file of the repository resolve (`mkdocs build --strict` in CI checks the site's own links and anchors).
"""

from __future__ import annotations

import os
import re
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(REPO, "docs")


def read(path: str) -> str:
    with open(os.path.join(REPO, path), encoding="utf-8") as f:
        return f.read()


def python_blocks(path: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", read(path), flags=re.S)


def test_every_public_name_has_an_api_page_in_the_navigation():
    import hf_batch_entropy

    pages = {name[:-3] for name in os.listdir(os.path.join(DOCS, "api")) if name.endswith(".md")} - {"index"}
    assert pages == set(hf_batch_entropy.__all__)
    nav = read("mkdocs.yml")
    index = read("docs/api/index.md")
    for name in hf_batch_entropy.__all__:
        assert f"api/{name}.md" in nav and f"({name}.md)" in index, name
        assert f"hf_batch_entropy.{name}" in read(f"docs/api/{name}.md") or name == "diagnose"


def test_settings_page_lists_every_lbe_field():
    import dataclasses

    from hf_batch_entropy import BatchEntropyArguments

    fields = {f.name for f in dataclasses.fields(BatchEntropyArguments) if f.name.startswith("lbe_")}
    listed = set(re.findall(r"^\| `(lbe_\w+)` \|", read("docs/settings.md"), flags=re.M))
    assert listed == fields


def test_pages_show_the_examples_themselves():
    """The pages include the example files (pymdownx.snippets), so what they show is what the tests run."""
    assert '--8<-- "examples/quickstart.py"' in read("docs/install.md")
    assert '--8<-- "examples/finetune_rte.py"' in read("docs/fine-tuning.md")


def test_markdown_links_resolve():
    """Every relative link of every tracked markdown file points at a file or folder of the repository."""
    files = subprocess.run(["git", "ls-files", "*.md"], cwd=REPO, capture_output=True, text=True).stdout.split()
    if not files:
        pytest.skip("not a git checkout")
    dead = []
    for path in files:
        text = re.sub(r"```.*?```", "", read(path), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            target = target.split("#")[0]
            if not target or re.match(r"[a-zA-Z][a-zA-Z0-9+.-]*:", target) or target.startswith("/"):
                continue
            if not os.path.exists(os.path.join(REPO, os.path.dirname(path), target)):
                dead.append(f"{path}: {target}")
    assert not dead, dead


def test_readme_and_docs_stay_small():
    assert os.path.getsize(os.path.join(REPO, "README.md")) < 12_000
    files = subprocess.run(["git", "ls-files", "docs"], cwd=REPO, capture_output=True, text=True).stdout.split()
    if not files:
        pytest.skip("not a git checkout")
    assert sum(os.path.getsize(os.path.join(REPO, f)) for f in files if os.path.exists(os.path.join(REPO, f))) < 1_000_000


def test_other_trainers_page_blocks_run(tmp_path):
    """The mixin block and the CPU config block of docs/trainers.md, in order."""
    pytest.importorskip("trl")
    from trl import SFTConfig, SFTTrainer

    from hf_batch_entropy import BatchEntropyMixin

    namespace: dict = {}
    for block in python_blocks("docs/trainers.md"):
        exec(block.replace('"runs/sft-lbe"', repr(str(tmp_path / "sft"))), namespace)
    assert issubclass(namespace["SFTWithLBETrainer"], BatchEntropyMixin)
    assert issubclass(namespace["SFTWithLBETrainer"], SFTTrainer)
    args = namespace["args"]
    assert isinstance(args, SFTConfig) and args.use_cpu and not args.bf16 and args.lbe_beta == 0.05


def test_training_loop_of_your_own_runs(tmp_path, monkeypatch):
    """docs/models.md's last block: a plain PyTorch loop with BatchEntropyRegularizer, saved and reloaded."""
    from hf_batch_entropy import BatchEntropyRegularizer

    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(python_blocks("docs/models.md")[-1], namespace)
    reloaded = BatchEntropyRegularizer.from_pretrained(tmp_path / "runs" / "my-loop")
    assert reloaded.num_layers == 10
    assert (reloaded.alpha.detach() != 0.5).all()  # α trained


@pytest.mark.slow
def test_hub_push_and_reload_block_runs_against_a_local_hub(tmp_path, monkeypatch, local_hub):
    """docs/fine-tuning.md's push-and-reload block, after the quickstart, with a local folder standing in for the Hub:
    the upload copies the folder, the download returns that copy."""
    import torch

    monkeypatch.chdir(tmp_path)

    namespace: dict = {}
    exec(read("examples/quickstart.py"), namespace)
    (block,) = [b for b in python_blocks("docs/fine-tuning.md") if "push_to_hub" in b]
    exec(block, namespace)
    assert namespace["repo_id"] == "user/quickstart"
    torch.testing.assert_close(namespace["regularizer"].alpha, namespace["trainer"].regularizer.alpha.detach())
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    expected = namespace["trainer"].model.eval()(input_ids=ids).logits
    torch.testing.assert_close(namespace["model"].eval()(input_ids=ids).logits, expected)


def test_plotting_block_runs(tmp_path, monkeypatch):
    """docs/metrics.md's plotting block on a log history shaped as BatchEntropyTrainer writes it."""
    pytest.importorskip("matplotlib")
    from types import SimpleNamespace

    monkeypatch.chdir(tmp_path)
    history = [{"loss": 1.0, "step": s, "batch_entropy_mean": 0.5, "batch_entropy_min": 0.1,
                **{f"batch_entropy/layer_{i}": 0.1 * (i + 1) for i in range(3)}} for s in (10, 20, 30)]
    namespace = {"trainer": SimpleNamespace(state=SimpleNamespace(log_history=history))}
    (block,) = [b for b in python_blocks("docs/metrics.md") if "log_history" in b]
    exec(block, namespace)
    assert (tmp_path / "entropies.png").is_file()
