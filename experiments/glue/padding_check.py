"""What padding does to the batch-entropy of a pretrained transformer's hidden states, with and without
`lbe_ignore_padding`.

The bundled MiniLM-L6 (pretrained, eval mode) reads 4 RTE premises cut to 8 tokens each, once unpadded and once padded
on the right to 16 tokens. For each, the mean batch-entropy over its 7 hidden states and the LBE loss of the library's
defaults (β = α₀ = α_min = 0.5, task loss 1) are computed over every position (`lbe_ignore_padding=False`, the paper's
code and this library before the option) and over the real tokens only (`True`, the default).

    python experiments/glue/padding_check.py --output experiments/glue/results/padding_minilm.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # run as a file: the repository root, for `experiments`
sys.path.insert(0, str(REPO / "scripts"))  # run_glue.py's GLUE helpers, `glue_utils`

import torch
from transformers import AutoModel, AutoTokenizer

from hf_batch_entropy import BatchEntropyRegularizer
from experiments.provenance import provenance
from glue_utils import bundled_minilm_path, load_glue_files
from hf_batch_entropy.tokens import TokenLayout


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                                                       "tests", "fixtures", "glue", "RTE", "dev.tsv"),
                        help="RTE's dev.tsv (default: the sample in tests/fixtures; its first 4 premises are dev.tsv's)")
    parser.add_argument("--output", default=None, help="write the figures as JSON here")
    cli = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(bundled_minilm_path())
    model = AutoModel.from_pretrained(bundled_minilm_path()).eval()
    premises = load_glue_files({"validation": cli.data}, "rte")[0]["validation"]["sentence1"][:4]
    unpadded = tokenizer(premises, truncation=True, max_length=8, return_tensors="pt")
    assert unpadded["attention_mask"].all(), "every premise must have at least 8 tokens"
    padded = tokenizer(premises, truncation=True, max_length=8, padding="max_length", return_tensors="pt")
    padded = {k: torch.cat([v, torch.full_like(v, tokenizer.pad_token_id if k == "input_ids" else 0)], dim=1)
              for k, v in padded.items()}

    regularizer = BatchEntropyRegularizer(7, beta=0.5, alpha=0.5, alpha_min=0.5)
    rows = {}
    with torch.no_grad():
        for name, batch in (("unpadded (8 tokens)", unpadded), ("padded to 16 tokens", padded)):
            hidden = list(model(**batch, output_hidden_states=True).hidden_states)
            for ignore in (False, True):
                masks = TokenLayout(model).views(batch, hidden, [f"hidden_states.{i}" for i in range(7)])[1] if ignore else None
                out = regularizer(hidden, torch.tensor(1.0), masks)
                rows[f"{name}, lbe_ignore_padding={ignore}"] = {
                    "batch_entropy_mean": out.entropies.mean().item(),
                    "lbe_loss": out.lbe_loss.item(),
                    "entropies": out.entropies.tolist(),
                }
    for key, row in rows.items():
        print(f"{key:48s} batch-entropy mean {row['batch_entropy_mean']:.4f}   LBE loss {row['lbe_loss']:.5f}")
    result = {
        "rows": rows,
        **provenance(sys.argv),
    }
    if cli.output:
        with open(cli.output, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
