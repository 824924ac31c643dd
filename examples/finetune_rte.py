"""Fine-tune MiniLM-L6 on RTE with layerwise batch-entropy regularization (a short demonstration run).

    python examples/finetune_rte.py                                # GLUE RTE from the Hub (nyu-mll/glue), bundled MiniLM
    python examples/finetune_rte.py --data_dir path/to/glue/RTE    # offline: the original GLUE train.tsv and dev.tsv
    python examples/finetune_rte.py --model bert-base-uncased      # any Hub model name or local folder

RTE is hard for a 6-layer model: 60 steps (a third of an epoch) show the mechanics, not a result, and can end below
the majority class (the script prints both). Full runs with seeds are `scripts/run_glue.py` (see experiments/glue/results.md).
"""

import argparse
import sys
from pathlib import Path

import numpy as np
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

from hf_batch_entropy import BatchEntropyConfig, BatchEntropyTrainer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))  # run_glue.py's GLUE helpers, beside it
from glue_utils import bundled_minilm_path, load_glue_files, load_glue_from_hub  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", default=bundled_minilm_path(), help="Hub name or folder (default: bundled MiniLM-L6)")
parser.add_argument("--data_dir", default=None, help="folder with RTE's train.tsv and dev.tsv (default: the Hub)")
parser.add_argument("--max_steps", type=int, default=60, help="optimizer steps of batch 16")
parser.add_argument("--output_dir", default="runs/rte-lbe", help="where the model and α are saved")
cli = parser.parse_args()

# A DatasetDict with sentence1, sentence2 and the Hub's label ids: from the Hub, or from the original GLUE TSVs
# (RTE's text labels and stray quotes included).
if cli.data_dir is None:
    try:
        data, spec = load_glue_from_hub("rte")
    except ConnectionError as err:  # no Hub: one line with the offline command, not a traceback
        sys.exit(f"finetune_rte.py: {err} Offline: python examples/finetune_rte.py --data_dir path/to/glue/RTE")
else:
    data, spec = load_glue_files({"train": f"{cli.data_dir}/train.tsv", "validation": f"{cli.data_dir}/dev.tsv"}, "rte")
tokenizer = AutoTokenizer.from_pretrained(cli.model)
data = data.map(lambda batch: tokenizer(batch["sentence1"], batch["sentence2"], truncation=True, max_length=128),
                batched=True, remove_columns=["sentence1", "sentence2"])
model = AutoModelForSequenceClassification.from_pretrained(
    cli.model, num_labels=2, id2label=dict(enumerate(spec.label_names)), label2id={n: i for i, n in enumerate(spec.label_names)}
)

args = BatchEntropyConfig(
    output_dir=cli.output_dir,
    learning_rate=5e-5,
    per_device_train_batch_size=16,
    max_steps=cli.max_steps,
    logging_steps=10,
    report_to="none",
    lbe_beta=0.05,                  # weight of the LBE term (0: plain Trainer); fine-tuning: 0.005 to 0.05
    lbe_alpha=0.5,                  # initial entropy target of every layer
    lbe_alpha_min=0.5,              # floor of the targets
    lbe_alpha_learning_rate=1e-3,   # α moves at a fine-tuning learning rate only with a rate of its own
)


def accuracy(prediction):
    return {"accuracy": float(np.mean(prediction.predictions.argmax(-1) == prediction.label_ids))}


trainer = BatchEntropyTrainer(
    model=model, args=args, train_dataset=data["train"], eval_dataset=data["validation"],
    processing_class=tokenizer, data_collator=DataCollatorWithPadding(tokenizer), compute_metrics=accuracy,
)
trainer.train()
metrics = trainer.evaluate()
majority = max(np.mean(np.array(data["validation"]["label"]) == c) for c in (0, 1))
print(f"eval accuracy {metrics['eval_accuracy']:.3f} (majority class: {majority:.3f})")
print("learned targets α:", [round(a, 3) for a in trainer.regularizer.alpha.tolist()])  # embeddings + 6 layers
trainer.save_model()  # an ordinary Transformers model, plus α in batch_entropy_regularizer.*; or trainer.push_to_hub()
trainer.accelerator.end_training()  # launched on several processes: ends the process group (ZeRO-3 needs it)
