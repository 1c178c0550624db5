"""Generation and evaluation: greedy answers, exact-match task scores, held-out loss of a run."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from shardtune.adapters.model import adapter_disabled
from shardtune.data import Collator, Example, encode_all, load_examples, prompt_ids, uses_chat
from shardtune.errors import BadInput
from shardtune.tasks import exact_match


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
) -> TaskScore:
    """Exact match (first line of the greedy answer) against each example's completion."""
    prompts = [prompt_ids(e, tokenizer, chat) for e in examples]
    answers = generate(model, tokenizer, prompts, max_new_tokens, batch_size, synced=synced)
    samples = [
        {
            "prompt": e.prompt,
            "expected": e.completion.strip(),
            "answer": a.strip(),
            "correct": exact_match(a, e.completion),
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
    from shardtune.checkpoint import load_adapted_model
    from shardtune.models import load_model

    if adapter is not None:
        lm, tokenizer, _ = load_adapted_model(adapter, base_model=model, trust_remote_code=trust_remote_code)
    elif model is not None:
        lm, tokenizer = load_model(model, trust_remote_code=trust_remote_code)
    else:
        raise BadInput("generate: give --adapter RUN_DIR, --model MODEL, or both")
    use_chat = chat and uses_chat(tokenizer, "auto")
    ids = [prompt_ids(Example(p, ""), tokenizer, use_chat) for p in prompts]
    answers = generate(lm, tokenizer, ids, max_new_tokens, temperature=temperature)
    return [{"prompt": p, "answer": a} for p, a in zip(prompts, answers, strict=True)]


def evaluate_run(run_dir: str | Path, base: bool = False, samples: int | None = None) -> dict:
    """Held-out loss, perplexity and (for builtin tasks) exact-match score of a trained run."""
    from shardtune.checkpoint import RECIPE_FILE, load_adapted_model, read_adapter_config
    from shardtune.recipe import load_recipe

    run_dir = Path(run_dir)
    read_adapter_config(run_dir)  # a run at all, before its recipe
    recipe_path = run_dir / RECIPE_FILE
    if not recipe_path.is_file():
        raise BadInput(f"{run_dir}: no {RECIPE_FILE}; cannot tell which data to evaluate on")
    recipe = load_recipe(recipe_path)
    model, tokenizer, meta = load_adapted_model(run_dir)
    if samples is not None and recipe.data.task is not None:
        recipe.data.eval_samples = samples  # generated items: as many as asked, never trained on
    _, held = load_examples(recipe.data)
    held = held[:samples]  # split-off data: never more than the run held out (the rest was trained on)
    if not held:
        raise BadInput(f"{run_dir}: the recipe holds out no examples (data.eval_samples is 0)")
    chat = uses_chat(tokenizer, recipe.data.chat_template)
    features, _ = encode_all(held, tokenizer, recipe.data.max_length, chat)

    def measure() -> dict:
        loader = DataLoader(
            features, batch_size=recipe.eval.batch_size, collate_fn=Collator(tokenizer.pad_token_id)
        )
        loss = heldout_loss(model, loader)
        out = {"eval_loss": loss, "perplexity": math.exp(min(loss, 50)), "examples": len(features)}
        if recipe.data.task is not None:
            score = score_task(
                model, tokenizer, held, chat, recipe.eval.max_new_tokens, recipe.eval.batch_size
            )
            out.update(
                {"task": recipe.data.task, "task_score": score.accuracy, "task_correct": score.correct}
            )
        return out

    result = {"run_dir": str(run_dir), "method": meta["method"], "step": meta["step"], "adapter": measure()}
    if base:
        with adapter_disabled(model):
            result["base"] = measure()
    return result
