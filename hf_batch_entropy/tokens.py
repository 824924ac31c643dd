r"""Which positions of a batch's token-level activations are real tokens, and of which example.

Batch-entropy is a statistic over the examples of a batch: unit `u` at position `t` varies across the sequences that
have a token there (see `entropy.py`, *Padding*). Token-level activations `(B, T, ...)` reach the estimator in one of
three layouts, and `TokenLayout.views` turns each into `(S, T', ...)` activations of `S` sequences with a mask
`(S, T')` of their real tokens:

- **padded**: `S = B` rows, `attention_mask` `(B, T)` marks the real tokens (left or right padding alike);
- **packed / padding-free** (TRL's `packing=True` or `padding_free=True`, `DataCollatorWithFlattening`): one row
  `(1, N)` that concatenates `S` sequences, with their boundaries in `cu_seq_lens_q` (FlashAttention's cumulative
  lengths), `seq_idx` (the sequence of each token) or `position_ids` (restarting at each sequence), whichever the
  batch has, in that order. The activations are gathered into `(S, T_max, ...)`, each sequence from position 0 as a
  right-padded batch would hold it, so packed and padded batches of the same examples give the same entropies;
- **flattened tokens**: a module that works on `(B·T, ...)` (OPT's feed-forward) is seen as `(B, T, ...)` where the
  batch has a mask;
- **prompt learning** (PEFT prompt tuning, P-tuning): the model prepends `V` virtual tokens, so its activations are
  `(B, V + T, ...)`; the mask is extended with `V` ones in front, as PEFT extends the attention mask. Prefix tuning
  adds no positions (its virtual tokens are keys and values only). Another prompt-learning method whose activations
  do not fit the mask is an error.

Which mask an activation takes is decided by what produced it, never because shapes happen to match: the decoder
activations of an encoder-decoder model (`config.is_encoder_decoder`; `decoder_hidden_states.*`, or hooked modules
inside the module `get_decoder()` returns) take `decoder_attention_mask`, or else `labels != -100` (the decoder inputs
are the labels shifted right); a hooked activation takes the `attention_mask` of the tower of the model whose call
produced it (`capture.towers._Towers`: the `(B·C, T)` mask a multiple-choice model hands its encoder; none for CLIP's vision
tower, whatever the text's mask); hidden states take that of the backbone that returned them; every other activation
takes the batch's `attention_mask`. A multiple-choice mask `(B, C, T)` is `B·C` sequences.

The padding of the gathered layout is left out by selection in the estimator, so whatever those positions hold never
reaches the statistics. Packed layouts are always masked (there is no padding to keep: the sequences are ragged);
`ignore_padding=False` (the paper's code) keeps the padding of padded batches.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ._compat import prompt_learning_config

logger = logging.getLogger(__name__)

__all__ = ["TokenLayout", "packed_boundaries"]

# PEFT prompt-learning methods that prepend their virtual tokens to the input embeddings, and those that add none.
_PREPENDING = ("PROMPT_TUNING", "P_TUNING", "MULTITASK_PROMPT_TUNING")
_NOT_PREPENDING = ("PREFIX_TUNING", "CARTRIDGE")


def packed_boundaries(inputs: dict[str, Any]) -> tuple[torch.Tensor, int] | None:
    """The sequences concatenated in a packed (padding-free) batch: `(cu, T_max)`, with `cu` `(S + 1,)` int64 the
    offsets of the sequences in the flattened tokens (`cu[s]` to `cu[s+1]`) and `T_max` the longest length.

    Read from `cu_seq_lens_q` (with `max_length_q`; no host read), else `seq_idx`, else `position_ids` of a single row
    (a new sequence wherever a position does not follow the previous one). `None` for a batch that is not packed: no
    such key, or `position_ids` of several rows (a padded batch) or of one sequence.
    """
    cu = inputs.get("cu_seq_lens_q")
    if isinstance(cu, torch.Tensor) and cu.dim() == 1 and cu.numel() >= 2:
        cu = cu.long()
        longest = inputs.get("max_length_q")
        longest = int(longest) if isinstance(longest, (int, float)) else int((cu[1:] - cu[:-1]).max())
        return cu, longest
    seq_idx = inputs.get("seq_idx")
    if isinstance(seq_idx, torch.Tensor) and seq_idx.dim() >= 1 and seq_idx.numel() >= 1:
        flat = seq_idx.reshape(-1)
        starts = torch.ones_like(flat, dtype=torch.bool)
        starts[1:] = flat[1:] != flat[:-1]
        return _from_starts(starts)
    positions = inputs.get("position_ids")
    if isinstance(positions, torch.Tensor) and positions.dim() == 2 and positions.shape[0] == 1 and positions.shape[1] > 1:
        flat = positions[0]
        starts = torch.ones_like(flat, dtype=torch.bool)
        starts[1:] = flat[1:] != flat[:-1] + 1
        boundaries = _from_starts(starts)
        return boundaries if boundaries[0].numel() > 2 else None
    return None


def _from_starts(starts: torch.Tensor) -> tuple[torch.Tensor, int]:
    """`(cu, T_max)` from a bool tensor `(N,)` that is True at the first token of each sequence (reads on the host)."""
    offsets = starts.nonzero().flatten().long()
    cu = torch.cat([offsets, offsets.new_tensor([starts.numel()])])
    return cu, int((cu[1:] - cu[:-1]).max())


@dataclass
class _Stream:
    """The real tokens of one stream of a batch (the encoder's or a decoder-only model's; an encoder-decoder's
    decoder): `mask` `(S, T)`; where packed, `index` `(S, T)` the flat positions (into `B·N`) of each sequence's tokens,
    and `source` the `(B, N)` shape of the activations it applies to."""

    mask: torch.Tensor
    index: torch.Tensor | None = None
    source: tuple[int, int] | None = None


class TokenLayout:
    """How a model lays out tokens in its activations, decided once from the model; `views` applies it to a batch.

    Args:
        model: the unwrapped model (a PEFT model included); `None` for a plain decoder-only/encoder layout.
    """

    def __init__(self, model: nn.Module | None = None):
        base = model.get_base_model() if model is not None and hasattr(model, "get_base_model") else model
        config = getattr(base, "config", None)
        self.is_encoder_decoder = bool(getattr(config, "is_encoder_decoder", False))
        self.decoder_modules: tuple[str, ...] = ()
        if self.is_encoder_decoder and hasattr(base, "get_decoder"):
            try:
                decoder = base.get_decoder()
            except (AttributeError, NotImplementedError, TypeError):
                decoder = None
            if isinstance(decoder, nn.Module):
                self.decoder_modules = tuple(name for name, module in model.named_modules() if module is decoder and name)
        prompt = prompt_learning_config(model)
        self.prompt_learning: str | None = prompt[0] if prompt is not None else None
        self.virtual_tokens = prompt[1] if prompt is not None and prompt[0] in _PREPENDING else 0
        self._warned: set[str] = set()

    def in_decoder(self, name: str) -> bool:
        """Whether the activation called `name` (a hidden-state key or a hooked module's name) is an encoder-decoder
        model's decoder activation."""
        if not self.is_encoder_decoder:
            return False
        if name.startswith("decoder_hidden_states."):
            return True
        module = name.split("#")[0]
        return any(module == d or module.startswith(d + ".") for d in self.decoder_modules)

    def _streams(self, inputs: dict[str, Any], ignore_padding: bool) -> tuple[_Stream | None, _Stream | None]:
        """The encoder's (or only) stream and the decoder's, each `None` where there is nothing to mask."""
        packed = None if self.is_encoder_decoder else packed_boundaries(inputs)
        attention = inputs.get("attention_mask")
        if isinstance(attention, torch.Tensor) and attention.dim() == 3:
            attention = attention.reshape(-1, attention.shape[-1])  # multiple choice (B, C, T): B·C sequences
        attention = attention if isinstance(attention, torch.Tensor) and attention.dim() == 2 else None
        if packed is not None:
            reference = next(
                (inputs[k] for k in ("input_ids", "position_ids", "inputs_embeds", "labels")
                 if isinstance(inputs.get(k), torch.Tensor) and inputs[k].dim() >= 2),
                None,
            )
            if reference is not None:
                encoder = _unpacked(*packed, tuple(reference.shape[:2]), attention)
                return encoder, None
        encoder = _Stream(attention.bool()) if ignore_padding and attention is not None else None
        decoder = None
        if self.is_encoder_decoder and ignore_padding:
            mask = inputs.get("decoder_attention_mask")
            labels = inputs.get("labels")
            if not isinstance(mask, torch.Tensor) and isinstance(labels, torch.Tensor) and labels.dim() == 2:
                mask = labels != -100
            if isinstance(mask, torch.Tensor) and mask.dim() == 2:
                decoder = _Stream(mask.bool())
        return encoder, decoder

    def views(
        self,
        inputs: dict[str, Any],
        activations: Sequence[torch.Tensor],
        names: Sequence[str],
        ignore_padding: bool = True,
        sources: Sequence[dict[str, Any] | None] | None = None,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
        """The activations as `S` sequences each, and their masks of real tokens.

        Args:
            inputs: the batch as the model got it (`attention_mask`, `decoder_attention_mask`, `labels`,
                `cu_seq_lens_q`, `seq_idx`, `position_ids`, `input_ids` are read).
            activations: the captured activations, `(B, T, ...)` for token-level ones, any shape for others.
            names: their names (to tell an encoder-decoder's decoder activations, and for messages).
            ignore_padding: leave the padding of padded batches out (`lbe_ignore_padding`); packed batches are always
                unpacked and masked.
            sources: optional, per activation, the keyword inputs of the part of the model that produced it (a
                tower: `capture.towers._Towers`), read instead of `inputs` for its mask; `None` (for all, or for one): `inputs`.
                An encoder-decoder's decoder activations always take the decoder's mask from `inputs`.

        Returns:
            `(views, masks)`: per activation, the tensor to measure (gathered to `(S, T_max, ...)` where packed, else
            the activation itself) and its bool mask `(S, T)`, or `None` where it has none (images, pooled outputs,
            no padding). Differentiable.
        """
        encoder, decoder = self._streams(inputs, ignore_padding)
        own: dict[int, _Stream | None] = {}  # the streams of the sources, each computed once
        views, masks, unfit = [], [], []
        prefixed: dict[int, torch.Tensor] = {}
        for i, (x, name) in enumerate(zip(activations, names)):
            source = sources[i] if sources is not None else None
            if self.in_decoder(name):
                stream = decoder
            elif source is not None:
                if id(source) not in own:
                    own[id(source)] = self._streams(source, ignore_padding)[0]
                stream = own[id(source)]
            else:
                stream = encoder
            view, mask = x, None
            if stream is not None and isinstance(x, torch.Tensor) and x.dim() >= 2:
                x = view = _unflattened(x, stream.source if stream.index is not None else tuple(stream.mask.shape))
                if stream.index is not None:
                    if tuple(x.shape[:2]) == stream.source:
                        view = x.reshape(-1, *x.shape[2:])[stream.index]
                        mask = stream.mask
                    elif x.dim() >= 3 and x.shape[0] == stream.source[0]:
                        unfit.append(name)
                elif tuple(x.shape[:2]) == tuple(stream.mask.shape):
                    mask = stream.mask
                elif x.dim() >= 3 and x.shape[0] == stream.mask.shape[0] and x.shape[1] > stream.mask.shape[1]:
                    mask = self._with_virtual_tokens(stream.mask, x.shape[1], name, prefixed)
                    if mask is None:
                        unfit.append(name)
                elif x.dim() >= 3 and x.shape[0] == stream.mask.shape[0]:
                    unfit.append(name)
            views.append(view)
            masks.append(mask)
        new = [name for name in unfit if name not in self._warned]
        if new:
            self._warned.update(new)
            logger.warning(
                f"The sequence length of {', '.join(new[:8])}{' ...' if len(new) > 8 else ''} is not the batch's: "
                "their batch-entropy takes every position, padding included (said once per layer)."
            )
        return views, masks

    def _with_virtual_tokens(
        self, mask: torch.Tensor, length: int, name: str, cache: dict[int, torch.Tensor]
    ) -> torch.Tensor | None:
        """`mask` `(B, T)` extended in front to `length` positions over a prompt-learning model's virtual tokens;
        `None` where the extra positions are not virtual tokens; an error where the method's layout is unknown."""
        extra = length - mask.shape[1]
        if self.virtual_tokens and extra == self.virtual_tokens:
            if length not in cache:
                ones = torch.ones(mask.shape[0], extra, dtype=mask.dtype, device=mask.device)
                cache[length] = torch.cat([ones, mask], dim=1)
            return cache[length]
        if self.prompt_learning is not None and self.prompt_learning not in _NOT_PREPENDING:
            raise ValueError(
                f"{name} has {length} positions but the batch has {mask.shape[1]} tokens, and the PEFT method "
                f"{self.prompt_learning} adds {extra} positions in a layout LBE does not know, so its padding cannot be "
                "masked. Set lbe_ignore_padding=False to measure every position, or regularize other layers "
                "(lbe_target_modules)."
            )
        return None


def _unflattened(x: torch.Tensor, rows: tuple[int, int]) -> torch.Tensor:
    """`x` `(B·T, ...)` of a module that flattens the tokens (OPT's feed-forward) as `(B, T, ...)`; else `x`."""
    batch, length = rows
    if length > 1 and x.shape[0] == batch * length and (x.dim() == 2 or x.shape[1] != length):
        return x.reshape(batch, length, *x.shape[1:])
    return x


def _unpacked(
    cu: torch.Tensor, longest: int, source: tuple[int, int], attention: torch.Tensor | None
) -> _Stream:
    """The gather index `(S, T_max)` into the `B·N` flat tokens and the mask of real tokens of packed sequences."""
    total = source[0] * source[1]
    cu = cu.to(attention.device if attention is not None else cu.device)
    lengths = cu[1:] - cu[:-1]
    steps = torch.arange(longest, device=cu.device)
    mask = steps.unsqueeze(0) < lengths.unsqueeze(1)
    index = (cu[:-1].unsqueeze(1) + steps.unsqueeze(0)).clamp_max(total - 1).masked_fill(~mask, 0)
    if attention is not None and attention.numel() == total:
        mask = mask & attention.reshape(-1).bool()[index]
    return _Stream(mask=mask, index=index, source=source)
