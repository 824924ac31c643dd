"""The provenance record every result JSON carries."""

from __future__ import annotations

import os
import subprocess

import torch

from experiments.provenance import VECTOR_ISAS, git, provenance

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_record_names_the_command_commit_versions_and_machine():
    record = provenance(["scripts/x.py", "--flag", "two words"], packages=["safetensors", "no-such-package"],
                        torch_threads=1)
    assert record["command"] == "python scripts/x.py --flag 'two words'"
    assert record["versions"]["torch"] == torch.__version__
    assert record["versions"]["no-such-package"] is None and record["versions"]["safetensors"]
    assert record["versions"]["hf_batch_entropy"] and record["versions"]["python"]
    assert record["machine"]["logical_cpus"] == os.cpu_count() and record["machine"]["torch_threads"] == 1
    assert record["machine"]["cpu"]
    assert (record["machine"]["cuda"] is not None) == torch.cuda.is_available()
    assert record["machine"]["aten_cpu_capability"] == torch.backends.cpu.get_cpu_capability()


def test_cpu_id_names_the_generation_and_vector_instruction_sets():
    cpu = provenance(["scripts/x.py"])["machine"]["cpu_id"]
    if not os.path.exists("/proc/cpuinfo"):
        assert cpu == {}
        return
    with open("/proc/cpuinfo") as f:
        first = f.read().split("\n\n")[0]
    fields = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in first.splitlines())}
    assert cpu["family"] == fields.get("cpu family") and cpu["model"] == fields.get("model")
    flags = set(fields.get("flags", "").split())
    assert cpu["vector_isas"] == [isa for isa in VECTOR_ISAS if isa in flags]


def test_commit_and_dirty_state_of_the_checkout():
    record = provenance(["scripts/x.py"])
    head = subprocess.run(["git", "-C", REPO, "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:  # a checkout: the record names its HEAD and whether tracked files differ from it
        assert record["commit"] == head.stdout.strip()
        status = subprocess.run(["git", "-C", REPO, "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True).stdout
        assert record["dirty"] is bool(status.strip())
    else:
        assert record["commit"] is None and record["dirty"] is None


def test_changed_files_name_what_differs_from_the_commit(tmp_path):
    def run(*args):
        subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True)

    run("init", "-q")
    for name in ("code.py", "result.json"):
        (tmp_path / name).write_text("0\n")
    run("add", ".")
    run("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "init")
    (tmp_path / "untracked.txt").write_text("not ours\n")
    clean = provenance(["scripts/x.py"], repo=str(tmp_path))
    assert clean["dirty"] is False and clean["changed_files"] == []
    (tmp_path / "result.json").write_text("1\n")
    changed = provenance(["scripts/x.py"], repo=str(tmp_path))
    assert changed["dirty"] is True and changed["changed_files"] == ["result.json"]


def test_git_outside_a_repository_is_none(tmp_path):
    assert git("rev-parse", "HEAD", cwd=str(tmp_path)) is None


def test_recorded_commands_carry_no_local_absolute_paths(tmp_path):
    """Paths inside the repository are recorded relative to it; others as the docs' `path/to/<name>` placeholder."""
    inside = os.path.join(REPO, "tests", "fixtures", "glue", "RTE")
    record = provenance(["scripts/x.py", "--data_dir", inside, f"--output={tmp_path / 'out.json'}", "--lr", "1e-3"])
    assert record["command"] == "python scripts/x.py --data_dir tests/fixtures/glue/RTE --output=path/to/out.json --lr 1e-3"


def test_result_files_carry_no_local_paths():
    """No JSON or page of the docs or of the experiments' records names a folder of the machine that wrote it:
    neither an absolute path nor one that climbs out of the repository (`../shared/...`)."""
    import json
    import re

    pattern = re.compile(r"(^|[\s\"'=(])(/(work|root|tmp|home)/|\.\./shared)")
    found = []
    folders = [os.path.join(REPO, "docs")] + [os.path.join(REPO, "experiments", name, "results")
                                              for name in sorted(os.listdir(os.path.join(REPO, "experiments")))]
    for folder, _, names in (entry for top in folders for entry in os.walk(top)):
        for name in names:
            if name.endswith((".json", ".md")):
                with open(os.path.join(folder, name), encoding="utf-8") as f:
                    text = json.dumps(json.load(f)) if name.endswith(".json") else f.read()
                found += [f"{name}: {m.group(0)}" for m in pattern.finditer(text)]
    assert not found, found
