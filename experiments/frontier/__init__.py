"""The trainability frontier of vanilla deep networks with and without layerwise batch-entropy regularization: the
project's main experiment, run by `scripts/train_vanilla.py` (or `python -m experiments.frontier`), whose
docstring describes the job and its outputs.

Imported on use only (`import hf_batch_entropy` does not load it). Modules by concern:

- `arguments`: the flags (three dataclasses), the named recipes (`PRESETS`), parsing and checks;
- `data`: the digits and image datasets;
- `runs`: one training run (`run_job`), what it records, the trainer subclass, the order of the runs (`plan_jobs`);
- `report`: the summary over seeds, the tables, the interpretation, the progress lines;
- `plot`: the pictures (matplotlib);
- `cli`: `main(argv)`, the job itself, with the provenance of results.json.
"""

from .arguments import (
    DEAD_ENTROPY,
    PRESETS,
    RANK_LAYERS,
    RUNS,
    DataArguments,
    ModelArguments,
    UsageError,
    VanillaTrainingArguments,
    expand_preset,
    parse_arguments,
)
from .cli import main, provenance
from .data import ImageTensorDataset, load_data, load_digits_split, load_image_dataset
from .plot import plot_entropy_heatmaps, plot_frontier, run_title
from .report import Progress, compare_at_depth, format_frontier_table, format_table, interpret, summarize
from .runs import (
    EntropyRecorder,
    Job,
    VanillaTrainer,
    effective_rank,
    effective_ranks,
    hidden_states_of,
    plan_jobs,
    reference_target_modules,
    run_job,
)

__all__ = [
    "DEAD_ENTROPY", "PRESETS", "RANK_LAYERS", "RUNS", "DataArguments", "EntropyRecorder", "ImageTensorDataset", "Job",
    "ModelArguments", "Progress", "UsageError", "VanillaTrainer", "VanillaTrainingArguments", "compare_at_depth",
    "effective_rank", "effective_ranks", "expand_preset", "format_frontier_table", "format_table", "hidden_states_of",
    "interpret", "load_data", "load_digits_split", "load_image_dataset", "main", "parse_arguments", "plan_jobs",
    "plot_entropy_heatmaps", "plot_frontier", "provenance", "reference_target_modules", "run_job", "run_title",
    "summarize",
]
