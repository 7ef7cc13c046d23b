"""How every merge checks itself: fixed sample prompts, their float32 logits, and the comparison of the written output
with the unmerged model within ``RTOL[dtype]`` times the largest absolute logit."""

from __future__ import annotations

from typing import Any

import torch

# Tolerance on max |logit difference| to the unmerged model, relative to max |logit| over the sample positions.
# float32: only the order of a sum changes (W x + s B A x vs (W + s B A) x); measured <= 1e-6 relative on tiny models
# of every family. bf16 / fp16: the folded weight is stored rounded, and a rounding-sized change can flip a near-tie
# in a router's top-k, which moves that token's logits a lot: measured up to 0.22 relative in bf16 (gpt-oss, tiny
# random model with near-uniform routers), as large as the unmerged model's own bf16-vs-fp32 difference (0.42). So
# in half precision this check only catches gross errors; two exact checks back it: every folded weight against the
# float32 W + s*B@A (fold_lora), and the reloaded output against the folded model in memory (float32 tolerance).
# A PERFT export copies weights unchanged and is held to the float32 tolerance in every dtype (0 measured).
RTOL = {"float32": 1e-4, "float16": 0.25, "bfloat16": 0.5}
SAMPLE_PROMPTS = (
    "Please answer the following question with true or false. Question: is the sky blue on a clear day?",
    "Natalia sold clips to 48 of her friends in April, and then half as many in May. How many clips in all?",
    "The quick brown fox jumps over the lazy dog. 0123456789 !?",
)
SAMPLE_TOKENS = 96  # per prompt: enough to pass every layer's routing through many experts, cheap on a CPU


def sample_texts() -> list[str]:
    """The fixed sample prompts as the model sees them (the evaluation templates of method.md)."""
    from perft_cli.prompts import eval_prompt

    return [eval_prompt(SAMPLE_PROMPTS[0], commonsense=True), eval_prompt(SAMPLE_PROMPTS[1]), SAMPLE_PROMPTS[2]]


def sample_inputs(tokenizer: Any) -> dict[str, torch.Tensor]:
    return tokenizer(sample_texts(), return_tensors="pt", padding=True, truncation=True, max_length=SAMPLE_TOKENS)


@torch.no_grad()
def sample_logits(model: Any, tokenizer: Any) -> torch.Tensor:
    """float32 logits of the fixed sample prompts at their real (non-padding) positions: [P, V]."""
    batch = sample_inputs(tokenizer)
    device = model.get_input_embeddings().weight.device
    logits = model(**{k: v.to(device) for k, v in batch.items()}, use_cache=False).logits  # [B, S, V]
    return logits.float()[batch["attention_mask"].bool().to(device)].cpu()  # [P, V]


def verify(
    reference: torch.Tensor, got: torch.Tensor, in_memory: torch.Tensor | None, dtype: str, folded: bool
) -> dict[str, Any]:
    """Compare the output's logits with the unmerged model's (and, after a fold, with the folded model in memory)."""
    scale = float(reference.abs().max().clamp_min(1e-6))
    if got.shape != reference.shape:
        return {"passed": False, "failure": f"the output gives logits of shape {tuple(got.shape)}"}
    diff = (got - reference).abs()  # [P, V]
    # An export copies weights unchanged: it must match as tightly as float32 in any dtype (0 measured).
    rtol = RTOL[dtype] if folded else RTOL["float32"]
    result = {
        "prompts": len(SAMPLE_PROMPTS),
        "positions": int(reference.shape[0]),
        "max_abs_logit_diff": float(diff.max()),
        "mean_abs_logit_diff": float(diff.mean()),
        "max_abs_logit": scale,
        "rtol": rtol,
        "tolerance": rtol * scale,
        "roundtrip_max_abs_diff": None,
    }
    failure = None
    if not result["max_abs_logit_diff"] <= result["tolerance"]:
        failure = (
            f"max |logit difference| {result['max_abs_logit_diff']:.3g} to the unmerged model exceeds the "
            f"tolerance {result['tolerance']:.3g} ({dtype})"
        )
    if in_memory is not None:
        # Save and reload must not change anything: exact up to float32 summation order.
        result["roundtrip_max_abs_diff"] = float((got - in_memory).abs().max())
        if not result["roundtrip_max_abs_diff"] <= RTOL["float32"] * scale:
            failure = (
                failure or f"the saved model differs from the folded one by {result['roundtrip_max_abs_diff']:.3g}"
            )
    result["passed"], result["failure"] = failure is None, failure
    return result
