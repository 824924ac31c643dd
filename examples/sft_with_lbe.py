"""Supervised fine-tuning with TRL's `SFTTrainer` plus layerwise batch-entropy regularization, through
`BatchEntropyMixin` and `batch_entropy_config` (needs `pip install trl`).

By default it trains a small Llama-style model from scratch, with a word-level tokenizer made from the data, on 1,000
SST-2 reviews (GLUE, from the Hub) written as "review: … sentiment: …"; pass any causal LM with `--model`.

    python examples/sft_with_lbe.py                                      # SST-2 from the Hub (nyu-mll/glue)
    python examples/sft_with_lbe.py --data path/to/glue/SST-2/train.tsv  # offline: the original GLUE file
    python examples/sft_with_lbe.py --model Qwen/Qwen3-0.6B              # a pretrained causal LM from the Hub
"""

import argparse
import sys
from pathlib import Path

import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from trl import SFTConfig, SFTTrainer

from hf_batch_entropy import BatchEntropyMixin, batch_entropy_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))  # run_glue.py's GLUE helpers, beside it
from glue_utils import load_glue_files, load_glue_from_hub  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", default=None, help="a causal LM (Hub name or folder); default: a small one from scratch")
parser.add_argument("--data", default=None, help="SST-2's train.tsv (default: GLUE SST-2 from the Hub)")
parser.add_argument("--max_steps", type=int, default=30, help="optimizer steps of batch 16")
parser.add_argument("--output_dir", default="runs/sft-lbe", help="where the model and α are saved")
cli = parser.parse_args()


class SFTWithLBETrainer(BatchEntropyMixin, SFTTrainer):
    """TRL's SFTTrainer, with LBE on the model's hidden states."""


SFTWithLBEConfig = batch_entropy_config(SFTConfig)  # SFTConfig plus the lbe_* fields

try:
    reviews = (load_glue_from_hub("sst2") if cli.data is None else load_glue_files({"train": cli.data}, "sst2"))[0]["train"]
except ConnectionError as err:  # no Hub: one line with the offline command, not a traceback
    sys.exit(f"sft_with_lbe.py: {err} Offline: python examples/sft_with_lbe.py --data path/to/glue/SST-2/train.tsv")
reviews = reviews.select(range(min(1000, len(reviews))))
texts = [f"review: {r['sentence']} sentiment: {'positive' if r['label'] else 'negative'}" for r in reviews]

if cli.model is None:
    # Offline: a word-level tokenizer of these texts and a small Llama-style model from scratch.
    words = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    words.train_from_iterator(texts, trainers.WordLevelTrainer(vocab_size=2000, special_tokens=["[PAD]", "[UNK]", "[EOS]"]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    ))
else:
    tokenizer = AutoTokenizer.from_pretrained(cli.model)
    model = AutoModelForCausalLM.from_pretrained(cli.model)

args = SFTWithLBEConfig(
    output_dir=cli.output_dir,
    learning_rate=1e-3,
    per_device_train_batch_size=16,
    max_steps=cli.max_steps,
    max_length=64,
    logging_steps=10,
    logging_first_step=True,
    report_to="none",
    bf16=torch.cuda.is_available(),
    lbe_beta=0.1,                   # weight of the LBE term
    lbe_alpha=0.5,                  # initial entropy target of every layer
    lbe_alpha_min=0.3,              # floor of the targets
    lbe_ignore_padding=True,        # padding is not information (the default)
)
trainer = SFTWithLBETrainer(model=model, args=args, train_dataset=Dataset.from_dict({"text": texts}),
                            processing_class=tokenizer)
trainer.train()
last = [h for h in trainer.state.log_history if "lbe_loss" in h][-1]
print(f"task loss {last['task_loss']:.3f}, LBE loss {last['lbe_loss']:.4f}, "
      f"batch-entropy mean {last['batch_entropy_mean']:.3f} over {trainer.regularizer.num_layers} hidden states")
trainer.save_model()
trainer.accelerator.end_training()  # launched on several processes: ends the process group (ZeRO-3 needs it)
