"""What the diagnosis feeds a model: scikit-learn's digits for image models, fixed English sentences for text models,
random token ids for text models without a tokenizer."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["SENTENCES", "digits_batches", "random_token_batches", "text_batches"]

# Fixed sentences for text models: long enough to fill `text_max_length` tokens without padding, varied in content.
SENTENCES = (
    "The quick brown fox jumps over the lazy dog while the farmer watches from the old wooden porch.",
    "Deep networks without skip connections are hard to train because information vanishes with depth.",
    "She bought three apples, two pears and a loaf of fresh bread at the market on Saturday morning.",
    "The committee postponed its decision on the new budget until the auditors finish their report.",
    "Rain is expected across the northern regions tonight, with strong winds along the coast tomorrow.",
    "He learned to play the violin as a child and still practices for an hour every single evening.",
    "The spacecraft entered orbit around the distant moon after a journey that lasted seven long years.",
    "Batch entropy measures how much the activations of a layer vary across the examples of a batch.",
    "Our small team shipped the release on time, although two of the tests were flaky all week long.",
    "The museum reopened its ancient history wing with a collection of coins, pottery and old maps.",
    "A warm cup of tea and a good book make a quiet winter afternoon feel surprisingly short to me.",
    "The river flooded the valley in spring, and the villagers rebuilt the bridge with stone and oak.",
    "Researchers found that the new vaccine was safe and effective in a trial with ten thousand people.",
    "Please remember to lock the door, switch off the lights and feed the cat before you leave today.",
    "The orchestra played the symphony so softly that the audience could hear the rain on the roof.",
    "Stock markets fell sharply on Monday after the central bank announced an unexpected rate rise.",
)


def digits_batches(
    num_batches: int = 4,
    batch_size: int = 64,
    num_channels: int = 1,
    image_size: int = 8,
    seed: int = 0,
) -> list[dict[str, torch.Tensor]]:
    """Batches of scikit-learn's bundled 8×8 digits (no download), standardized, resized to `image_size` (bilinear)
    and repeated over `num_channels`: `[{"pixel_values": (B, C, S, S)}, ...]`. Any image model can take them."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise ImportError(
            "Diagnosing an image model feeds it scikit-learn's bundled digits: `pip install scikit-learn` "
            "(or, in a clone of hf-batch-entropy, `pip install '.[vanilla]'`)."
        ) from err

    x, _ = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32).view(-1, 1, 8, 8)
    x = (x - x.mean()) / x.std()
    gen = torch.Generator().manual_seed(seed)
    needed = num_batches * batch_size
    if needed > len(x):
        raise ValueError(f"digits has {len(x)} images; asked for {num_batches}×{batch_size}.")
    x = x[torch.randperm(len(x), generator=gen)[:needed]]
    if image_size != 8:
        x = nn.functional.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    x = x.expand(-1, num_channels, -1, -1).contiguous()
    return [{"pixel_values": b} for b in x.split(batch_size)]


def text_batches(tokenizer, num_batches: int = 1, batch_size: int = 16, max_length: int = 16) -> list[dict[str, Any]]:
    """Fixed English sentences through `tokenizer`, truncated/padded to `max_length` tokens (the sentences are long
    enough that no padding is needed)."""
    if batch_size < 2:
        raise ValueError("Batch-entropy needs at least 2 examples per batch.")
    sentences = [SENTENCES[i % len(SENTENCES)] for i in range(num_batches * batch_size)]
    if getattr(tokenizer, "pad_token", None) is None and getattr(tokenizer, "eos_token", None) is not None:
        tokenizer.pad_token = tokenizer.eos_token  # decoder-only tokenizers (GPT-2, Llama) have no pad token
    batches = []
    for start in range(0, len(sentences), batch_size):
        enc = tokenizer(
            sentences[start : start + batch_size],
            padding="max_length",
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        batches.append(dict(enc))
    return batches


def random_token_batches(
    vocab_size: int, num_batches: int = 4, batch_size: int = 64, length: int = 16, seed: int = 0
) -> list[dict[str, torch.Tensor]]:
    """Uniformly random token ids in `[0, vocab_size)`, `length` per row, no padding: `[{"input_ids", "attention_mask"},
    ...]`. For a text model without a tokenizer: random tokens, like real ones, make the embeddings differ across the
    batch, and the diagnosis asks whether that variation survives the layers."""
    if batch_size < 2:
        raise ValueError("Batch-entropy needs at least 2 examples per batch.")
    gen = torch.Generator().manual_seed(seed)
    return [
        {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        for ids in (torch.randint(0, vocab_size, (batch_size, length), generator=gen) for _ in range(num_batches))
    ]
