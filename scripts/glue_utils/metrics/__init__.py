"""Evaluation metrics kept beside `scripts/run_glue.py` as `evaluate` modules, so they load offline.

`evaluate.load` takes a local folder holding a script of the same name; these helpers give those folders:

    >>> import evaluate
    >>> from glue_utils.metrics import glue_metric_path
    >>> metric = evaluate.load(glue_metric_path(), "rte")
"""

from __future__ import annotations

import os
from typing import Any

__all__ = ["GLUE_METRIC_PATH", "glue_metric_path", "load_glue_metric"]

#: The folder of the GLUE metric module (`glue/glue.py`), for `evaluate.load(GLUE_METRIC_PATH, task)`.
GLUE_METRIC_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "glue")


def glue_metric_path() -> str:
    """The local path of the bundled GLUE metric: `evaluate.load(glue_metric_path(), task)` fetches nothing."""
    return GLUE_METRIC_PATH


def load_glue_metric(task: str, **kwargs: Any):
    """`evaluate.load` the bundled GLUE metric for `task`.

    Args:
        task: A GLUE task; spellings such as `"SST-2"` or `"STS-B"` work too. `"mnli_mismatched"`,
            `"mnli_matched"` and `"hans"` are accepted as in the Hub's `glue` metric.
        **kwargs: Passed to `evaluate.load` (e.g. `experiment_id`, `keep_in_memory`).
    """
    import evaluate

    config = task.lower().replace("-", "")
    if config not in ("mnli_matched", "mnli_mismatched"):
        config = config.replace("_", "")
    return evaluate.load(GLUE_METRIC_PATH, config, **kwargs)
