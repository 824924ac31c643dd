"""Build-time check of what `pip install .` ships: exactly the library's modules and data files, nothing else.

    python .ci/check_wheel.py dist/hf_batch_entropy-*.whl

The list is pinned: a module added to or removed from `hf_batch_entropy/` changes it on purpose. The research code
(experiments/, with the vanilla and autoencoder models and denormals.py), run_glue.py's GLUE helpers and metric
(scripts/glue_utils), the examples, docs and tests stay in the repository.
"""

import sys
import zipfile

LIBRARY = {
    "hf_batch_entropy/__init__.py",
    "hf_batch_entropy/_compat.py",
    "hf_batch_entropy/accelerate_configs/__init__.py",
    "hf_batch_entropy/accelerate_configs/ddp.yaml",
    "hf_batch_entropy/accelerate_configs/deepspeed_zero2.yaml",
    "hf_batch_entropy/accelerate_configs/deepspeed_zero3.yaml",
    "hf_batch_entropy/accelerate_configs/fsdp.yaml",
    "hf_batch_entropy/alpha_step.py",
    "hf_batch_entropy/capture/__init__.py",
    "hf_batch_entropy/capture/base.py",
    "hf_batch_entropy/capture/hidden_states.py",
    "hf_batch_entropy/capture/hooks.py",
    "hf_batch_entropy/capture/selection.py",
    "hf_batch_entropy/capture/targets.py",
    "hf_batch_entropy/capture/towers.py",
    "hf_batch_entropy/capture/watch.py",
    "hf_batch_entropy/config.py",
    "hf_batch_entropy/diagnosis/__init__.py",
    "hf_batch_entropy/diagnosis/__main__.py",
    "hf_batch_entropy/diagnosis/cli.py",
    "hf_batch_entropy/diagnosis/clone.py",
    "hf_batch_entropy/diagnosis/inputs.py",
    "hf_batch_entropy/diagnosis/loading.py",
    "hf_batch_entropy/diagnosis/report.py",
    "hf_batch_entropy/entropy/__init__.py",
    "hf_batch_entropy/entropy/distributed.py",
    "hf_batch_entropy/entropy/fused.py",
    "hf_batch_entropy/entropy/reference.py",
    "hf_batch_entropy/guard.py",
    "hf_batch_entropy/modelcard.py",
    "hf_batch_entropy/prediction.py",
    "hf_batch_entropy/regularizer.py",
    "hf_batch_entropy/tally.py",
    "hf_batch_entropy/tokens.py",
    "hf_batch_entropy/trainer.py",
}

wheel = sys.argv[1]
names = {n for n in zipfile.ZipFile(wheel).namelist() if not n.endswith("/") and ".dist-info/" not in n}
extra, missing = sorted(names - LIBRARY), sorted(LIBRARY - names)
assert not extra, f"the wheel ships files that are not the library's (pin them in .ci/check_wheel.py if they are): {extra}"
assert not missing, f"the wheel lacks: {missing}"
print(f"wheel: {len(names)} files, the library's and nothing else ({wheel.rsplit('/', 1)[-1]})")
