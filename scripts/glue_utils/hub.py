"""GLUE from the Hub dataset `nyu-mll/glue`."""

from __future__ import annotations

from typing import Any

from .tasks import LABEL_COLUMN, GlueTask, LabelSpec, get_glue_task

__all__ = ["GLUE_HUB_DATASET", "load_glue_from_hub"]

#: The Hub dataset that holds GLUE (the canonical copy of the old `glue` script dataset).
GLUE_HUB_DATASET = "nyu-mll/glue"


def load_glue_from_hub(task: GlueTask | str, cache_dir: str | None = None, **kwargs: Any) -> tuple[Any, LabelSpec]:
    """Load a GLUE task from the Hub dataset `nyu-mll/glue` (downloaded once, then from the `datasets` cache).

    Returns:
        `(datasets, spec)` as `load_glue_files` returns them; test splits carry the label -1 (GLUE hides them).

    Raises:
        ConnectionError: when the Hub cannot be reached and the task is not cached, saying how to use local files.
    """
    import datasets

    if isinstance(task, str):
        task = get_glue_task(task)
    try:
        raw = datasets.load_dataset(GLUE_HUB_DATASET, task.name, cache_dir=cache_dir, **kwargs)
    except (ConnectionError, OSError, ValueError) as err:
        # Offline (HF_DATASETS_OFFLINE=1 or no network) datasets raises ConnectionError/OSError/ValueError variants.
        # One line (the scripts print it as their error): datasets' own message can span several.
        reason = " ".join(str(err).split()) or type(err).__name__
        raise ConnectionError(
            f"Could not load GLUE task {task.name!r} from the Hub dataset {GLUE_HUB_DATASET!r} ({reason}). Without "
            "access to the Hub, use local files, e.g. the original GLUE TSV files: `load_glue_files(files, "
            f"{task.name!r})`; the scripts and examples take them by flag (run_glue.py: --task_name {task.name} "
            "--train_file ... --validation_file ...; the examples' --help names theirs; tests/fixtures/glue holds "
            "samples). HF_HUB_OFFLINE=1 skips the attempt to reach the Hub."
        ) from err
    spec = LabelSpec(task.sentence_keys, list(task.label_names) if task.label_names else None, task)
    if not task.is_regression:
        hub_names = raw["train"].features[LABEL_COLUMN].names
        if [n.lower() for n in hub_names] != list(task.label_names):
            # Guards the registry against a changed Hub dataset: ids would silently mean other classes.
            raise ValueError(f"The Hub's {task.name} labels {hub_names} differ from {list(task.label_names)}.")
    return raw, spec
