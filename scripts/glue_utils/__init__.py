"""GLUE for `scripts/run_glue.py` and the examples: the task registry, the Hub and local data files, the metric.

Not part of the installed library: these helpers sit beside `run_glue.py`, as transformers keeps `run_glue.py`'s in
its `examples/`. `python scripts/run_glue.py` finds them as its sibling; the examples and experiments that use them
put `scripts/` on `sys.path` (the tests through pytest's `pythonpath`). They need `pip install ".[glue]"`.

Two ways to get GLUE data:

* from the Hub, `load_glue_from_hub(task)` — `datasets.load_dataset("nyu-mll/glue", task)`;
* from local files, `load_glue_files({"train": ..., "validation": ...}, task)` — CSV, TSV or JSON lines, including the
  original GLUE TSV files exactly as the GLUE benchmark distributes them (CoLA without a header line, MRPC's
  `Quality / #1 String / #2 String` header behind a UTF-8 byte-order mark, RTE's text labels, quote characters that
  are text, not quoting).

Both give the same thing: a `datasets.DatasetDict` whose splits hold the task's sentence column(s) under the Hub's
names (`sentence`, `sentence1`/`sentence2`, `question1`/`question2`, `premise`/`hypothesis`, ...) and an integer
`label` in the Hub's label order (a float for STS-B), so a model fine-tuned from either source has the same
`id2label`.

Every problem with a file (unknown format, empty file, a missing column, a label outside the task's label set, a row
with the wrong number of fields) raises `GlueDataError`, a `ValueError` whose message names the file, the line or the
column, and what to do about it.

Modules: `tasks` (the registry), `files` (local files), `hub` (the Hub), `minilm` (the bundled default model),
`arguments` (`run_glue.py`'s training arguments), `metrics` (the GLUE metric as a local `evaluate` module).
"""

from .metrics import GLUE_METRIC_PATH, glue_metric_path, load_glue_metric
from .arguments import GlueTrainingArguments
from .files import GlueDataError, Table, load_glue_files, read_table
from .hub import GLUE_HUB_DATASET, load_glue_from_hub
from .minilm import bundled_minilm_path
from .tasks import GLUE_TASKS, LABEL_COLUMN, GlueTask, LabelSpec, get_glue_task

__all__ = [
    "GLUE_HUB_DATASET",
    "GLUE_METRIC_PATH",
    "GLUE_TASKS",
    "LABEL_COLUMN",
    "GlueDataError",
    "GlueTask",
    "GlueTrainingArguments",
    "LabelSpec",
    "Table",
    "bundled_minilm_path",
    "get_glue_task",
    "glue_metric_path",
    "load_glue_files",
    "load_glue_from_hub",
    "load_glue_metric",
    "read_table",
]
