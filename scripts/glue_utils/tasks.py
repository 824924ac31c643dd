"""The GLUE task registry: each task's sentence columns (under the Hub's names), label names in the Hub's order, metrics,
and the column names of the original GLUE files; `LabelSpec`, what a dataset's labels are."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = ["GLUE_TASKS", "LABEL_COLUMN", "GlueTask", "LabelSpec", "get_glue_task"]

#: The label column of local files (and of the Hub dataset).
LABEL_COLUMN = "label"


class _Labels:
    """What `label_names` (class names in label-id order, or None for a real-valued label) says about the model's
    output."""

    label_names: tuple[str, ...] | list[str] | None

    @property
    def is_regression(self) -> bool:
        """True when the label is a real number (STS-B's similarity score): num_labels = 1, mean-squared error."""
        return self.label_names is None

    @property
    def num_labels(self) -> int:
        """The size of the model's output: the number of classes, or 1 for regression."""
        return 1 if self.label_names is None else len(self.label_names)


@dataclass(frozen=True)
class GlueTask(_Labels):
    """One GLUE task: how its data looks, on the Hub and in the original TSV files, and how it is scored.

    Attributes:
        name: The task's name as used by `datasets` and `evaluate` (`"sst2"`, `"stsb"`, ...).
        sentence_keys: The sentence column(s) as the Hub names them; the second is `None` for one-sentence tasks.
        label_names: The class names, in the Hub's label-id order; `None` for the regression task STS-B.
        metrics: The metric names the GLUE metric reports for this task.
        validation_splits: The Hub's validation split(s): MNLI has a matched and a mismatched one.
        test_splits: The Hub's (unlabelled) test split(s), in the same order.
        column_aliases: For each canonical column, its names in the original GLUE TSV files
            (e.g. MRPC's `"#1 String"` for `sentence1`, `"Quality"` for `label`).
        headerless_columns: The column names of the original train/dev files when they have no header line (CoLA).
    """

    name: str
    sentence_keys: tuple[str, str | None]
    label_names: tuple[str, ...] | None
    metrics: tuple[str, ...]
    validation_splits: tuple[str, ...] = ("validation",)
    test_splits: tuple[str, ...] = ("test",)
    column_aliases: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    headerless_columns: tuple[str, ...] | None = None

    def column_names(self, canonical: str) -> tuple[str, ...]:
        """The names under which `canonical` may appear in a file: itself first, then the original GLUE names."""
        return (canonical, *self.column_aliases.get(canonical, ()))


_NLI2 = ("entailment", "not_entailment")

#: The nine GLUE tasks. Label orders are those of the Hub dataset `nyu-mll/glue`.
GLUE_TASKS: dict[str, GlueTask] = {
    task.name: task
    for task in (
        GlueTask(
            "cola",
            ("sentence", None),
            ("unacceptable", "acceptable"),
            ("matthews_correlation",),
            # Original train/dev files: no header; the source of the sentence, the label, the original author's
            # acceptability mark (empty when acceptable) and the sentence. The test file has an `index` header.
            headerless_columns=("source", "label", "original_mark", "sentence"),
        ),
        GlueTask("sst2", ("sentence", None), ("negative", "positive"), ("accuracy",)),
        GlueTask(
            "mrpc",
            ("sentence1", "sentence2"),
            ("not_equivalent", "equivalent"),
            ("accuracy", "f1"),
            column_aliases={"sentence1": ("#1 String",), "sentence2": ("#2 String",), "label": ("Quality",)},
        ),
        GlueTask(
            "qqp",
            ("question1", "question2"),
            ("not_duplicate", "duplicate"),
            ("accuracy", "f1"),
            column_aliases={"label": ("is_duplicate",)},
        ),
        GlueTask(
            "stsb",
            ("sentence1", "sentence2"),
            None,
            ("pearson", "spearmanr"),
            column_aliases={"label": ("score",)},
        ),
        GlueTask(
            "mnli",
            ("premise", "hypothesis"),
            ("entailment", "neutral", "contradiction"),
            ("accuracy",),
            validation_splits=("validation_matched", "validation_mismatched"),
            test_splits=("test_matched", "test_mismatched"),
            column_aliases={"premise": ("sentence1",), "hypothesis": ("sentence2",), "label": ("gold_label",)},
        ),
        GlueTask("qnli", ("question", "sentence"), _NLI2, ("accuracy",)),
        GlueTask("rte", ("sentence1", "sentence2"), _NLI2, ("accuracy",)),
        GlueTask("wnli", ("sentence1", "sentence2"), ("not_entailment", "entailment"), ("accuracy",)),
    )
}


def get_glue_task(name: str) -> GlueTask:
    """The GLUE task called `name`; case, `-` and `_` are ignored, so `"SST-2"`, `"STS-B"` and `"CoLA"` work.

    Raises:
        ValueError: for a name that is not one of the nine GLUE tasks.
    """
    key = name.lower().replace("-", "").replace("_", "")
    if key not in GLUE_TASKS:
        raise ValueError(f"Unknown GLUE task {name!r}: choose one of {', '.join(GLUE_TASKS)}.")
    return GLUE_TASKS[key]


@dataclass
class LabelSpec(_Labels):
    """What the model predicts, resolved from the task or, without one, from the training file.

    Attributes:
        sentence_keys: The sentence column(s) of the datasets built (the second is None for one-sentence tasks).
        label_names: Class names in label-id order; None for regression.
        task: The GLUE task, when one was named.
    """

    sentence_keys: tuple[str, str | None]
    label_names: list[str] | None
    task: GlueTask | None = None
