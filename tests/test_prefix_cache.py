"""perft eval's generation: the prompts' shared prefix cached once, batches sized by a token budget.

The answers must stay the plain loop's (one prompt at a time through plain generate(), the LLM-Adapters loop) on
every family: through the shared prefix where the family's cache can be cut and shifted, through the older paths
where it cannot (sliding-window and recurrent layers).
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_checkpoint

from perft_cli.prompts import I, eval_prompt

QUESTIONS = [
    "2+2?",
    "Is ice cold?",
    "A much longer question about " + "apples and pears " * 12,  # pads "x" by more than the shared prefix
    "x",
    "Why?",
    "the cup sits on the red ball in the garden",
]
PROMPTS = [eval_prompt(q, "", commonsense=i % 2 == 0) for i, q in enumerate(QUESTIONS)]
DECODING = dict(num_beams=4, max_new_tokens=6)


def _spy(monkeypatch) -> list[bool]:
    """Record, for each batch prefilled, whether the shared prefix's cache was used."""
    from perft_cli.evaluation import prefill as module

    used: list[bool] = []
    real = module.prefill

    def prefill(model, batch, num_beams, prefix=None):
        used.append(prefix is not None)
        return real(model, batch, num_beams, prefix)

    monkeypatch.setattr(module, "prefill", prefill)
    return used


def _answers(model, tok, monkeypatch) -> dict[str, list[str]]:
    from perft_cli.evaluation.generation import generate_responses

    plain = generate_responses(model, tok, PROMPTS, batch_size=1, shared_prefill=False, **DECODING)
    no_prefix = generate_responses(model, tok, PROMPTS, batch_size=3, shared_prefix=False, **DECODING)
    used = _spy(monkeypatch)
    budget = generate_responses(model, tok, PROMPTS, batch_tokens=4800, **DECODING)  # batches of 2 and 4
    return dict(plain=plain, no_prefix=no_prefix, budget=budget, used=used)


def test_common_prefix_is_found_from_the_token_ids(tiny_model_dir):
    from perft_cli.config import ModelConfig
    from perft_cli.evaluation.prefill import common_prefix
    from perft_cli.modeling import load_tokenizer

    assert common_prefix([[1, 2, 3], [1, 2, 4], [1, 2]]) == 2
    assert common_prefix([[1, 2], [1, 2]]) == 2
    assert common_prefix([[7, 2], [1, 2]]) == 0
    tok = load_tokenizer(ModelConfig(name_or_path=str(tiny_model_dir("olmoe"))))
    ids = tok(PROMPTS)["input_ids"]
    n = common_prefix(ids)
    # Both templates (commonsense and arithmetic) share the header up to the instruction, and nothing after it.
    assert tok.decode(ids[0][:n], skip_special_tokens=True).endswith(f"### Instruction:\n{I}")
    assert len({tuple(x[: n + 1]) for x in ids}) > 1


def test_batches_fill_the_token_budget_longest_first():
    from perft_cli.evaluation.generation import batches

    lengths = [10, 30, 20, 30, 5]
    # A batch costs prompts x beams x (its longest prompt + new tokens): 2 x 2 x 32 = 128, then 2 x 2 x 22 = 88.
    by_budget = batches(lengths, batch_size=None, batch_tokens=128, new_tokens=2, num_beams=2)
    assert by_budget == [[1, 3], [2, 0], [4]]
    assert batches([100, 1], batch_size=None, batch_tokens=10, new_tokens=2, num_beams=2) == [[0], [1]]  # one a batch
    assert batches(lengths, batch_size=3, batch_tokens=128, new_tokens=2, num_beams=2) == [[1, 3, 2], [0, 4]]
    with pytest.raises(ValueError, match="batch_size or batch_tokens"):
        batches(lengths, batch_size=None, batch_tokens=None, new_tokens=2, num_beams=2)


def _assert_same_caches(model, tok) -> None:
    """Every row's keys and values: the same whether the prefix is copied in or computed with the prompt."""
    from perft_cli.evaluation.prefill import common_prefix, prefill, prefix_cache

    tok.padding_side = "left"
    # Padding longer than the shared prefix (the long prompt with the short ones), and shorter (similar lengths).
    for group in (PROMPTS[1:4], [PROMPTS[i] for i in (0, 1, 3, 5)]):
        ids = tok(group)["input_ids"]
        prefix = prefix_cache(model, ids[0][: common_prefix(ids)])
        assert prefix is not None and prefix.length == common_prefix(ids)
        batch = tok.pad({"input_ids": ids}, return_tensors="pt").to(model.device)  # [B, S]
        shared, full = prefill(model, batch, 2, prefix), prefill(model, batch, 2, None)
        real = batch["attention_mask"][:, :-1].bool().repeat_interleave(2, dim=0)  # [B * 2, S - 1], no padding
        assert shared.get_seq_length() == full.get_seq_length() == batch["input_ids"].shape[1] - 1
        for a, b in zip(shared.layers, full.layers, strict=True):
            for x, y in ((a.keys, b.keys), (a.values, b.values)):  # [B * 2, H, S - 1, d]
                torch.testing.assert_close(x.transpose(1, 2)[real], y.transpose(1, 2)[real], atol=1e-5, rtol=1e-4)
    pads = (batch["attention_mask"] == 0).sum(-1)  # [B] of the second group
    assert 0 < pads.max() < prefix.length


@pytest.mark.parametrize("family", ["olmoe", "mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3", "gpt_oss"])
def test_the_shared_prefix_gives_the_plain_loops_caches_and_answers(family, tiny_model_dir, tmp_path, monkeypatch):
    from perft_cli.evaluation.prefill import cache_reuse
    from perft_cli.modeling import load_trained

    model, tok, *_ = load_trained(make_checkpoint(tmp_path / "ckpt", tiny_model_dir(family)))  # PERFT-R attached
    assert cache_reuse(model) == "prefix"
    with torch.inference_mode():
        _assert_same_caches(model, tok)
        got = _answers(model, tok, monkeypatch)
    assert got["used"] == [True, True]  # two batches under the budget, both from the shared prefix
    assert got["budget"] == got["plain"]
    assert got["no_prefix"] == got["plain"]


@pytest.mark.parametrize(
    "family, overrides, reuse",
    [
        ("gpt_oss", dict(layer_types=["sliding_attention", "full_attention"], sliding_window=16), "beams"),
        ("mixtral", dict(sliding_window=16), "beams"),
        ("qwen3_next", {}, "none"),  # linear-attention layers: generate() runs the prompt per beam itself
    ],
)
def test_caches_that_cannot_be_shifted_fall_back(family, overrides, reuse, tmp_path, monkeypatch):
    from perft_cli.config import ModelConfig
    from perft_cli.evaluation.prefill import cache_reuse
    from perft_cli.modeling import load_model, load_tokenizer
    from perft_cli.tiny import save_tiny

    cfg = ModelConfig(name_or_path=str(save_tiny(tmp_path, family, seed=0, **overrides)), dtype="float32")
    model, _ = load_model(cfg)
    tok = load_tokenizer(cfg)
    assert cache_reuse(model) == reuse
    with torch.inference_mode():
        got = _answers(model, tok, monkeypatch)
    assert got["used"] == ([False, False] if reuse == "beams" else [])  # each prompt once per beam, or as before
    assert got["budget"] == got["plain"]
    assert got["no_prefix"] == got["plain"]
