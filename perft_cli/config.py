"""The typed recipe: declared once, strict (unknown keys are errors naming the dotted key), frozen.

``load_recipe(path, overrides)`` reads YAML, applies ``--set section.key=value`` overrides (values parsed as YAML,
except text keys such as paths, which are taken literally; see ``apply_override``), validates, and resolves local
paths. Every float must be finite (``.inf`` and ``.nan`` are errors naming the key). Defaults are the paper's
reference setup (method.md) unless noted.
"""

from __future__ import annotations

import difflib
import json
import types
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from perft_cli.errors import RecipeError


class _Section(BaseModel):
    # allow_inf_nan=False: inf / nan in any float field (epochs, alpha, weight_decay, ...) is a one-line error.
    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=(), allow_inf_nan=False)


class ModelConfig(_Section):
    name_or_path: str = Field(description="Hub id or local directory of a supported MoE causal LM.")
    quantization: Literal["none", "nf4"] = Field("none", description="nf4: 4-bit NF4 backbone, routed experts too.")
    double_quant: bool = Field(False, description="nf4 only: also quantize the quantization constants.")
    dtype: Literal["bfloat16", "float16", "float32"] = Field("bfloat16", description="Dtype of the frozen base.")
    device_map: str | None = Field(None, description="'auto' spreads one model over all GPUs (model parallel).")
    trust_remote_code: bool = Field(False, description="Run the hub repo's modelling code; off unless you trust it.")
    attn_implementation: str | None = Field(None, description="eager | sdpa | flash_attention_2; None: default.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")


class AdapterConfig(_Section):
    variant: Literal["perft-r", "perft-e", "perft-d", "perft-s", "lora"] = Field(
        "perft-r", description="perft-r routed, perft-e embedded, perft-d dense, perft-s single, lora baseline."
    )
    expert: Literal["lora", "parallel"] = Field("lora", description="Form of each PEFT expert.")
    num_experts: int = Field(4, ge=1, description="N: PEFT experts per MoE layer (perft-r, perft-d).")
    top_k: int = Field(2, ge=1, description="K: PEFT experts per token (perft-r).")
    rank: int = Field(16, ge=1, description="r: bottleneck width of each PEFT expert.")
    alpha: float | None = Field(None, gt=0, description="LoRA scale numerator; None means 2 * rank.")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapter input.")
    target_modules: list[str] | None = Field(
        None, description="lora baseline: module names to adapt; None: the family's q/v projections."
    )
    router_aux_loss_coef: float = Field(0.01, ge=0, description="perft-r: coefficient of its router's balance loss.")
    base_aux_loss_coef: float | None = Field(
        None, ge=0, description="The base router's balance loss; None: the model's own router_aux_loss_coef."
    )
    init: Literal["reference", "zero"] = Field("reference", description="zero: up projections start at exactly 0.")
    renormalize: bool = Field(True, description="perft-r: renormalise the top-K weights to sum to 1.")
    scale_by_base_router: bool = Field(
        False, description="perft-r: reproduce the reference OLMoE code (scale by the base router's weights)."
    )
    impl: Literal["auto", "dense", "grouped"] = Field("auto", description="Adapter compute path; auto measures best.")

    @property
    def lora_alpha(self) -> float:
        """The LoRA scale's numerator in use: ``alpha``, or 2 * rank when unset (the reference scripts)."""
        return float(self.alpha) if self.alpha is not None else 2.0 * self.rank

    @model_validator(mode="after")
    def _check(self) -> AdapterConfig:
        if self.variant == "perft-r" and self.top_k > self.num_experts:
            raise ValueError(f"adapter.top_k={self.top_k} is larger than adapter.num_experts={self.num_experts}")
        return self


class DataConfig(_Section):
    train: str | None = Field(None, description="LLM-Adapters JSON, JSON Lines, or a hub dataset id.")
    format: Literal["auto", "json", "jsonl", "hub"] = Field("auto", description="auto: by file suffix / hub id.")
    split: str = Field("train", description="Hub dataset split.")
    fields: dict[str, str] | None = Field(
        None, description="Map of instruction/input/output/answer to the dataset's column names."
    )
    cutoff_len: int = Field(256, ge=8, description="Maximum tokens per example.")
    val_size: int = Field(120, ge=0, description="Examples held out for the eval loss (fixed seed).")
    val_seed: int = Field(42, description="Seed of the held-out split.")
    train_on_inputs: bool = Field(True, description="Loss on the whole sequence (reference) or the response only.")

    @model_validator(mode="after")
    def _check_fields(self) -> DataConfig:
        names = ("instruction", "input", "output", "answer")
        for key in self.fields or {}:
            if key not in names:  # a misspelled name would silently leave the default column in use
                raise ValueError(f"data.fields has no key {key!r}{_suggest(key, names)}; its keys are {list(names)}")
        return self

    add_eos: bool = Field(True, description="Append EOS when it fits in cutoff_len.")
    group_by_length: bool = Field(False, description="Batch examples of similar length together.")


class TrainConfig(_Section):
    lr: float = Field(
        1e-5, gt=0, allow_inf_nan=False, description="Peak learning rate (OLMoE 1e-5, Mixtral 2e-5 in the paper)."
    )
    epochs: float = Field(3, gt=0, description="Passes over the training data (unless max_steps is set).")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps.")
    batch_size: int = Field(16, ge=1, description="Examples per optimizer step, over all processes.")
    micro_batch_size: int = Field(16, ge=1, description="Examples per forward pass per process.")
    warmup_steps: int = Field(100, ge=0, description="Linear warmup steps, then linear decay to 0.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Gradient clipping; None turns it off.")
    eval_every: int = Field(80, ge=1, description="Eval loss on the held-out split every N steps.")
    save_every: int = Field(80, ge=1, description="Checkpoint every N steps.")
    log_every: int = Field(1, ge=1, description="Write metrics.jsonl every N steps.")
    seed: int = Field(42, description="Seed for adapter init, data order and dropout.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward to save memory.")
    sharding: Literal["none", "fsdp"] = Field(
        "none", description="none: one process or DDP replicas; fsdp: the frozen base sharded across ranks (FSDP2)."
    )
    report_to: list[Literal["tensorboard", "wandb"]] = Field([], description="Extra trackers through Accelerate.")
    collapse_share: float = Field(
        0.9, gt=0, le=1, description="Warn when one PERFT-R expert is chosen by this share of a layer's tokens."
    )

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.batch_size % self.micro_batch_size:
            raise ValueError(
                f"train.batch_size={self.batch_size} is not a multiple of "
                f"train.micro_batch_size={self.micro_batch_size}"
            )
        return self


class EvalConfig(_Section):
    tasks: list[str] = Field([], description="Task names (method.md); empty: all tasks of data.train's kind.")
    data_dir: str | None = Field(None, description="Folder with <task>/test.json files (LLM-Adapters layout).")
    batch_size: int | None = Field(
        None, ge=1, description="Prompts per generation batch; None: as many as eval.batch_tokens holds (lm-eval: 8)."
    )
    # 32768 tokens of OLMoE-1B-7B's KV cache (16 layers x K,V x 2048 x bf16 = 128 KiB a token) are 4 GiB, twice
    # that while beam search reorders it: ~80 commonsense prompts a batch (~100 tokens + 4 new), ~20 arithmetic.
    batch_tokens: int = Field(
        32768, ge=1, description="Token budget of a generation batch: prompts x beams x (longest prompt + new tokens)."
    )
    num_beams: int = Field(4, ge=1, description="Beam search width (paper: 4).")
    max_new_tokens: int | None = Field(None, ge=1, description="None: 4 for commonsense, 256 for arithmetic.")
    limit: int | None = Field(None, ge=1, description="Evaluate only the first N examples per task.")


class Recipe(_Section):
    model: ModelConfig
    adapter: AdapterConfig = AdapterConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    output_dir: str | None = Field(None, description="Run directory; None: runs/<recipe file name>.")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


SECTIONS: dict[str, type[_Section]] = {
    "model": ModelConfig,
    "adapter": AdapterConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "eval": EvalConfig,
}


MAX_RECIPE_BYTES = 1 << 20  # 1 MiB: the shipped recipes are 1-3 KiB


def _suggest(word: str, options) -> str:
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _unknown_key(section: str, key: str, fields, where: str) -> RecipeError:
    """An unknown section key: the close match if there is one, else every key the section has."""
    hint = _suggest(key, fields) or f"; the keys of {section!r} are {', '.join(sorted(fields))}"
    return RecipeError(f"{where}: unknown key '{section}.{key}'{hint}")


def _show_key(key: Any) -> str:
    """A recipe key as the user wrote it: 'name' for text, YAML spelling (1, null, true) for anything else."""
    if isinstance(key, str):
        return repr(key)
    try:
        return json.dumps(key)
    except (TypeError, ValueError):
        return str(key)


def _check_keys(raw: dict[str, Any], where: str) -> None:
    top = set(SECTIONS) | {"output_dir"}
    for key, value in raw.items():
        if not isinstance(key, str):
            raise RecipeError(f"{where}: unknown key {_show_key(key)} (not a name); sections are {sorted(top)}")
        if key not in top:
            raise RecipeError(f"{where}: unknown key {key!r}{_suggest(key, top)}; sections are {sorted(top)}")
        if key in SECTIONS:
            if value is None:
                continue
            if not isinstance(value, dict):
                raise RecipeError(f"{where}: {key!r} must be a mapping of keys, got {type(value).__name__}")
            fields = SECTIONS[key].model_fields
            for sub in value:
                if not isinstance(sub, str):
                    raise RecipeError(
                        f"{where}: unknown key {_show_key(sub)} in section {key!r} (not a name); "
                        f"its keys are {sorted(fields)}"
                    )
                if sub not in fields:
                    raise _unknown_key(key, sub, fields, where)


def _is_text(annotation: Any) -> bool:
    """str or str | None: paths, names, ids. --set takes their values literally (no YAML parsing)."""
    if annotation is str:
        return True
    if get_origin(annotation) in (Union, types.UnionType):
        return set(get_args(annotation)) == {str, type(None)}
    return False


_NULLS = ("null", "Null", "NULL", "~")


def _literal_text(key: str, text: str) -> str | None:
    """The value of a text key given with --set: the text itself (stripped); null or ~ means none."""
    text = text.strip()
    if not text:
        raise RecipeError(f"--set {key}: empty value; give {key}=VALUE (or {key}=null for none)")
    return None if text in _NULLS else text


def apply_override(raw: dict[str, Any], assignment: str) -> str:
    """Apply one ``section.key=value`` (or ``output_dir=value``) override.

    Text keys (type str or str | None: ``output_dir``, ``data.train``, ``model.name_or_path``, ``model.revision``,
    ...) take the value literally, so ``output_dir=run #2``, ``output_dir=2024`` or ``data.split=yes`` mean that very
    text; ``null`` (or ``~``) means none. Every other key's value is parsed as YAML (``4``, ``true``, ``[a, b]``,
    ``{instruction: question}``); a value YAML cannot parse is a one-line error. Returns the dotted key set.
    """
    if "=" not in assignment:
        raise RecipeError(f"--set {assignment!r}: expected KEY=VALUE, e.g. --set adapter.top_k=4")
    key, _, text = assignment.partition("=")
    key = key.strip()
    parts = key.split(".")
    if parts == ["output_dir"]:
        raw["output_dir"] = _literal_text(key, text)
        return key
    if len(parts) != 2 or parts[0] not in SECTIONS:
        raise RecipeError(f"--set {key!r}: expected SECTION.KEY with a section of {sorted(SECTIONS)}")
    section, field = parts
    fields = SECTIONS[section].model_fields
    if field not in fields:
        raise _unknown_key(section, field, fields, "--set")
    if _is_text(fields[field].annotation):
        value = _literal_text(key, text)
    else:
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as e:
            problem = getattr(e, "problem", None) or type(e).__name__
            raise RecipeError(f"--set {key}: value {text!r} is not valid YAML ({problem})") from None
    if not isinstance(raw.get(section), dict):
        raw[section] = {}
    raw[section][field] = value
    return key


def _format_validation(e: ValidationError, where: str, overridden: dict[str, str] | None = None) -> str:
    """One line for pydantic's first error; a value that came from ``--set`` is named by its ``--set``."""
    err = e.errors()[0]
    loc = ".".join(str(x) for x in err["loc"])
    msg = err["msg"].removeprefix("Value error, ")
    got = f" (got {err['input']!r})" if "input" in err and not isinstance(err["input"], dict) else ""
    dotted = ".".join(str(x) for x in err["loc"][:2])
    if overridden and dotted in overridden:
        return f"{overridden[dotted]}: {loc}: {msg}{got}"
    return f"{where}: {loc + ': ' if loc else ''}{msg}{got}"


def _resolve_path(value: str | None, base: Path) -> str | None:
    """A relative local path is taken relative to the recipe file when it exists there, else as given."""
    if not value:
        return value
    p = Path(value).expanduser()
    if p.is_absolute():
        return str(p)
    if (base / p).exists():
        return str((base / p).resolve())
    if p.exists():
        return str(p.resolve())
    return value  # a hub id, or a path that does not exist (the loader names it)


def recipe_from_dict(
    raw: dict[str, Any], where: str = "recipe", base: Path | None = None, overridden: dict[str, str] | None = None
) -> Recipe:
    """Validate a recipe dict; ``overridden`` maps dotted keys set by ``--set`` to that ``--set`` (for errors)."""
    if not isinstance(raw, dict):
        raise RecipeError(f"{where}: the recipe must be a YAML mapping with sections {sorted(SECTIONS)}")
    _check_keys(raw, where)
    if "model" not in raw or not raw["model"]:
        raise RecipeError(f"{where}: missing section 'model' (at least model.name_or_path)")
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as e:
        raise RecipeError(_format_validation(e, where, overridden)) from None
    if base is None:
        return recipe
    return recipe.model_copy(
        update={
            "model": recipe.model.model_copy(update={"name_or_path": _resolve_path(recipe.model.name_or_path, base)}),
            "data": recipe.data.model_copy(update={"train": _resolve_path(recipe.data.train, base)}),
            "eval": recipe.eval.model_copy(update={"data_dir": _resolve_path(recipe.eval.data_dir, base)}),
        }
    )


class _NoDuplicateKeys(yaml.SafeLoader):
    """safe_load that refuses a key written twice in one mapping (plain YAML keeps the last one without a word)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, str | int | float | bool) or key is None:
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"the key {key!r} is written twice in one mapping", key_node.start_mark
                    )
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


# Keys that only some variants (or settings) read: (section, key, who reads it, does this recipe read it?).
_SCOPED = (
    ("adapter", "num_experts", "perft-r and perft-d", lambda r: r.adapter.variant in ("perft-r", "perft-d")),
    ("adapter", "top_k", "perft-r", lambda r: r.adapter.variant == "perft-r"),
    ("adapter", "router_aux_loss_coef", "perft-r", lambda r: r.adapter.variant == "perft-r"),
    ("adapter", "renormalize", "perft-r", lambda r: r.adapter.variant == "perft-r"),
    ("adapter", "scale_by_base_router", "perft-r", lambda r: r.adapter.variant == "perft-r"),
    ("adapter", "expert", "the PERFT variants", lambda r: r.adapter.variant != "lora"),
    ("adapter", "impl", "the PERFT variants", lambda r: r.adapter.variant != "lora"),
    ("adapter", "target_modules", "the lora variant", lambda r: r.adapter.variant == "lora"),
    ("model", "double_quant", "quantization: nf4", lambda r: r.model.quantization == "nf4"),
)


def ignored_keys(recipe: Recipe) -> list[str]:
    """Keys set to a non-default value that this recipe's variant or settings never read, each with who reads it."""
    found = []
    for section, key, reader, reads in _SCOPED:
        cfg = getattr(recipe, section)
        if getattr(cfg, key) != type(cfg).model_fields[key].default and not reads(recipe):
            found.append(f"{section}.{key} (only {reader} read it)")
    return found


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override, validate and resolve a recipe file. Every problem is a one-line RecipeError."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file {str(path)!r} not found; pass the path of a YAML recipe (see recipes/)")
    size = path.stat().st_size
    if size > MAX_RECIPE_BYTES:  # YAML parses ~50 KB/s: a 10 MB file kept the parser busy for minutes
        raise RecipeError(
            f"recipe {path} is {size / 2**20:.1f} MiB; a recipe is a few KiB of settings (at most "
            f"{MAX_RECIPE_BYTES // 2**20} MiB): is this the right file? Training data goes in data.train"
        )
    try:
        raw = yaml.load(path.read_text(), Loader=_NoDuplicateKeys)  # a SafeLoader subclass: safe_load + no dup keys
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]  # ReaderError: no .problem, 2 lines
        raise RecipeError(f"recipe {path}: not valid YAML{at}: {problem}") from None
    except UnicodeDecodeError:
        raise RecipeError(f"recipe {path}: not a text file") from None
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise RecipeError(f"recipe {path}: the recipe must be a YAML mapping with sections {sorted(SECTIONS)}")
    overridden = {}
    for assignment in overrides or []:
        overridden[apply_override(raw, assignment)] = f"--set {assignment.strip()}"
    recipe = recipe_from_dict(raw, f"recipe {path}", base=path.resolve().parent, overridden=overridden)
    if recipe.output_dir is None:
        recipe = recipe.model_copy(update={"output_dir": str(Path("runs") / path.stem)})
    return recipe
