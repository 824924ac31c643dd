"""What `import hf_batch_entropy` costs: the core, without the experiment's dependencies or side effects."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


def imported_after(code: str) -> dict:
    probe = (
        "import json, sys\n" + code + "\n"
        "from transformers.models.auto.configuration_auto import CONFIG_MAPPING\n"
        "print(json.dumps({'modules': sorted(sys.modules), 'vanilla_registered': 'vanilla_mlp' in CONFIG_MAPPING}))"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_import_loads_the_core_only():
    after = imported_after("import hf_batch_entropy")
    loaded = set(after["modules"])
    for heavy in ("sklearn", "matplotlib", "evaluate", "glue_utils", "hf_batch_entropy.diagnosis", "experiments"):
        assert heavy not in loaded, f"import hf_batch_entropy imported {heavy}"
    assert not after["vanilla_registered"]
    assert {"hf_batch_entropy.entropy", "hf_batch_entropy.regularizer", "hf_batch_entropy.trainer"} <= loaded


def test_diagnose_loads_on_use():
    after = imported_after("from hf_batch_entropy import diagnose")
    assert "hf_batch_entropy.diagnosis" in after["modules"] and "experiments" not in after["modules"]


@pytest.mark.parametrize("name", ["glue", "metrics", "models", "denormals"])
def test_the_research_code_is_not_in_the_package(name):
    """GLUE's helpers and metric sit beside scripts/run_glue.py, the vanilla models and denormals.py in experiments/
    (the wheel's file list is pinned in .ci/check_wheel.py)."""
    import hf_batch_entropy

    package = os.path.dirname(hf_batch_entropy.__file__)
    assert not os.path.exists(os.path.join(package, name)) and not os.path.exists(os.path.join(package, f"{name}.py"))
    for moved in ("VanillaMLPConfig", "load_glue_files", "load_glue_metric", "bundled_minilm_path"):
        assert not hasattr(hf_batch_entropy, moved)


def test_unknown_attribute_is_an_attribute_error():
    import hf_batch_entropy

    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        hf_batch_entropy.nope  # noqa: B018
