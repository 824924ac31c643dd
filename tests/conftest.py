"""Shared fixtures: tiny models built from configs and small synthetic datasets (no download, milliseconds)."""

from __future__ import annotations

import logging
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification, PretrainedConfig, PreTrainedModel, TrainingArguments

from hf_batch_entropy import BatchEntropyConfig


@pytest.fixture(scope="module")
def restore_torch_globals():
    """For modules whose code under test sets torch's thread count and flush-denormal mode for its CPU runs (the
    vanilla-network job, the MNIST experiments): restore both after the module, so other tests do not inherit them."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
    torch.set_flush_denormal(False)


@pytest.fixture(autouse=True)
def restore_logger_levels():
    """The experiments' command lines set logging levels for their runs (`quiet()`: the package's warnings off); tests
    call them in-process, so every test gets back the levels it started with, and a later test's `caplog` sees the
    package's records."""
    names = ("hf_batch_entropy", "transformers", "experiments")
    levels = {name: logging.getLogger(name).level for name in names}
    yield
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


class DictDataset(torch.utils.data.Dataset):
    """A list of feature dicts, as a map-style dataset that `Trainer`'s default collator batches."""

    def __init__(self, rows: list[dict]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return self.rows[i]


def tiny_bert_config(**overrides) -> BertConfig:
    kwargs = dict(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
        num_labels=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    kwargs.update(overrides)
    return BertConfig(**kwargs)


def tiny_bert(seed: int = 0, **overrides) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    return BertForSequenceClassification(tiny_bert_config(**overrides))


def token_dataset(n: int = 64, seq_len: int = 10, seed: int = 0) -> DictDataset:
    """Random token sequences; the label is a function of the first token, so the task is learnable."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 64, (n, seq_len), generator=g)
    return DictDataset(
        [{"input_ids": row, "attention_mask": torch.ones(seq_len, dtype=torch.long), "labels": int(row[0] % 2)} for row in ids]
    )


def word_tokenizer():
    """A word-level fast tokenizer built offline, with pad and eos tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<eos>", "<unk>"] + "the a cat dog sat ran on mat rug and big small".split()
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


class TinyMLP(nn.Module):
    """A plain `nn.Module` (no hidden states) with named blocks: hooks are the only way in."""

    def __init__(self, depth: int = 3, width: int = 16, in_features: int = 8, num_labels: int = 3):
        super().__init__()
        self.stem = nn.Linear(in_features, width)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(width, width), nn.Tanh()) for _ in range(depth)
        )
        self.head = nn.Linear(width, num_labels)

    def forward(self, x, labels=None):
        h = self.stem(x)
        for block in self.blocks:
            h = block(h)
        logits = self.head(h)
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return {"loss": loss, "logits": logits}


class KwargsToBackbone(PreTrainedModel):
    """A Transformers model whose `forward` takes `**kwargs` (so, by its signature, `output_hidden_states`) and hands
    them on to a plain backbone that takes none: only a forward can tell that it cannot be asked for hidden states."""

    config_class = PretrainedConfig
    accepts_loss_kwargs = False  # so that Trainer hands it no num_items_in_batch

    def __init__(self, config: PretrainedConfig | None = None):
        super().__init__(config or PretrainedConfig())
        torch.manual_seed(0)
        self.backbone = TinyMLP()  # forward(x, labels=None)

    def forward(self, x, labels=None, **kwargs):
        return self.backbone(x, labels=labels, **kwargs)


def vector_dataset(n: int = 64, in_features: int = 8, num_labels: int = 3, seed: int = 0) -> DictDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, in_features, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    return DictDataset([{"x": x[i], "labels": int(y[i])} for i in range(n)])


def make_args(tmp_path, plain: bool = False, **overrides) -> BatchEntropyConfig:
    """Fast, offline, CPU training arguments; `plain=True` gives `transformers.TrainingArguments` with the same values."""
    kwargs = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=8,
        per_device_eval_batch_size=8,
        learning_rate=1e-3,
        max_steps=4,
        logging_steps=2,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        data_seed=0,
    )
    kwargs.update(overrides)
    return TrainingArguments(**kwargs) if plain else BatchEntropyConfig(**kwargs)


@pytest.fixture
def args_factory(tmp_path):
    return lambda **overrides: make_args(tmp_path, **overrides)


@pytest.fixture
def local_hub(tmp_path, monkeypatch):
    """A local folder standing in for the Hub: `Trainer.push_to_hub()` copies the folder it would upload to
    `<hub>/<user>/<repo>` (its ignore patterns applied), and `huggingface_hub.snapshot_download` returns that copy.
    Returns the hub folder."""
    import fnmatch
    import shutil
    from types import SimpleNamespace

    import huggingface_hub
    import transformers.trainer as trainer_module

    hub = tmp_path / "hub"

    class LocalHub:
        def create_repo(self, repo_id, **kwargs):
            return SimpleNamespace(repo_id=f"user/{repo_id.split('/')[-1]}")

        def upload_folder(self, repo_id, folder_path, ignore_patterns=(), **kwargs):
            def ignored(directory, names):
                return [n for n in names if any(fnmatch.fnmatch(n, p) for p in ignore_patterns)]

            shutil.copytree(folder_path, hub / repo_id, ignore=ignored, dirs_exist_ok=True)
            return SimpleNamespace(commit_url=f"local://{repo_id}")

    client = LocalHub()
    if hasattr(trainer_module, "hf_api"):  # transformers >= 5.x: one client
        monkeypatch.setattr(trainer_module, "hf_api", lambda: client)
    else:  # transformers 5.0: the functions
        monkeypatch.setattr(trainer_module, "create_repo", client.create_repo)
        monkeypatch.setattr(trainer_module, "upload_folder", lambda **kwargs: client.upload_folder(**kwargs))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, **kwargs: str(hub / repo_id))
    return hub
