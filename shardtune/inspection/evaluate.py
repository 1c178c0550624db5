"""Generation and evaluation: greedy answers, exact-match task scores, held-out loss of a run."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from shardtune.adapters.model import adapter_disabled
from shardtune.core.errors import BadInput, named_as
from shardtune.data.examples import (
    Collator,
    Example,
    all_examples,
    encode_all,
    expected_answer,
    prompt_ids,
    prompt_text,
    uses_chat,
)
from shardtune.data.streaming import read_examples
from shardtune.data.tasks import METRICS


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: list[list[int]],
    max_new_tokens: int = 64,
    batch_size: int = 16,
    temperature: float = 0.0,
    synced: bool = False,
) -> list[str]:
    """Complete each prompt (token ids); greedy when ``temperature == 0``. Returns the new text only.

    ``synced``: every process of a sharded (FSDP) model runs this with the same prompts; each keeps
    stepping until all are done, so no process waits on a collective the others never reach.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    outputs: list[str] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, p in enumerate(chunk):  # left padding, so every row continues at the same column
            ids[row, width - len(p) :] = torch.tensor(p)
            mask[row, width - len(p) :] = 1
        sampling = (
            {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
        )
        out = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            pad_token_id=pad,
            eos_token_id=tokenizer.eos_token_id,
            synced_gpus=synced,
            **sampling,
        )
        outputs += tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    model.train(was_training)
    return outputs


@dataclass
class TaskScore:
    correct: int
    total: int
    samples: list[dict] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0


def score_task(
    model,
    tokenizer,
    examples: list[Example],
    chat: bool,
    max_new_tokens: int = 32,
    batch_size: int = 16,
    synced: bool = False,
    metric: str = "exact",
) -> TaskScore:
    """Greedy answers scored against each example's completion (a chat: its last assistant turn):
    ``exact`` — the answer's first line equals it; ``contains`` — the answer holds it."""
    prompts = [prompt_ids(e, tokenizer, chat) for e in examples]
    answers = generate(model, tokenizer, prompts, max_new_tokens, batch_size, synced=synced)
    scorer = METRICS[metric]
    samples = [
        {
            "prompt": prompt_text(e),
            "expected": expected_answer(e).strip(),
            "answer": a.strip(),
            "correct": scorer(a, expected_answer(e)),
        }
        for e, a in zip(examples, answers, strict=True)
    ]
    return TaskScore(sum(s["correct"] for s in samples), len(samples), samples)


@torch.no_grad()
def heldout_loss(model, loader, reduce=None) -> float:
    """Token-weighted mean cross-entropy over ``loader``; ``reduce`` sums across processes (Accelerate)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total = torch.zeros(2, device=device)
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items()}
        n_tokens = (batch["labels"][:, 1:] != -100).sum()
        total += torch.stack([model(**batch).loss.float() * n_tokens, n_tokens.float()])
    if reduce is not None:
        total = reduce(total)
    model.train(was_training)
    return (total[0] / total[1].clamp(min=1)).item()


def answer_prompts(
    prompts: list[str],
    adapter: str | Path | None = None,
    model: str | None = None,
    chat: bool = True,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    trust_remote_code: bool = False,
) -> list[dict]:
    """``[{"prompt", "answer"}]`` from a base model (``model``) and/or a run's adapter (``adapter``)."""
    from shardtune.artifacts.checkpoint import load_adapted_model
    from shardtune.models.loading import load_model

    # (before loading anything)
    if not math.isfinite(temperature):
        raise BadInput(f"--temperature: must be a finite number, got {temperature}")
    empty = next((i for i, p in enumerate(prompts) if not p.strip()), None)
    if empty is not None:
        raise BadInput(f"PROMPT: prompt {empty + 1} is empty; give the text to answer")
    if adapter is not None:
        lm, tokenizer, _ = load_adapted_model(
            adapter, base_model=model, trust_remote_code=trust_remote_code, base_option="--model"
        )
    elif model is not None:
        with named_as({"model.name": "--model"}):
            lm, tokenizer = load_model(model, trust_remote_code=trust_remote_code)
    else:
        raise BadInput("generate: give --adapter RUN_DIR, --model MODEL, or both")
    use_chat = chat and uses_chat(tokenizer, "auto")
    ids = [prompt_ids(Example(p, ""), tokenizer, use_chat) for p in prompts]
    check_context(lm.config, ids, max_new_tokens)
    answers = generate(lm, tokenizer, ids, max_new_tokens, temperature=temperature)
    return [{"prompt": p, "answer": a} for p, a in zip(prompts, answers, strict=True)]


def check_context(config, prompts: list[list[int]], max_new_tokens: int) -> None:
    """Every prompt and its answer fit in the model's context (``max_position_embeddings`` or
    GPT-2's ``n_positions``): past it a model with learned positions fails, and one with rotary
    positions answers from positions it never saw."""
    context = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if not isinstance(context, int):
        return
    for i, p in enumerate(prompts):
        if len(p) >= context:
            raise BadInput(f"PROMPT: prompt {i + 1} has {len(p)} tokens; the model's context is {context}")
        if len(p) + max_new_tokens > context:
            raise BadInput(
                f"--max-new-tokens: prompt {i + 1} has {len(p)} tokens, so at most {context - len(p)} new "
                f"tokens fit in the model's context of {context} (got {max_new_tokens})"
            )


def evaluate(
    run_dir: str | Path | None = None,
    model: str | None = None,
    base_model: str | None = None,
    data: str | Path | None = None,
    data_format: str = "auto",
    metric: str = "exact",
    samples: int | None = None,
    base: bool = False,
) -> dict:
    """Held-out loss, perplexity and an answer score of a run's adapter (``run_dir``: a shardtune run or
    checkpoint, or a PEFT LoRA adapter; ``base_model`` overrides its base) or of a plain or merged
    model (``model``). The examples: ``data`` (every record of a file; scored with ``metric`` when
    records have a completion), else the run's held-out examples (a builtin task scores exact match).
    ``base``: the base model too, adapter off."""
    from shardtune.artifacts.checkpoint import load_adapted_model
    from shardtune.models.loading import load_model

    if metric not in METRICS:
        raise BadInput(f"--metric: expected one of {', '.join(METRICS)}, got {metric!r}")
    if (run_dir is None) == (model is None):
        raise BadInput("eval: give a run or adapter directory, or --model NAME|DIR (not both)")
    if run_dir is None and data is None:
        raise BadInput("eval --model: give the examples with --data FILE")
    if model is not None and base:
        raise BadInput("--base: a plain model (--model) has no adapter to turn off; give a run for --base")
    if model is not None and base_model is not None:
        raise BadInput("--base-model: is a run's base; with --model, evaluate that model alone")
    if data is None and data_format != "auto":
        raise BadInput(
            f"--format {data_format}: applies to --data FILE only (a run's data has its own format)"
        )
    recipe = _run_recipe(Path(run_dir) if run_dir is not None else None, data)
    held, scored, settings = _examples(recipe, data, data_format, metric, samples)
    if metric != "exact" and not scored:
        raise BadInput(
            f"--metric {metric}: these examples have no completions to score (text records); "
            "only their loss is measured"
        )
    if run_dir is not None:
        lm, tokenizer, meta = load_adapted_model(run_dir, base_model=base_model)
        result = {"run_dir": str(run_dir), "method": meta["method"], "step": meta["step"]}
    else:
        with named_as({"model.name": "--model"}):
            lm, tokenizer = load_model(model)
        result = {"model": model}
    chat = uses_chat(tokenizer, recipe.data.chat_template if recipe else "auto")
    turns = recipe.data.assistant_turns if recipe else "all"
    features, _ = encode_all(held, tokenizer, settings["max_length"], chat, turns)
    if not features:  # a loss over no tokens is no number
        where = f"--data: {data}" if data is not None else f"the held-out examples of {run_dir}"
        raise BadInput(f"{where}: no example has a token to measure (empty texts or completions?)")
    result.update({"data": settings["source"], "metric": settings["metric"]})
    if "note" in settings:
        result["note"] = settings["note"]

    def measure() -> dict:
        loader = DataLoader(
            features, batch_size=settings["batch_size"], collate_fn=Collator(tokenizer.pad_token_id)
        )
        loss = heldout_loss(lm, loader) if features else float("nan")
        out = {"eval_loss": loss, "perplexity": math.exp(min(loss, 50)), "examples": len(features)}
        if scored:
            score = score_task(
                lm, tokenizer, held, chat, settings["max_new_tokens"], settings["batch_size"], metric=metric
            )
            out.update({"task_score": score.accuracy, "task_correct": score.correct, "scored": score.total})
            if settings["task"]:
                out["task"] = settings["task"]
        return out

    result["adapter" if run_dir is not None else "model_scores"] = measure()
    if base and run_dir is not None:
        with adapter_disabled(lm):
            result["base"] = measure()
    return result


def _run_recipe(run_dir: Path | None, data):
    """The recipe of a shardtune run (its held-out data and settings); None for a PEFT adapter or a plain model."""
    from shardtune.artifacts.checkpoint import RECIPE_FILE, read_adapter_config
    from shardtune.artifacts.peftio import is_peft_adapter
    from shardtune.recipe.schema import load_recipe

    if run_dir is None:
        return None
    if not run_dir.is_dir():
        raise BadInput(f"{run_dir}: no such run or adapter directory")
    if is_peft_adapter(run_dir):
        if data is None:
            raise BadInput(
                f"{run_dir}: a PEFT adapter holds no held-out data; give the examples with --data FILE"
            )
        return None
    read_adapter_config(run_dir)  # a run at all, before its recipe
    if not (run_dir / RECIPE_FILE).is_file():
        if data is None:
            raise BadInput(
                f"{run_dir}: no {RECIPE_FILE}; cannot tell which data to evaluate on (give --data FILE)"
            )
        return None
    return load_recipe(run_dir / RECIPE_FILE)


def _examples(recipe, data, data_format: str, metric: str, samples: int | None):
    """(examples, whether to score them, settings) for :func:`evaluate`."""
    from pydantic import ValidationError

    from shardtune.recipe.schema import DataSection, EvalSection, first_recipe_error

    if data is not None:
        raw = {"path": str(data), "format": data_format}
        try:
            section = DataSection.model_validate(raw)
        except ValidationError as e:
            raise BadInput(f"--format: {first_recipe_error(e, raw).problem}") from None
        with named_as({"data.path": "--data", "data": "--data"}):
            every = all_examples(section)
        held = every[:samples]
        scored = all(e.completion or e.messages for e in held) and any(e.prompt or e.messages for e in held)
        defaults = EvalSection()
        settings = {"source": str(data), "task": None, "max_length": 1024, "batch_size": defaults.batch_size}
        settings.update(max_new_tokens=defaults.max_new_tokens * 4, metric=metric if scored else None)
        if samples is not None and samples > len(every):
            settings["note"] = (
                f"--samples {samples}: {data} holds {len(every)} examples; evaluating on all of them"
            )
        return held, scored, settings
    if samples is not None and recipe.data.task is not None:
        recipe.data.eval_samples = samples  # generated items: as many as asked, never trained on
    _, every = read_examples(recipe.data)
    held = every[:samples]  # split-off data: never more than the run held out (the rest was trained on)
    if not held:
        raise BadInput(
            "eval: the run's recipe holds out no examples (data.eval_samples is 0); give --data FILE"
        )
    settings = {
        "source": recipe.data.describe_source(),
        "task": recipe.data.task,
        "max_length": recipe.data.max_length,
        "batch_size": recipe.eval.batch_size,
        "max_new_tokens": recipe.eval.max_new_tokens,
        "metric": metric if recipe.data.task else None,
    }
    if samples is not None and samples > len(every):
        settings["note"] = (
            f"--samples {samples}: the run held out {len(every)} examples (the rest were trained on); "
            "evaluating on all of them"
        )
    return held, recipe.data.task is not None, settings
