"""What `import hf_batch_entropy` costs: the core, without the experiment's dependencies or side effects."""

from __future__ import annotations

import json
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
    for heavy in ("sklearn", "matplotlib", "evaluate", "hf_batch_entropy.glue", "hf_batch_entropy.models",
                  "hf_batch_entropy.metrics", "hf_batch_entropy.diagnosis", "experiments"):
        assert heavy not in loaded, f"import hf_batch_entropy imported {heavy}"
    assert not after["vanilla_registered"]
    assert {"hf_batch_entropy.entropy", "hf_batch_entropy.regularizer", "hf_batch_entropy.trainer"} <= loaded


def test_subpackages_load_on_use():
    """The names that moved to subpackages still resolve from the top level, importing their subpackage then."""
    after = imported_after("from hf_batch_entropy import VanillaMLPConfig, load_glue_files")
    assert after["vanilla_registered"]
    assert {"hf_batch_entropy.models", "hf_batch_entropy.glue"} <= set(after["modules"])


def test_unknown_attribute_is_an_attribute_error():
    import hf_batch_entropy

    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        hf_batch_entropy.nope  # noqa: B018
