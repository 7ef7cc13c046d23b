"""Prompt prefill for beam search: the prompts' shared prefix computed once, each prompt once rather than per beam.

generate() would run each prompt num_beams times (it expands the batch before its first forward), and every prompt
of a task starts with the same instruction header (``prompts.eval_prompt``). So: the KV cache of the longest common
token prefix of a task's prompts is computed once (``PrefixCache``), copied into the rows of each left-padded batch,
each prompt's remaining tokens but the last run once on top of it, and the cache is repeated per beam; generate()
then runs only the last prompt token. The layout is the one generate() would build itself (left padding, positions
from the attention mask), so the answers are those of the plain loop (tested on several families).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# A shorter shared prefix saves too little to be worth its own forward and a cache copy per batch.
MIN_PREFIX = 8


def cache_kwarg() -> str:
    """forward()/generate()'s name for a KV cache: ``cache`` from transformers 5.2x (``past_key_values`` warns)."""
    from transformers.generation import utils

    return "cache" if "cache" in getattr(utils, "ALL_CACHE_NAMES", ()) else "past_key_values"


def common_prefix(ids: list[list[int]]) -> int:
    """The length of the longest token prefix that every sequence in ``ids`` starts with."""
    first, n = ids[0], min(len(x) for x in ids)
    for seq in ids[1:]:
        n = next((j for j in range(n) if seq[j] != first[j]), n)
    return n


def cache_reuse(model) -> str:
    """How a prompt's KV cache can be reused in this model: "prefix", "beams" or "none".

    "prefix": full-attention key/value layers only, so a cache can be cut at any column and shifted per row (the
    shared prefix, then each prompt once). "beams": sliding-window layers keep only their last window, so a cache
    cannot be cut or shifted, only repeated per beam. "none": a recurrent (Mamba, linear-attention) layer cannot be
    repeated either, and generate() runs the prompt per beam itself. Read from the cache the model builds for itself.
    """
    from transformers.cache_utils import DynamicCache, DynamicLayer

    if model.generation_config.cache_implementation not in (None, "dynamic"):
        return "none"  # a static or quantized cache of generate()'s own
    layers = DynamicCache(config=model.config).layers
    if all(type(layer) is DynamicLayer for layer in layers):
        return "prefix"
    return "beams" if all(hasattr(layer, "batch_repeat_interleave") for layer in layers) else "none"


def _cache_of(out):
    # transformers 5.2x names it ``cache`` (reading ``past_key_values`` logs a deprecation); older 5.x the other way.
    cache = getattr(out, "cache", None) if hasattr(type(out), "cache") or "cache" in out else None
    return cache if cache is not None else out.get("past_key_values")


@dataclass
class PrefixCache:
    """The per-layer keys and values of the prompts' shared first ``length`` tokens (positions 0..length-1)."""

    keys: list[torch.Tensor]  # per layer [1, H, P, d_k]
    values: list[torch.Tensor]  # per layer [1, H, P, d_v]

    @property
    def length(self) -> int:
        return self.keys[0].shape[-2]

    def rows(self, pads: torch.Tensor, width: int):
        """A DynamicCache of the first ``width`` columns of a left-padded batch whose rows start after ``pads``.

        Row b holds ``pads[b]`` padding columns and then the prefix's first ``width - pads[b]`` tokens: right-shifted
        copies, so each prefix token sits in the column its prompt token has. The padding columns are masked out by
        the attention mask; they hold zeros. Every token keeps the position it was computed at (0, 1, ...), the one
        the attention mask gives it (positions count the mask's ones), so rotary keys need no change.
        """
        from transformers.cache_utils import DynamicCache

        src = torch.arange(width, device=pads.device) - pads[:, None]  # [B, W] prefix index of each column
        valid = src >= 0  # [B, W]
        src = src.clamp(min=0)  # [B, W]

        def shifted(t: torch.Tensor) -> torch.Tensor:  # [1, H, P, d] -> [B, H, W, d]
            # .to: with a device map, each layer's cache sits on that layer's device.
            rows = t[0][:, src.to(t.device)].transpose(0, 1)  # [B, H, W, d]
            return rows.masked_fill(~valid.to(t.device)[:, None, :, None], 0)  # [B, H, W, d]

        return DynamicCache(
            ddp_cache_data=[(shifted(k), shifted(v)) for k, v in zip(self.keys, self.values, strict=True)]
        )


def prefix_cache(model, prefix_ids: list[int]) -> PrefixCache | None:
    """The KV cache of ``prefix_ids`` (one row, positions from 0), or None when it is too short to be worth it.

    Only for models whose ``cache_reuse`` is "prefix".
    """
    from transformers.cache_utils import DynamicLayer

    if len(prefix_ids) < MIN_PREFIX:
        return None
    device = model.get_input_embeddings().weight.device
    ids = torch.tensor([prefix_ids], device=device)  # [1, P]
    with torch.inference_mode():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True, logits_to_keep=1)
    cache = _cache_of(out)
    if cache is None or not all(type(layer) is DynamicLayer for layer in cache.layers):  # a cache of its own
        return None
    return PrefixCache([layer.keys for layer in cache.layers], [layer.values for layer in cache.layers])


def prefill(model, batch, num_beams: int, prefix: PrefixCache | None = None):
    """The KV cache of all prompt tokens but the last, each prompt run once and repeated for each beam (or None).

    Only for models whose ``cache_reuse`` is not "none". ``batch`` is left-padded (``input_ids``,
    ``attention_mask`` [B, S]). With ``prefix``, the batch's first columns come from it (``PrefixCache.rows``) and
    only the columns after it run; rows with more padding than others re-run a few prefix tokens there, which costs
    what their padding would. Positions follow the attention mask exactly as generate() derives them; generate()
    then runs only the last prompt token, from this cache.
    """
    ids, mask = batch["input_ids"], batch["attention_mask"]  # [B, S]
    seq = ids.shape[1]
    if seq < 2:
        return None
    # Columns from the prefix: at least one column runs here (a forward needs an input), the last stays for generate().
    width = min(prefix.length, seq - 2) if prefix is not None else 0
    if width < MIN_PREFIX:
        if num_beams == 1:
            return None  # nothing to save: one beam runs each prompt once anyway
        width = 0
    positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)  # [B, S], as generate() derives them
    pads = (mask == 0).sum(-1)  # [B] left padding of each row
    cache = prefix.rows(pads, width) if width else None
    out = model(
        input_ids=ids[:, width:-1], attention_mask=mask[:, :-1], position_ids=positions[:, width:-1],
        **({cache_kwarg(): cache} if cache is not None else {}), use_cache=True, logits_to_keep=1,
    )  # fmt: skip
    cache = _cache_of(out)
    if cache is None:
        return None
    cache.batch_repeat_interleave(num_beams)  # [B * num_beams, ...], the row order of generate()'s expansion
    return cache
