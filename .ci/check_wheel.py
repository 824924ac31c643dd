"""Build-time check of what `pip install .` ships: the library and its data files, no research code.

    python .ci/check_wheel.py dist/hf_batch_entropy-*.whl
"""

import sys
import zipfile

REQUIRED = {
    "hf_batch_entropy/__init__.py",
    "hf_batch_entropy/trainer.py",
    "hf_batch_entropy/csrc/squared_deviations.cpp",
    "hf_batch_entropy/models/modeling_vanilla.py",
    "hf_batch_entropy/metrics/glue/glue.py",
    "hf_batch_entropy/accelerate_configs/ddp.yaml",
}

wheel = sys.argv[1]
names = [n for n in zipfile.ZipFile(wheel).namelist() if not n.endswith("/")]
outside = [n for n in names if not (n.startswith("hf_batch_entropy/") or ".dist-info/" in n)]
research = [n for n in names if any(part in n for part in ("experiments", "frontier", "benchmark"))]
missing = sorted(REQUIRED - set(names))
assert not outside, f"the wheel ships files outside the library: {outside}"
assert not research, f"the wheel ships research code: {research}"
assert not missing, f"the wheel lacks: {missing}"
print(f"wheel: {len(names)} files, the library only ({wheel.rsplit('/', 1)[-1]})")
