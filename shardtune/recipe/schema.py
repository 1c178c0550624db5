"""Recipes: YAML files validated by pydantic, with ``--set a.b=value`` overrides.

A recipe has seven sections — ``model``, ``adapter``, ``data``, ``train``, ``eval``, ``output``,
``logging`` — each a pydantic model below; ``adapter`` is the options model of the chosen method
(one per file in ``shardtune/adapters/``), picked by ``adapter.method``. Unknown keys are errors. Every problem is
reported as one line that names the key path, e.g. ``adapter.rank: must be a positive integer, got -3``.
"""

from __future__ import annotations

import datetime
import difflib
import errno
import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PositiveInt,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from shardtune.adapters import METHODS
from shardtune.adapters.base import SEED_MAX, SEED_MIN, dtype_synonyms
from shardtune.core.errors import BadInput, RecipeError
from shardtune.core.limits import MAX_GENERATED, MAX_NEW_TOKENS, MAX_STEPS
from shardtune.recipe.shipped import is_bare_name, recipe_path


class Section(BaseModel):
    # strict: `rank: true` or `lr: "2e-4"` are mistakes, not 1 and 0.0002; numbers must be finite.
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class ModelSection(Section):
    name: str = Field(
        ...,
        description=(
            "Base model: a builtin alias (`shardtune models` lists them, e.g. `tiny-llama`), a local "
            "Hugging Face model directory, or a hub id (`org/name`: downloaded on first use into the Hugging "
            "Face cache, then read from there; HF_TOKEN for private or gated models; offline with "
            "HF_HUB_OFFLINE=1 or --offline)."
        ),
    )
    dtype: Annotated[Literal["fp32", "bf16", "fp16"], BeforeValidator(dtype_synonyms)] = Field(
        "fp32",
        description="dtype the frozen base weights are loaded in (float32, bfloat16, float16 also read).",
    )
    trust_remote_code: bool = Field(
        False, description="Allow model code from the model directory. Off unless set."
    )
    revision: str | None = Field(
        None,
        description="Hub revision of a hub id: a branch, tag or commit (unset: main). Runs record the commit.",
    )
    quantize: Literal["nf4", "fp4", "int8"] | None = Field(
        None,
        description="Load the frozen base quantized by bitsandbytes (QLoRA-style): `nf4` (4-bit NormalFloat, "
        "QLoRA's), `fp4` or `int8` (LLM.int8()); every linear layer but the output head. The adapter keeps "
        "`adapter.dtype`. Needs `pip install shardtune[quant]`; see docs/quantization.md.",
    )
    double_quant: bool = Field(
        True,
        description="nf4/fp4: quantize the per-block scales too (QLoRA's double quantization, ~0.37 bit per "
        "weight less).",
    )
    compute_dtype: Annotated[Literal["auto", "fp32", "bf16", "fp16"], BeforeValidator(dtype_synonyms)] = (
        Field(
            "auto",
            description="nf4/fp4: the dtype a quantized layer dequantizes into and multiplies in; `auto`: `dtype` "
            "(float32, bfloat16, float16 also read).",
        )
    )

    @field_validator("revision")
    @classmethod
    def _revision_of_hub_ids_only(cls, value, info):
        from shardtune.models import hub

        name = info.data.get("name")
        if value is not None and isinstance(name, str) and not hub.is_hub_id(name):
            what = "a builtin alias" if hub.is_builtin(name) else "a local directory"
            raise ValueError(f"applies to hub ids only; model.name {name!r} is {what}")
        return value

    @field_validator("double_quant", "compute_dtype")
    @classmethod
    def _four_bit_options_need_four_bits(cls, value, info):
        # (a resolved recipe spells out the defaults: only values that differ from them count)
        default = cls.model_fields[info.field_name].default
        if value != default and info.data.get("quantize") not in ("nf4", "fp4"):
            quantize = info.data.get("quantize") or "unset"
            raise ValueError(f"applies to model.quantize nf4 or fp4 only (quantize is {quantize})")
        return value


AdapterSection = Annotated[
    Union[tuple(m.Options for m in METHODS.values())],  # noqa: UP007 - built from the registry
    Field(discriminator="method"),
]


MAX_LENGTH_LIMIT = 1 << 20  # tokens: beyond any model's context
TIMEOUT_LIMIT_S = (
    30 * 24 * 3600
)  # train.timeout_s: 30 days (Python's timedelta and C timeouts overflow far above)


class SourceSection(Section):
    """One source of a mixture (``data.sources``): where its examples come from, how they are read,
    how many it holds out, and how much of the mixture it is."""

    task: str | None = Field(None, description="A builtin generated task (`shardtune tasks`).")
    path: str | None = Field(None, description="A local data file or `save_to_disk` directory.")
    hub: str | None = Field(None, description="A hub dataset id (`org/name`).")
    revision: str | None = Field(None, description="Hub revision of `hub`.")
    split: str = Field("train", description="Split to train on (hub datasets, save_to_disk directories).")
    eval_split: str | None = Field(
        None, description="Held-out examples from a split or a second file (as `data.eval_split`)."
    )
    format: Literal["auto", "text", "prompt_completion", "alpaca", "messages", "sharegpt"] = Field(
        "auto", description="As `data.format`, for this source."
    )
    text_field: str = Field("text", description="Field holding the text for `format: text`.")
    eval_samples: int | None = Field(
        None,
        ge=0,
        le=MAX_GENERATED,
        description="Held out from this source (as `data.eval_samples`; unset: 64 generated for a task, a "
        "fifth of a file, at most 64).",
    )
    weight: float | None = Field(
        None,
        gt=0,
        description="This source's share of the mixture, relative to the other weighted sources: the "
        "mixture is the largest that uses no example twice.",
    )
    num_samples: PositiveInt | None = Field(
        None,
        le=MAX_GENERATED,
        description="Exactly this many training examples from this source (a task generates them; a file's "
        "records are repeated when it holds fewer). Unset, without weight: all of them (a task: 2000).",
    )

    @field_validator("task")
    @classmethod
    def _known_task(cls, value: str | None) -> str | None:
        return _known_task(value)


class DataSection(Section):
    task: str | None = Field(
        None,
        description="A builtin generated task (`shardtune tasks` lists them). Exclusive with `path`/`hub`.",
    )
    path: str | None = Field(
        None,
        description="A local .jsonl/.json/.csv/.parquet/.txt file or a `datasets` save_to_disk directory.",
    )
    hub: str | None = Field(
        None,
        description="A hub dataset id (`org/name`): downloaded on first use into the Hugging Face cache, as "
        "`datasets.load_dataset` does; offline with HF_HUB_OFFLINE=1 or --offline.",
    )
    revision: str | None = Field(
        None, description="Hub revision of `hub`: a branch, tag or commit (unset: main)."
    )
    split: str = Field("train", description="Split to train on (hub datasets and save_to_disk directories).")
    eval_split: str | None = Field(
        None,
        description="Held-out examples from elsewhere: a split name (hub datasets, save_to_disk "
        "directories) or, next to a local data file, a second file. Unset: `eval_samples` records are "
        "split off the training data.",
    )
    format: Literal["auto", "text", "prompt_completion", "alpaca", "messages", "sharegpt"] = Field(
        "auto",
        description=(
            "`text` (field `text`, all tokens trained), `prompt_completion`, `alpaca` "
            "(instruction/input/output), `messages` (chat: role/content), `sharegpt` (chat: `conversations` "
            "of from/value); loss only on completions / assistant turns. `auto`: decided from the first "
            "record's keys."
        ),
    )
    text_field: str = Field("text", description="Field holding the text for `format: text`.")
    chat_template: bool | str = Field(
        "auto",
        description="How chats are rendered: `auto` (the tokenizer's template when it has one; then "
        "prompt/completion records are a user and an assistant turn too), `true` (the tokenizer's, required), "
        "`false` (none), a template shipped with shardtune (`chatml`, `qwen`, `llama-3`, `mistral`, `gemma`, "
        "`phi-3`), a Jinja template itself, or a template file (`.jinja`).",
    )
    assistant_turns: Literal["all", "last"] = Field(
        "all",
        description="Which assistant turns of a chat are trained: `all`, or only the `last` (the earlier ones "
        "are context, masked like the user turns).",
    )
    packing: bool = Field(
        False,
        description="Put several whole examples in each row of up to `max_length` tokens; each attends only "
        "to itself (position ids restart at each example), so the loss is that of the examples alone.",
    )
    streaming: bool = Field(
        False,
        description="Read the records as training needs them, never all at once: local .jsonl/.txt/.csv/"
        ".parquet files and save_to_disk directories (each checked whole first, a record at a time), hub "
        "datasets (downloaded as they are read). Needs `train.max_steps`; held out: the first `eval_samples` "
        "records of each source; resumes at the record where the checkpoint stopped.",
    )
    stream_window: PositiveInt = Field(
        1000,
        le=1_000_000,
        description="With `streaming`: examples drawn, shuffled, tokenized and packed together (more: a "
        "better shuffle, more memory).",
    )
    num_samples: PositiveInt = Field(
        2000, le=MAX_GENERATED, description="Training examples generated for a builtin task."
    )
    num_proc: PositiveInt = Field(
        1, le=256, description="Processes that tokenize the examples (in chunks, in order: the same rows)."
    )
    tokenized_cache: bool = Field(
        True,
        description="Keep the token rows in the cache ($SHARDTUNE_CACHE/tokenized), keyed by the examples, the "
        "tokenizer, the chat template and these options: a second run or a resume does not tokenize again "
        "(streamed data is tokenized a window at a time, not cached).",
    )
    eval_samples: int | None = Field(
        None,
        ge=0,
        le=MAX_GENERATED,
        description="Held-out examples: generated for a builtin task (`facts`, a memorisation task: a sample "
        "of the trained facts, asked again), taken from `eval_split`, or split off "
        "the data (seeded, disjoint from training). Unset: 64, or a fifth of a single source, at most 64; "
        "set: exactly this many (fewer than the examples of a single source).",
    )
    max_length: PositiveInt = Field(
        256,
        le=MAX_LENGTH_LIMIT,
        description="Examples longer than this many tokens are truncated (at most the model's context).",
    )
    seed: int = Field(
        0, ge=SEED_MIN, le=SEED_MAX, description="Seed of task generation and of the train/eval split."
    )

    sources: list[SourceSection] | None = Field(
        None,
        description="A mixture: a list of sources, each with its own `task` / `path` / `hub`, `format`, "
        "`split`, `eval_split`, `text_field`, `eval_samples`, and `weight` or `num_samples` (see Mixtures "
        "below). The other keys here (`max_length`, `packing`, `chat_template`, `assistant_turns`, `seed`) apply to all of them.",
    )

    @model_validator(mode="after")
    def _one_source(self):
        if self.sources is not None:
            _check_mixture(self)
            return self
        if sum(x is not None for x in (self.task, self.path, self.hub)) != 1:
            raise ValueError("set exactly one of data.task, data.path, data.hub or data.sources")
        return self

    @model_validator(mode="after")
    def _keys_that_apply(self):
        # A key that would do nothing with the others as set is a mistake, not a no-op. (A saved or
        # resolved recipe spells out the defaults: only values that differ from them count.)
        defaults = type(self).model_fields
        _check_streaming_keys(self, defaults)
        if self.sources is not None:
            return self
        if self.num_samples != defaults["num_samples"].default and self.task is None:
            raise RecipeError(
                "data.num_samples", "applies to data.task only (examples a builtin task generates)"
            )
        _check_source_keys(self, "data", defaults)
        return self

    @field_validator("chat_template")
    @classmethod
    def _chat_template_shape(cls, value: bool | str) -> bool | str:
        from shardtune.core.catalog import CHAT_TEMPLATES

        if (
            isinstance(value, bool)
            or value == "auto"
            or value in CHAT_TEMPLATES
            or "{{" in value
            or "{%" in value
        ):
            return value
        if "/" in value or value.endswith((".jinja", ".jinja2", ".j2", ".tmpl", ".txt")):
            return value  # a template file (read when the run starts)
        raise ValueError(
            f"must be one of: auto, true, false, a shipped template ({', '.join(CHAT_TEMPLATES)}), a Jinja "
            f"template (holding {{{{ or {{%), or a template file (.jinja); not {value!r}"
        )

    @field_validator("task")
    @classmethod
    def _known_task(cls, value: str | None) -> str | None:
        return _known_task(value)

    def source_list(self) -> list:
        """The sources of the data: the mixture's, or this section as its single source."""
        return list(self.sources) if self.sources is not None else [self]

    def describe_source(self) -> str:
        """The data as a run names it: a task, a file, a hub id, or a mixture of them."""
        if self.sources is None:
            return str(self.task or self.path or self.hub)
        return "a mixture of " + ", ".join(str(s.task or s.path or s.hub) for s in self.sources)


def _known_task(value: str | None) -> str | None:
    from shardtune.core.catalog import TASKS

    if value is not None and value not in TASKS:
        raise ValueError(f"unknown task {value!r}; available: {', '.join(TASKS)}")
    return value


def _check_source_keys(source, prefix: str, defaults: dict) -> None:
    """The keys of one source that apply to it as set (a data section or an item of data.sources)."""
    if source.revision is not None and source.hub is None:
        raise RecipeError(
            f"{prefix}.revision", f"applies to {prefix}.hub only (a hub dataset's branch, tag or commit)"
        )
    if source.text_field != defaults["text_field"].default and source.format not in ("text", "auto"):
        raise RecipeError(f"{prefix}.text_field", f"applies to format: text only (format is {source.format})")
    if source.task is not None:  # a builtin task generates its items, held-out ones included
        for key in ("eval_split", "split", "format", "text_field"):
            if getattr(source, key) != defaults[key].default:
                raise RecipeError(
                    f"{prefix}.{key}",
                    f"applies to {prefix}.path or {prefix}.hub only ({prefix}.task generates its examples)",
                )


# The keys of a single-source data section that a mixture sets per source instead.
SOURCE_KEYS = (
    "task",
    "path",
    "hub",
    "revision",
    "split",
    "eval_split",
    "format",
    "text_field",
    "eval_samples",
)


def _check_streaming_keys(data: DataSection, defaults: dict) -> None:
    """Keys that do nothing, or cannot hold, when the data streams (or does not)."""
    if not data.streaming:
        if data.stream_window != defaults["stream_window"].default:
            raise RecipeError("data.stream_window", "applies to data.streaming: true only")
        return
    if data.num_proc != defaults["num_proc"].default:
        raise RecipeError(
            "data.num_proc", "streamed data is tokenized as it is read, a window at a time; unset num_proc"
        )
    for i, source in enumerate(data.sources or []):
        if source.weight is None:
            raise RecipeError(
                f"data.sources.{i}.weight" if source.num_samples is None else f"data.sources.{i}.num_samples",
                "a streamed mixture draws each example from a source by weight; give every source a weight "
                "(num_samples needs the whole source read)",
            )


def _check_mixture(data: DataSection) -> None:
    if not data.sources:
        raise RecipeError("data.sources", "is empty; list at least one source (or set data.task/path/hub)")
    defaults = DataSection.model_fields
    for key in (*SOURCE_KEYS, "num_samples"):
        if getattr(data, key) != defaults[key].default:
            raise RecipeError(
                f"data.{key}", "with data.sources, set it inside each source (data.sources.N.KEY)"
            )
    for i, source in enumerate(data.sources):
        where = f"data.sources.{i}"
        if sum(x is not None for x in (source.task, source.path, source.hub)) != 1:
            raise RecipeError(where, "set exactly one of task, path or hub")
        if source.weight is not None and source.num_samples is not None:
            raise RecipeError(
                f"{where}.weight",
                "set weight (a share of the mixture) or num_samples (a number of examples), not both",
            )
        _check_source_keys(source, where, SourceSection.model_fields)


class FsdpSection(Section):
    """How ``train.strategy: fsdp`` shards the model (PyTorch FSDP2, ``torch.distributed.fsdp.fully_shard``)."""

    wrap: list[str] | None = Field(
        None,
        description="Module classes sharded as one unit each (e.g. `[LlamaDecoderLayer]`); unset: the model's "
        "own blocks (`_no_split_modules`). Everything else, the shared adapter stores included, belongs to "
        "the root unit.",
    )
    reshard_after_forward: bool = Field(
        True,
        description="Free each unit's gathered weights after its forward and gather again in backward "
        "(least memory, ZeRO-3); `false` keeps them until backward (fewer all-gathers, ZeRO-2-like).",
    )


DEEPSPEED_PERSISTENCE = 100_000  # DeepSpeed's own default for stage3_param_persistence_threshold


class DeepSpeedSection(Section):
    """How ``train.strategy: deepspeed`` partitions training state (DeepSpeed ZeRO, through Accelerate's
    DeepSpeed plugin)."""

    stage: Literal[1, 2, 3] = Field(
        2,
        description="ZeRO stage: 1 partitions the optimizer state across processes, 2 the gradients too, "
        "3 the weights too (base and adapter; each is gathered for the layer that uses it).",
    )
    offload_optimizer: bool = Field(
        False, description="Keep the optimizer state (and its step) in CPU memory (ZeRO-Offload)."
    )
    offload_params: bool = Field(
        False, description="Stage 3: keep the partitioned weights in CPU memory between uses (ZeRO-Infinity)."
    )
    persistence_threshold: int = Field(
        DEEPSPEED_PERSISTENCE,
        ge=0,
        description="Stage 3: a parameter with fewer elements than this stays whole on every process "
        "instead of partitioned (DeepSpeed's stage3_param_persistence_threshold; 0 partitions every one).",
    )

    @model_validator(mode="after")
    def _stage_3_options_need_stage_3(self):
        if self.offload_params and self.stage != 3:
            raise ValueError(
                f"offload_params: true offloads partitioned weights, which only stage 3 has (stage is "
                f"{self.stage}); set stage: 3 or offload_params: false"
            )
        if self.persistence_threshold != DEEPSPEED_PERSISTENCE and self.stage != 3:
            raise ValueError(
                f"persistence_threshold decides which weights stage 3 partitions (stage is {self.stage}); "
                "set stage: 3 or remove it"
            )
        return self


Metric = Literal["eval_loss", "task_score"]


class EarlyStoppingSection(Section):
    """``train.early_stopping``: stop a run whose held-out metric stopped improving."""

    patience: PositiveInt = Field(
        description="Stop after this many evaluations in a row without an improvement of more than min_delta."
    )
    min_delta: float = Field(0.0, ge=0, description="An improvement counts only when larger than this.")
    metric: Metric = Field(
        "eval_loss",
        description="`eval_loss` (lower is better; evaluated every eval.every steps) or `task_score` "
        "(higher is better; every eval.score_every steps).",
    )


class ParamGroupSection(Section):
    """``train.param_groups.ROLE``: the learning rate and weight decay of one role of parameters."""

    lr_scale: float | None = Field(
        None, gt=0, description="The role's learning rate as a multiple of train.lr (the schedule applies)."
    )
    weight_decay: float | None = Field(
        None, ge=0, description="The role's weight decay (unset: train.weight_decay)."
    )


Role = Literal["A", "B", "bank", "logits", "shard", "scale"]


class TrainSection(Section):
    max_steps: PositiveInt | None = Field(
        None, le=MAX_STEPS, description="Optimizer steps; overrides `epochs` when set."
    )
    epochs: float = Field(
        1.0,
        gt=0,
        le=MAX_STEPS,  # (every pass is at least one step)
        description="Passes over the training data (when max_steps is not set); the steps they come to "
        f"are at most {MAX_STEPS:,}.",
    )
    batch_size: PositiveInt = Field(
        8, description="Examples per micro-batch per process (rows of packed examples with `data.packing`)."
    )
    grad_accum: PositiveInt = Field(1, description="Micro-batches per optimizer step.")
    lr: float = Field(2e-4, gt=0, description="Peak learning rate.")
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_8bit", "adafactor"] = Field(
        "adamw",
        description="`adamw` (torch), `adamw_8bit` and `paged_adamw_8bit` (bitsandbytes: 8-bit moments, "
        "`pip install 'shardtune[quant]'`; paged needs CUDA and falls back to unpaged elsewhere), `adafactor` "
        "(torch: factored second moments, no first moment; betas unused).",
    )
    weight_decay: float = Field(0.0, ge=0, description="AdamW's decoupled weight decay.")
    lr_ratio_b: float | None = Field(
        None,
        gt=0,
        description="LoRA+ (arXiv 2402.12354): B matrices learn at this multiple of train.lr (A at train.lr), "
        "e.g. 16. Methods with A and B factors only.",
    )
    param_groups: dict[Role, ParamGroupSection] = Field(
        default_factory=dict,
        description="Learning rate and weight decay by parameter role: `A`, `B`, `bank`, `logits` (VB-LoRA), "
        "`shard` (FOSSIL), `scale` (VeRA, Tied-LoRA vectors), e.g. `{logits: {lr_scale: 10}}`. Methods "
        "whose paper prescribes rates start from them (VB-LoRA: logits at 10 × train.lr, as its bank 1e-3 "
        "and logits 1e-2).",
    )
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas, each in [0, 1).")
    warmup_steps: int = Field(
        0, ge=0, description="Linear warm-up: step k of the first N uses lr·k/N (the first step learns)."
    )
    warmup_ratio: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Warm-up as a share of the run's steps: ⌈ratio × steps⌉ steps (instead of warmup_steps).",
    )
    schedule: Literal["cosine", "linear", "constant"] = Field(
        "cosine",
        description="After warm-up: cosine or linear decay towards min_lr after the last step, or constant.",
    )
    min_lr: float = Field(
        0.0,
        ge=0,
        description="Where cosine and linear decay end (after the last step): lr(t) = min_lr + (lr − min_lr)·f(t).",
    )
    max_grad_norm: float = Field(1.0, ge=0, description="Gradient clipping by global norm; 0 disables.")
    # (accelerate's set_seed seeds NumPy too, which takes 0 … 2³² − 1)
    seed: int = Field(42, ge=0, le=2**32 - 1, description="Seed of adapter init, dropout and data order.")
    precision: Annotated[Literal["fp32", "bf16"], BeforeValidator(dtype_synonyms)] = Field(
        "fp32", description="`bf16`: autocast mixed precision (float32, bfloat16 also read)."
    )
    save_every: int = Field(
        0, ge=0, description="Write checkpoint-N every N steps (0: only the final adapter)."
    )
    keep_checkpoints: int = Field(3, ge=1, description="How many checkpoint-N directories to keep.")
    cpu: bool = Field(False, description="Train on the CPU even when a GPU is present.")
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in backward (less memory, ~30% more compute)."
    )
    compile: bool = Field(
        False,
        description="torch.compile each decoder block (regional compilation: the blocks share one compiled "
        "graph). The first step compiles (reported apart, `compile_seconds` in result.json); works with "
        "gradient checkpointing and DDP, not with `strategy: fsdp` or `deepspeed`. Needs a C++ compiler on CPU.",
    )
    strategy: Literal["ddp", "fsdp", "deepspeed"] = Field(
        "ddp",
        description="With several processes: `ddp` keeps a whole model per process and all-reduces the adapter "
        "gradients; `fsdp` shards base weights, adapter, gradients and optimizer state across processes; "
        "`deepspeed` partitions them with DeepSpeed ZeRO (`train.deepspeed`; needs `pip install "
        "'shardtune[deepspeed]'`). See docs/distributed.md. One process trains unsharded with ddp and fsdp; "
        "deepspeed runs ZeRO on one process too (its offload is what one process gains).",
    )
    fsdp: FsdpSection = Field(
        default_factory=FsdpSection, description="Options of `strategy: fsdp` (table `train.fsdp` below)."
    )
    deepspeed: DeepSpeedSection = Field(
        default_factory=DeepSpeedSection,
        description="Options of `strategy: deepspeed` (table `train.deepspeed` below).",
    )
    early_stopping: EarlyStoppingSection | None = Field(
        None,
        description="`{patience: N, min_delta: D, metric: eval_loss|task_score}`: stop once the metric has not "
        "improved by more than D in N evaluations in a row; the result and the run directory say why. Resume keeps the "
        "best value and the count.",
    )
    timeout_s: float = Field(
        600,
        ge=1,
        le=TIMEOUT_LIMIT_S,
        description="With several processes: seconds one waits for the others. A process silent this long "
        "(its machine died, hangs or is cut off) is lost: the others stop, naming it (exit code 4; a "
        "process that dies is noticed within seconds). A collective still waiting a little later fails. "
        "Keep it above the longest time one process works alone (scoring on the main one, a slow "
        "start). See docs/distributed.md.",
    )

    @field_validator("betas", mode="before")
    @classmethod
    def _betas_from_a_list(cls, value):
        return tuple(value) if isinstance(value, list) else value  # YAML has lists, not tuples

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, value):
        if not all(0 <= b < 1 for b in value):
            raise ValueError(f"each beta must be in [0, 1), got {list(value)}")
        return value

    @model_validator(mode="after")
    def _eight_bit_not_with_fsdp(self):
        if self.optimizer.endswith("8bit") and self.strategy == "fsdp":  # (deepspeed: below)
            raise ValueError(
                f"optimizer: {self.optimizer} does not work with strategy: fsdp (bitsandbytes quantizes whole "
                "tensors, not shards); use adamw or adafactor, or strategy: ddp"
            )
        return self

    @model_validator(mode="after")
    def _one_rate_for_b(self):
        if self.lr_ratio_b is not None and "B" in self.param_groups and self.param_groups["B"].lr_scale:
            raise ValueError("lr_ratio_b and param_groups.B.lr_scale both set B's learning rate; keep one")
        return self

    @model_validator(mode="after")
    def _one_warmup_and_a_floor_below_the_peak(self):
        if self.warmup_steps and self.warmup_ratio:
            raise ValueError("warmup_steps and warmup_ratio are both set; keep one")
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr {self.min_lr:g} is above lr {self.lr:g}; the decay ends below the peak")
        return self

    def warmup_for(self, total_steps: int) -> int:
        """Warm-up steps of a run of ``total_steps``: warmup_steps, or ⌈warmup_ratio × total_steps⌉."""
        return math.ceil(self.warmup_ratio * total_steps) if self.warmup_ratio else self.warmup_steps

    @model_validator(mode="after")
    def _strategy_options_need_their_strategy(self):
        # (a resolved recipe spells out the defaults: only options that differ from them count)
        for name, default in (("fsdp", FsdpSection()), ("deepspeed", DeepSpeedSection())):
            if getattr(self, name) != default and self.strategy != name:
                raise ValueError(
                    f"{name} options are set but strategy is {self.strategy}; set train.strategy: {name} "
                    "to use them"
                )
        return self

    @model_validator(mode="after")
    def _compile_not_with_sharding(self):
        if self.compile and self.strategy != "ddp":
            raise ValueError(
                f"compile: true does not work with strategy: {self.strategy} (its sharded blocks are not "
                "compiled); set train.compile: false or train.strategy: ddp"
            )
        return self

    @model_validator(mode="after")
    def _what_zero_cannot_take(self):
        """DeepSpeed ZeRO flattens the adapter's tensors into one partitioned vector per group: an
        optimizer that needs a tensor's own shape (Adafactor's factored moments, bitsandbytes' 8-bit
        blocks) would see a different problem; DeepSpeed picks its own device (train.cpu)."""
        if self.strategy != "deepspeed":
            return self
        if self.optimizer != "adamw":
            raise ValueError(
                f"optimizer: {self.optimizer} does not work with strategy: deepspeed (ZeRO flattens the "
                "adapter's tensors, which this optimizer needs whole); use adamw, or strategy: ddp"
            )
        if self.cpu:
            raise ValueError(
                "cpu: true does not work with strategy: deepspeed (DeepSpeed trains on the accelerator it "
                "finds); unset train.cpu, or use strategy: ddp"
            )
        return self


class EvalSection(Section):
    every: int = Field(
        0, ge=0, description="Held-out loss every N steps, whatever logging.every is (0: only at the end)."
    )
    score_every: int = Field(
        0,
        ge=0,
        description="The task score (as eval.score) every N steps during training (0: never during training).",
    )
    score: bool = Field(
        False,
        description="After training, the task score: greedy answers on the held-out items (a builtin task's, or "
        "of data with completions) scored by eval.metric.",
    )
    score_base: bool = Field(False, description="Also score the base model (adapter off) before training.")
    max_new_tokens: PositiveInt = Field(
        32, le=MAX_NEW_TOKENS, description="Generation length limit when scoring."
    )
    metric: Literal["exact", "contains"] = Field(
        "exact",
        description="How a greedy answer is scored: `exact` (its first line equals the completion, or a chat's "
        "last assistant turn) or `contains` (it holds the completion anywhere).",
    )
    batch_size: PositiveInt = Field(16, description="Examples per batch when evaluating and scoring.")


class OutputSection(Section):
    dir: str = Field(
        "runs/run", description="Run directory: adapter, checkpoints, metrics, log, resolved recipe."
    )
    overwrite: bool = Field(
        False,
        description="Replace an earlier run in `dir` (one shardtune wrote; it is deleted once the new run "
        "finishes). Never replaces anything else.",
    )
    keep_best: bool = Field(
        False,
        description="Keep the adapter of the best evaluation so far in the run's `best/` (a run directory's "
        "adapter files, for eval, generate, merge, export), judged by output.best_metric.",
    )
    best_metric: Metric = Field(
        "eval_loss",
        description="What output.keep_best judges by: `eval_loss` (lowest; every eval.every steps and at "
        "the end) or `task_score` (highest; every eval.score_every steps).",
    )

    @field_validator("dir")
    @classmethod
    def _dir_named(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("is empty; name the run directory, e.g. runs/my-run")
        return value


TrackerName = Literal[
    "tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive", "swanlab", "trackio"
]


class LoggingSection(Section):
    every: PositiveInt = Field(10, description="Log a metrics line every N optimizer steps.")
    level: Literal["debug", "info", "warning"] = Field("info", description="Level of the run's log file.")
    report_to: list[TrackerName] = Field(
        default_factory=list,
        description="Experiment trackers (Accelerate's) that receive the resolved recipe and every metric of "
        "metrics.jsonl, e.g. `[tensorboard]` (event files in the run's logs/), `[wandb, mlflow]`; each needs its "
        "package (`pip install 'shardtune[tensorboard]'`).",
    )

    project: str = Field(
        "shardtune",
        min_length=1,
        description="Where the trackers file the run: the wandb or comet_ml project, the mlflow or aim "
        "experiment, the folder under the run's logs/ for tensorboard.",
    )
    run_name: str | None = Field(
        None, description="The run's name in wandb and mlflow (unset: the run directory's name)."
    )
    tags: list[str] = Field(default_factory=list, description="The run's tags in wandb and mlflow.")
    tracker_kwargs: dict[TrackerName, dict[str, Any]] = Field(
        default_factory=dict,
        description="More keyword arguments for a tracker's start, e.g. `{wandb: {entity: my-team, group: "
        "sweep-3}}` (wandb.init), `{mlflow: {description: ...}}`; they win over project, run_name and tags.",
    )

    @field_validator("report_to", "tags", mode="before")
    @classmethod
    def _one_or_many(cls, value):
        return [value] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _kwargs_of_trackers_in_use(self):
        unused = [name for name in self.tracker_kwargs if name not in self.report_to]
        if unused:
            raise ValueError(
                f"tracker_kwargs names {', '.join(unused)}, which report_to does not list "
                f"({', '.join(self.report_to) or 'none'})"
            )
        return self


class Recipe(Section):
    _notes: list[str] = PrivateAttr(default_factory=list)  # what overrides changed besides their key
    model: ModelSection
    adapter: AdapterSection
    data: DataSection
    train: TrainSection = Field(default_factory=TrainSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    output: OutputSection = Field(default_factory=OutputSection)
    logging: LoggingSection = Field(default_factory=LoggingSection)

    @model_validator(mode="after")
    def _streaming_needs_max_steps(self):
        if self.data.streaming and self.train.max_steps is None:
            raise RecipeError(
                "train.max_steps",
                "streamed data has no length known ahead, so epochs cannot be counted; set train.max_steps "
                "(data.streaming: true)",
            )
        return self

    @model_validator(mode="after")
    def _zero_takes_no_quantized_base(self):
        if self.model.quantize is not None and self.train.strategy == "deepspeed":
            raise RecipeError(
                "train.strategy",
                f"deepspeed cannot partition a quantized base (model.quantize: {self.model.quantize}: "
                "bitsandbytes keeps codes and scales beside each weight); use strategy: ddp",
            )
        return self

    @model_validator(mode="after")
    def _scoring_needs_answers(self):
        scoring = self.eval.score or self.eval.score_base or self.eval.score_every
        if scoring and self.data.task is None and self.data.format == "text":
            raise ValueError(
                "eval.score, eval.score_base and eval.score_every need examples with answers to score against: "
                "a builtin task (data.task) or data with completions (prompt_completion, alpaca, messages), "
                "not format: text"
            )
        return self

    @model_validator(mode="after")
    def _selection_needs_evaluations(self):
        """output.keep_best and train.early_stopping judge evaluations made during training."""
        wanted = []
        if self.output.keep_best:
            wanted.append(("output.keep_best", self.output.best_metric))
        if self.train.early_stopping is not None:
            wanted.append(("train.early_stopping", self.train.early_stopping.metric))
        for key, metric in wanted:
            if metric == "eval_loss" and not self.eval.every:
                raise ValueError(f"{key} judges eval_loss, evaluated every eval.every steps: set eval.every")
            if metric == "eval_loss" and self.data.eval_samples == 0:
                raise ValueError(f"{key} judges eval_loss on held-out examples: data.eval_samples is 0")
            if metric == "task_score" and not self.eval.score_every:
                raise ValueError(
                    f"{key} judges task_score, scored every eval.score_every steps: set eval.score_every"
                )
        return self


# ---------------------------------------------------------------------------------------------------
# Loading, overrides and one-line errors


class RecipeLoader(yaml.SafeLoader):
    """PyYAML's safe loader with the mistakes of YAML 1.1 mended: numbers are YAML 1.2's (``2e-4`` is a
    number, not the string ``"2e-4"``; ``010`` is ten, not octal eight; ``1:30`` is not ninety), and a
    key given twice in one mapping is an error (not: the later one wins)."""

    def construct_yaml_int(self, node):
        text = self.construct_scalar(node).replace("_", "")
        sign = -1 if text.startswith("-") else 1
        digits = text.lstrip("+-")
        if digits[:2] in ("0o", "0x"):
            return sign * int(digits[2:], 8 if digits[1] == "o" else 16)
        return sign * int(digits, 10)

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *defaults` merges keys on purpose
            key, line = self.construct_object(key_node), key_node.start_mark.line + 1
            if key in seen:
                raise DuplicateKey(key, line, seen[key])
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


class DuplicateKey(yaml.YAMLError):
    def __init__(self, key, line: int, first: int):
        super().__init__(f"key {key!r} appears twice (lines {first} and {line})")
        self.key, self.line, self.first = key, line, first


RecipeLoader.yaml_implicit_resolvers = {
    first: [
        (tag, rx) for tag, rx in resolvers if tag not in ("tag:yaml.org,2002:float", "tag:yaml.org,2002:int")
    ]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
RecipeLoader.add_constructor("tag:yaml.org,2002:int", RecipeLoader.construct_yaml_int)
RecipeLoader.add_implicit_resolver(  # YAML 1.2 core schema integers
    "tag:yaml.org,2002:int",
    re.compile(r"^(?:[-+]?[0-9][0-9_]*|0o[0-7_]+|0x[0-9a-fA-F_]+)$"),
    list("-+0123456789"),
)
RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


class RecipeDumper(yaml.SafeDumper):
    """Writes what :class:`RecipeLoader` reads back the same (a string such as ``"2e-4"`` is quoted)."""


RecipeDumper.yaml_implicit_resolvers = RecipeLoader.yaml_implicit_resolvers


class YamlTooLarge(yaml.YAMLError):
    """YAML whose shape no recipe has: aliases that expand into each other ("billion laughs"), an
    alias inside the section it names (a loop), nesting deeper than any recipe."""

    def __init__(self, problem: str):
        super().__init__(problem)
        self.problem, self.problem_mark = problem, None


MAX_YAML_VALUES = 100_000  # values after aliases are expanded (a recipe has a few hundred)
MAX_YAML_DEPTH = 64  # sections inside sections (a recipe has four or five)


def parse_yaml(text: str):
    """YAML as recipes read it (:class:`RecipeLoader`), its size and depth bounded
    (:class:`YamlTooLarge`, a ``yaml.YAMLError``: one line where every YAML error is one line)."""
    try:
        data = yaml.load(text, Loader=RecipeLoader)  # noqa: S506 - a SafeLoader subclass
    except RecursionError:
        raise YamlTooLarge(f"nested deeper than any recipe (at most {MAX_YAML_DEPTH} levels)") from None
    _check_yaml_shape(data)
    return data


def _check_yaml_shape(data) -> None:
    """Walk what YAML built (without recursion): aliases share one object, so a loop is a container
    inside itself, and an expansion bomb is a count of values that keeps growing."""
    stack, values = [(data, 1, frozenset())], 0
    while stack:
        node, depth, above = stack.pop()
        if not isinstance(node, dict | list):
            continue
        if id(node) in above:
            raise YamlTooLarge("an alias names a section that holds it (a loop)")
        if depth > MAX_YAML_DEPTH:
            raise YamlTooLarge(f"nested deeper than any recipe (at most {MAX_YAML_DEPTH} levels)")
        inside = above | {id(node)}
        for child in node.values() if isinstance(node, dict) else node:
            values += 1
            if values > MAX_YAML_VALUES:
                raise YamlTooLarge(
                    f"more than {MAX_YAML_VALUES:,} values once its aliases are expanded (aliases that "
                    "expand into each other?)"
                )
            stack.append((child, depth + 1, inside))


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe (a file, or a shipped recipe's name); raise
    :class:`RecipeError` / :class:`BadInput`."""
    path = recipe_path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise BadInput(f"{path}: not a UTF-8 text file") from None
    except IsADirectoryError:
        raise BadInput(f"{path}: is a directory, not a recipe file") from None
    except FileNotFoundError:
        problem = "a symbolic link to nothing" if path.is_symlink() else "recipe file not found"
        if not path.is_symlink() and is_bare_name(str(path)):
            problem += " (nor a shipped recipe's name: see `shardtune recipes`)"
        raise BadInput(f"{path}: {problem}") from None
    except PermissionError:
        raise BadInput(f"{path}: cannot be read (permission denied)") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise BadInput(f"{path}: a loop of symbolic links, not a recipe file") from None
        raise BadInput(f"{path}: cannot be read ({e.strerror or e})") from None
    try:
        raw = parse_yaml(text)
    except DuplicateKey as e:
        raise BadInput(
            f"{path}: key {e.key!r} appears twice in one section (lines {e.first} and {e.line}); keep one"
        ) from None
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        raise BadInput(f"{path}: invalid YAML{at}: {getattr(e, 'problem', None) or e}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise BadInput(f"{path}: a recipe must be a mapping of sections, got {type(raw).__name__}")
    return recipe_from_dict(raw, overrides)


def recipe_from_dict(raw: dict, overrides: list[str] | None = None) -> Recipe:
    """Validate ``raw`` after the ``--set`` overrides; what an override changed beyond its own key
    (another method's adapter keys dropped) is in :func:`override_notes`."""
    notes: list[str] = []
    for item in overrides or []:
        note = apply_override(raw, item)
        if note:
            notes.append(note)
    check_integer_sizes(raw)
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as e:
        raise first_recipe_error(e, raw) from None
    recipe._notes = notes
    return recipe


class _AdapterOnly(BaseModel):
    adapter: AdapterSection


def adapter_section(options: dict):
    """The ``adapter`` section alone (``options`` with its ``method``), validated as in a recipe: a
    bad value is one line naming ``adapter.KEY`` (did-you-mean suggestions included)."""
    raw = {"adapter": options}
    check_integer_sizes(raw)
    try:
        return _AdapterOnly.model_validate(raw).adapter
    except ValidationError as e:
        raise first_recipe_error(e, raw) from None


def check_integer_sizes(node, key: str = "") -> None:
    """Every integer of a recipe fits in 64 bits (what torch and the C libraries below it take): a
    larger one is refused naming its key, before any key's own range check could let it reach them."""
    if isinstance(node, dict):
        for name, value in node.items():
            check_integer_sizes(value, f"{key}.{name}" if key else str(name))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            check_integer_sizes(value, f"{key}.{i}")
    elif isinstance(node, int) and not isinstance(node, bool) and not SEED_MIN <= node <= SEED_MAX:
        raise BadInput(f"{key}: {node} is too large for any setting (at most 64 bits)")


def override_notes(recipe: Recipe) -> list[str]:
    """What the ``--set`` overrides changed besides their own keys (say it on stderr)."""
    return list(recipe._notes)


def apply_override(raw: dict, item: str) -> str | None:
    """Apply ``a.b.c=value`` (value parsed as YAML: numbers, booleans, lists) to the nested dict.

    ``adapter.method=OTHER`` switches methods: the adapter keys the new method does not know (the old
    method's) are dropped; returns a note that says which."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise BadInput(f"--set {item}: expected KEY=VALUE with a dotted key, e.g. --set train.lr=2e-4")
    try:
        value = parse_yaml(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    node = raw
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):  # a list's item by its index (data.sources.1.weight)
            nxt = node[_list_index(node, part, parts[:i])]
        else:
            nxt = node.setdefault(part, {})
            if nxt is None:
                nxt = node[part] = {}
        if not isinstance(nxt, dict | list):
            raise RecipeError(".".join(parts[: i + 1]), f"is a value, not a section; cannot set {key}")
        node = nxt
    if isinstance(node, list):
        node[_list_index(node, parts[-1], parts[:-1])] = value
        return None
    note = None
    if parts == ["adapter", "method"] and value in METHODS and node.get("method") != value:
        known = METHODS[value].Options.model_fields
        dropped = sorted(k for k in node if k not in known)
        for k in dropped:
            del node[k]
        if dropped:
            old = node.get("method")
            keys = ", ".join(f"adapter.{k}" for k in dropped)
            note = f"adapter.method={value}: dropped {keys} (options of {old} that {value} does not have)"
    if len(parts) == 2 and parts[0] == "data" and parts[1] in DATA_SOURCE_KEYS and value is not None:
        note = _switch_data_source(node, parts[1])
    if isinstance(value, dict) and isinstance(node.get(parts[-1]), dict):
        dropped = sorted(k for k in node[parts[-1]] if k not in value)
        if dropped:  # a whole section replaced: say which of its keys went (not silently)
            keys = ", ".join(f"{key}.{k}" for k in dropped)
            note = f"--set {key}={{...}} replaced the whole section: dropped {keys} (set one key with {key}.KEY=...)"
    node[parts[-1]] = value
    return note


def _list_index(items: list, part: str, above: list[str]) -> int:
    """``--set LIST.N.KEY=...``: item N of the list (counted from 0); N = its length adds an item."""
    where = ".".join(above)
    if not part.isdigit():
        raise RecipeError(
            where, f"is a list; name an item by its index (0 to {len(items) - 1}), not {part!r}"
        )
    index = int(part)
    if index == len(items):
        items.append({})
    elif index > len(items):
        raise RecipeError(
            where,
            f"has {len(items)} items (0 to {len(items) - 1}); {index} would leave a gap ({len(items)} adds one)",
        )
    return index


# Each data source and the keys that apply to it alone (dropped when ``--set`` picks another source).
DATA_SOURCE_KEYS = {"task": ("num_samples",), "path": (), "hub": ("revision",), "sources": ()}


def _switch_data_source(data: dict, source: str) -> str | None:
    """``--set data.SOURCE=...``: the other sources of the recipe's data section, and the keys only
    they use, are dropped (a recipe names one source); returns a note that says which."""
    dropped = [
        key
        for other, own in DATA_SOURCE_KEYS.items()
        if other != source and other in data
        for key in (other, *own)
        if key in data
    ]
    for key in dropped:
        del data[key]
    if not dropped:
        return None
    keys = ", ".join(f"data.{k}" for k in dropped)
    return f"data.{source}: dropped {keys} (the recipe's other data source)"


def _model_at(loc: tuple, raw: dict) -> type[BaseModel] | None:
    """The pydantic model class that owns the keys at ``loc`` (for 'did you mean' suggestions)."""
    model: type[BaseModel] | None = Recipe
    for part in loc:
        if model is None or part not in model.model_fields:
            return None
        if model is Recipe and part == "adapter":
            method = (
                (raw.get("adapter") or {}).get("method") if isinstance(raw.get("adapter"), dict) else None
            )
            model = METHODS[method].Options if method in METHODS else None
            continue
        ann = model.model_fields[part].annotation
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    return model


def _is_int_field(loc: tuple, raw: dict) -> bool:
    owner = _model_at(loc[:-1], raw)
    field = owner.model_fields.get(str(loc[-1])) if owner else None
    return field is not None and "int" in str(field.annotation).lower()


def _describe(err: dict, raw: dict, loc: tuple) -> str:
    kind, ctx, got = err["type"], err.get("ctx") or {}, err.get("input")
    # (YAML reads 2024-01-01 as a date: shown as written, not as Python's datetime.date(2024, 1, 1))
    got_text = f", got {got.isoformat()} (a date)" if isinstance(got, datetime.date) else f", got {got!r}"
    if kind == "missing":
        return "required key is missing"
    if kind == "extra_forbidden":
        owner = _model_at(loc[:-1], raw)
        valid = list(owner.model_fields) if owner else []
        close = difflib.get_close_matches(str(loc[-1]), valid, n=1)
        hint = (
            f" (did you mean {close[0]!r}?)"
            if close
            else (f"; valid keys: {', '.join(valid)}" if valid else "")
        )
        return f"unknown key{hint}"
    if kind == "union_tag_invalid":
        return f"unknown method {ctx.get('tag')!r}; available: {', '.join(METHODS)}"
    if kind == "union_tag_not_found":
        return f"required key is missing; one of: {', '.join(METHODS)}"
    if kind == "greater_than" and ctx.get("gt") == 0 and _is_int_field(loc, raw):
        return "must be a positive integer" + got_text
    if kind == "greater_than":
        return f"must be greater than {_number(ctx.get('gt'))}" + got_text
    if kind == "greater_than_equal":
        return f"must be at least {_number(ctx.get('ge'))}" + got_text
    if kind == "less_than":
        return f"must be less than {_number(ctx.get('lt'))}" + got_text
    if kind == "less_than_equal":
        return f"must be at most {_number(ctx.get('le'))}" + got_text
    if kind in ("int_parsing", "int_type", "int_from_float"):
        return "must be an integer" + got_text + _quoted_hint(got)
    if kind in ("float_parsing", "float_type"):
        return "must be a number" + got_text + _quoted_hint(got)
    if kind == "finite_number":
        return "must be a finite number" + got_text
    if kind in ("tuple_type", "list_type"):
        return "must be a list" + got_text
    if kind in ("bool_parsing", "bool_type"):
        return "must be true or false" + got_text
    if kind in ("string_type",):
        return "must be a string" + got_text
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return "must be a section (a mapping of keys)" + got_text
    if kind == "literal_error":
        return f"must be one of {ctx.get('expected')}" + got_text
    if kind == "value_error":
        return str(ctx.get("error", err["msg"]))
    return err["msg"][0].lower() + err["msg"][1:] + got_text


def _number(x) -> str:
    return str(x) if isinstance(x, int) else f"{x:g}"


def _quoted_hint(got: object) -> str:
    if isinstance(got, bool):
        return " (a boolean)"
    if isinstance(got, str):
        return " (a string: write numbers without quotes)"
    return ""


# What pydantic puts into an error's location beside the keys: the member of a union it tried
# (``list[str]``, ``literal['auto']``, ``str``), never a recipe key.
_UNION_MEMBER = re.compile(r"^(str|int|float|bool|none|dict|list|[a-z-]+\[.*\]|function-\S+)$")


def _recipe_location(err: dict) -> list:
    """The recipe key of a validation error: ``adapter.rank``, not ``adapter.lora.rank`` or
    ``adapter.targets.list[str]``."""
    loc = [p for p in err["loc"] if not (isinstance(p, str) and _UNION_MEMBER.match(p))]
    # Discriminated unions put the tag into the location: ('adapter', 'lora', 'rank') → adapter.rank
    if len(loc) >= 2 and loc[0] == "adapter" and loc[1] in METHODS:
        del loc[1]
    if err["type"] in ("union_tag_not_found", "union_tag_invalid"):
        loc.append("method")
    return loc


def first_recipe_error(e: ValidationError, raw: dict) -> RecipeError:
    """One line for the first problem (the count of the others appended: other keys, not the other
    members of a union the same value failed)."""
    errors = e.errors()
    err = errors[0]
    loc = _recipe_location(err)
    problem = _describe(err, raw, tuple(loc))
    more = len({tuple(_recipe_location(other)) for other in errors} - {tuple(loc)})
    if more:
        problem += f" (and {more} more problem{'s' if more > 1 else ''})"
    return RecipeError(".".join(str(p) for p in loc), problem)


def recipe_to_yaml(recipe: Recipe) -> str:
    return yaml.dump(recipe.model_dump(mode="json"), Dumper=RecipeDumper, sort_keys=False, allow_unicode=True)


def recipe_reference_markdown() -> str:
    """docs/recipe-reference.md, generated from the pydantic models so it cannot drift (`make docs`)."""

    def table(model: type[BaseModel], skip: tuple[str, ...] = ()) -> list[str]:
        rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
        for name, field in model.model_fields.items():
            if name in skip:
                continue
            ann = (
                str(field.annotation)
                .replace("typing.", "")
                .replace("<class '", "")
                .replace("'>", "")
                .replace("|", "\\|")
            )
            default = (
                "required" if field.is_required() else f"`{field.get_default(call_default_factory=True)!r}`"
            )
            desc = (field.description or "").replace("|", "\\|")
            rows.append(f"| `{name}` | `{ann}` | {default} | {desc} |")
        return rows

    out = [
        "# Recipe reference",
        "",
        "Generated from `shardtune/recipe/schema.py` and the adapter option models by `make docs`; a test fails",
        "when this file is out of date. Every key can be overridden with `--set section.key=value`.",
        "",
    ]
    for name, field in Recipe.model_fields.items():
        if name == "adapter":
            continue
        out += [f"## `{name}`", "", *table(field.annotation), ""]
        for sub_name, sub in field.annotation.model_fields.items():  # nested sections, e.g. train.fsdp
            # (an optional one, `Section | None`, or a list of them, `list[Section] | None`, too)
            args = [sub.annotation, *get_args(sub.annotation)]
            found = [t for t in (*args, *(a for arg in args for a in get_args(arg))) if isinstance(t, type)]
            for section in [t for t in found if issubclass(t, Section)][:1]:
                listed = ".N" if "list[" in str(sub.annotation) else ""
                out += [f"### `{name}.{sub_name}{listed}`", "", *table(section), ""]
    out += ["## `adapter`", "", "Keys shared by every method:", ""]
    from shardtune.adapters.base import AdapterOptions

    out += [*table(AdapterOptions, skip=("method",)), ""]
    for method_name, method in METHODS.items():
        shared = tuple(AdapterOptions.model_fields)
        out += [
            f"### `adapter.method: {method_name}`",
            "",
            method.summary,
            "",
            *table(method.Options, skip=shared),
            "",
        ]
    return "\n".join(out)
