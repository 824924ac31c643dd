"""What a model trained with LBE says about itself on the Hub: a tag, the method, its settings and the paper."""

from __future__ import annotations

import json

MODEL_TAG = "batch-entropy"

CITATION = """@article{peer2022improving,
  title   = {Improving the Trainability of Deep Neural Networks through Layerwise Batch-Entropy Regularization},
  author  = {Peer, David and Keulen, Bart and Stabinger, Sebastian and Piater, Justus and Rodr{\\'i}guez-S{\\'a}nchez, Antonio},
  journal = {Transactions on Machine Learning Research},
  issn    = {2835-8856},
  year    = {2022},
  url     = {https://openreview.net/forum?id=LJohl5DnZf}
}"""

SECTION_TITLE = "## Layerwise batch-entropy regularization"


def model_card_section(settings: dict, num_layers: int | None, source: str | None) -> str:
    """A Markdown section naming the method, the `lbe_*` settings used and the paper (with BibTeX)."""
    layers = f"{num_layers} layers ({source})" if num_layers else "the model's layers"
    return f"""
{SECTION_TITLE}

This model was trained with [hf-batch-entropy](https://github.com/hf-batch-entropy/hf-batch-entropy)'s
`BatchEntropyTrainer`: layerwise batch-entropy regularization (LBE, Peer et al., TMLR 2022). Each regularized layer's
batch-entropy `H_l` (the Gaussian differential entropy of its units across the mini-batch) is pulled towards a learned
target, `L = L_task + β·mean_l (H_l − max(α_min, |α_l|))²·L_task`, over {layers}.

The weights are an ordinary Transformers model: loading them needs no extra package. The learned targets `α` are saved
beside them in `batch_entropy_regularizer.safetensors`.

LBE settings:

```json
{json.dumps(settings, indent=2)}
```

### Citation

```bibtex
{CITATION}
```
"""


def append_section(path: str, settings: dict, num_layers: int | None, source: str | None) -> None:
    """Append `model_card_section` to the card at `path` (the one `Trainer.create_model_card` wrote), unless it has
    one already."""
    with open(path, encoding="utf-8") as f:
        card = f.read()
    if SECTION_TITLE not in card:
        with open(path, "w", encoding="utf-8") as f:
            f.write(card.rstrip("\n") + "\n" + model_card_section(settings, num_layers, source))
