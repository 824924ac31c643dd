"""BatchEntropyTrainer where you had Trainer: a small BERT, 20 steps on CPU, nothing downloaded.

    python examples/quickstart.py    # needs only `pip install .`
"""

import torch
from transformers import BertConfig, BertForSequenceClassification

from hf_batch_entropy import BatchEntropyConfig, BatchEntropyTrainer

# Any Transformers model (from_pretrained for a real one); here a 4-layer BERT from a config.
torch.manual_seed(0)
model = BertForSequenceClassification(BertConfig(
    vocab_size=1000, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128, num_labels=2,
))
# Any dataset Trainer takes; here 256 random sequences of 16 tokens, labelled by the parity of their first token.
tokens = torch.randint(1, 1000, (256, 16), generator=torch.Generator().manual_seed(0))
train_dataset = [{"input_ids": row, "labels": int(row[0]) % 2} for row in tokens]

args = BatchEntropyConfig(              # TrainingArguments plus the lbe_* fields
    output_dir="runs/quickstart",
    max_steps=20,
    per_device_train_batch_size=32,
    learning_rate=1e-3,
    logging_steps=10,
    report_to="none",
    lbe_beta=0.5,                       # weight of the LBE term (0: exactly Trainer)
)
trainer = BatchEntropyTrainer(model=model, args=args, train_dataset=train_dataset)
trainer.train()
last = [entry for entry in trainer.state.log_history if "lbe_loss" in entry][-1]
print({key: last[key] for key in ("task_loss", "lbe_loss", "batch_entropy_mean", "batch_entropy_min", "lbe_alpha_mean")})
trainer.save_model()                    # model files, plus α in batch_entropy_regularizer.*
