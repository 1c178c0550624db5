"""The training loop, top to bottom: recipe → model + adapter → data → AdamW on Accelerate → adapter on disk.

1. Prepare the run directory (refuse to clobber an earlier run unless ``output.overwrite``) and its log.
2. Seed everything; load the frozen base model and inject the adapter (only adapter parameters train).
3. Build the training / held-out token data and the loader (optionally score the base model).
4. AdamW + warm-up and cosine/linear/constant decay; Accelerate handles device, DDP, bf16 autocast
   and gradient accumulation; with ``train.strategy: fsdp`` the model is sharded first
   (:mod:`shardtune.fsdp`) and Accelerate prepares only the optimizer and the data.
5. Loop over optimizer steps: forward, backward, clip, step; log metrics (JSONL + progress); stop on
   NaN/inf; evaluate and checkpoint at the set intervals.
6. Held-out loss and (optionally) the tuned model's task score; write the final adapter
   (adapter.safetensors + adapter.json + recipe.yaml) and result.json into the run directory.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import DistributedType, set_seed
from torch.utils.data import DataLoader
from transformers import get_scheduler

from shardtune.adapters.model import adapter_disabled, adapter_state_dict, count_parameters, inject_adapter
from shardtune.checkpoint import (
    ADAPTER_CONFIG,
    attach_weights,
    list_checkpoints,
    load_training_state,
    resolve_resume,
    save_adapter,
    save_checkpoint,
    take_snapshot,
)
from shardtune.data import Collator, encode_all, load_examples, pack, uses_chat
from shardtune.errors import BadInput, Diverged, ShardtuneError, Terminated
from shardtune.evaluate import heldout_loss, score_task
from shardtune.fsdp import block_classes, full_tensor, shard_model
from shardtune.models import load_model
from shardtune.progress import Reporter
from shardtune.recipe import Recipe

log = logging.getLogger("shardtune")

SCHEDULES = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}


@dataclass
class TrainResult:
    run_dir: str
    method: str
    steps: int
    final_loss: float
    eval_loss: float | None
    trainable_parameters: int
    total_parameters: int
    truncated_examples: int
    seconds: float
    task_score_base: float | None = None
    task_score: float | None = None
    train_seconds: float = 0.0  # the optimizer-step loop alone (no loading, evaluation or scoring)


def prepare_run_dir(recipe: Recipe, resuming: bool, writes: bool) -> Path:
    """Every process checks that ``output.dir`` holds no run it would replace (so all stop alike);
    the one that ``writes`` (the main process) then clears old checkpoints and starts the metrics."""
    run_dir = Path(recipe.output.dir)
    if resuming:
        if writes:
            run_dir.mkdir(parents=True, exist_ok=True)
        return run_dir
    checkpoints = list_checkpoints(run_dir)
    if ((run_dir / ADAPTER_CONFIG).exists() or checkpoints) and not recipe.output.overwrite:
        raise BadInput(
            f"output.dir: {run_dir} already holds a run; choose another directory or "
            "--set output.overwrite=true to replace it"
        )
    if writes:
        for old in checkpoints:
            shutil.rmtree(old)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "metrics.jsonl").write_text("")
    return run_dir


def add_file_log(run_dir: Path, level: str) -> logging.Handler:
    handler = logging.FileHandler(run_dir / "train.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    handler.setLevel(level.upper())
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)
    return handler


class EpochSampler(torch.utils.data.Sampler):
    """A fresh permutation per epoch from ``seed + epoch``: the data order is a pure function of
    (seed, epoch), so a resumed run sees exactly the batches the killed one would have seen."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        gen = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.n, generator=gen).tolist())

    def __len__(self) -> int:
        return self.n


class StopFlag:
    """Set by SIGTERM: the loop writes a checkpoint at the end of the current step and exits."""

    def __init__(self):
        self.raised = False
        self._previous = None

    def __enter__(self):
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._set)
        return self

    def _set(self, *_):
        self.raised = True

    def __exit__(self, *exc):
        import signal

        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def train(recipe: Recipe, reporter: Reporter | None = None, resume: str | None = None) -> TrainResult:
    """Train as the recipe says. ``resume``: ``"latest"`` (the run's newest checkpoint) or a checkpoint path."""
    reporter = reporter or Reporter(quiet=True)
    cfg = recipe.train
    started = time.perf_counter()

    # 1-2. Run directory, accelerator, seed, model with adapter.
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    # Several processes on a machine without an accelerator (torchrun on CPUs): connect them over gloo.
    cpu_only = launched > 1 and not _has_accelerator()
    rendezvous = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_PORT")
    environment = {key: os.environ.get(key) for key in rendezvous}  # Accelerate writes these
    try:
        accelerator = Accelerator(
            mixed_precision="bf16" if cfg.precision == "bf16" else "no",
            cpu=cfg.cpu or cpu_only,
            gradient_accumulation_steps=cfg.grad_accum,
        )
    except (ValueError, RuntimeError) as e:
        # Half-built: leave the state and environment as they were, so a later run starts afresh.
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
        for key, value in environment.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if launched == 1:
            raise
        first = str(e).strip().splitlines()[0]
        raise BadInput(f"{launched} processes were launched but cannot connect: {first}") from None
    main = accelerator.is_main_process
    if accelerator.num_processes != launched:
        raise BadInput(
            f"{launched} processes were launched but they are not connected (Accelerate sees "
            f"{accelerator.num_processes}); on CPUs set ACCELERATE_USE_CPU=1 or use shardtune train --nproc"
        )
    if accelerator.distributed_type == DistributedType.FSDP:
        raise BadInput(
            "the launcher turned on Accelerate's FSDP plugin; shardtune shards through the recipe: "
            "set train.strategy: fsdp and launch without FSDP options"
        )
    # Several processes, each holding only its shards: collectives (gathering a checkpoint,
    # generating for a score) must then run on every process, not only on the main one.
    fsdp = cfg.strategy == "fsdp" and accelerator.num_processes > 1
    resume_from = resolve_resume(Path(recipe.output.dir), resume)
    if resume == "latest" and resume_from is None:
        raise BadInput(f"--resume: {recipe.output.dir} has no checkpoint to resume from")
    run_dir = prepare_run_dir(recipe, resuming=resume_from is not None, writes=main)
    handler = add_file_log(run_dir, recipe.logging.level) if main else None
    if not main:
        reporter = Reporter(quiet=True)
    stop = StopFlag().__enter__()  # SIGTERM → checkpoint and exit; restored in `finally`
    try:
        set_seed(cfg.seed)
        model, tokenizer = load_model(
            recipe.model.name, recipe.model.dtype, recipe.model.trust_remote_code, recipe.model.revision
        )
        targets = inject_adapter(model, recipe.adapter)
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.config.use_cache = False
        trainable, total = count_parameters(model)
        reporter.info(
            f"{recipe.adapter.method} on {recipe.model.name}: {len(targets)} layers adapted, "
            f"{trainable:,} trainable parameters ({100 * trainable / total:.3f}% of {total:,})"
        )
        if resume_from is not None:
            attach_weights(model, resume_from)
        if cfg.strategy == "fsdp":
            block_classes(model, cfg.fsdp.wrap)  # a wrong train.fsdp.wrap fails here, on one process too
            if not fsdp:
                reporter.warn("train.strategy: fsdp with one process: nothing to shard, training unsharded")

        # 3. Data (and the base model's task score, before any update).
        chat = uses_chat(tokenizer, recipe.data.chat_template)
        train_examples, eval_examples = load_examples(recipe.data)
        train_features, n_truncated = encode_all(train_examples, tokenizer, recipe.data.max_length, chat)
        eval_features, _ = encode_all(eval_examples, tokenizer, recipe.data.max_length, chat)
        if not train_features:
            raise BadInput("data: no training example has a token to learn from after truncation")
        if n_truncated:
            reporter.warn(f"{n_truncated} of {len(train_examples)} examples truncated to data.max_length")
        if recipe.data.packing:
            train_features = pack(train_features, recipe.data.max_length)
        reporter.info(
            f"data: {len(train_examples)} training examples ({len(train_features)} rows), "
            f"{len(eval_features)} held out{', chat template' if chat else ''}"
        )
        collate = Collator(tokenizer.pad_token_id)
        sampler = EpochSampler(len(train_features), cfg.seed)
        loader = DataLoader(
            train_features,
            batch_size=cfg.batch_size,
            sampler=sampler,
            collate_fn=collate,
            # Its own generator: creating a loader iterator must not draw from the global RNG (which
            # drives dropout), or a resumed run would drift from an uninterrupted one.
            generator=torch.Generator().manual_seed(cfg.seed),
            drop_last=len(train_features) >= cfg.batch_size * accelerator.num_processes,
        )
        eval_loader = DataLoader(eval_features, batch_size=recipe.eval.batch_size, collate_fn=collate)

        # 4. Sharding (FSDP), optimizer and schedule.
        if fsdp:
            if getattr(recipe.adapter, "init", None) == "gradient" and resume_from is None:
                # LoRS init needs whole dense gradients: each process computes them on its full copy.
                model.to(accelerator.device)
                _gradient_init(accelerator, model, train_features, collate, recipe, reporter)
            layout = shard_model(model, cfg.fsdp, accelerator.device, bf16=cfg.precision == "bf16")
            reporter.info(
                f"FSDP over {layout['processes']} processes: {layout['units']} units "
                f"({', '.join(layout['classes'])}) + the root, which holds the shared adapter stores "
                f"({layout['root_store_tensors']} tensors); each process holds "
                f"{100 * layout['local_bytes'] / layout['whole_bytes']:.1f}% of the parameters "
                f"({layout['local_bytes'] / 2**20:.1f} of {layout['whole_bytes'] / 2**20:.1f} MiB)"
            )
        updates_per_epoch = max(1, len(loader) // accelerator.num_processes // cfg.grad_accum)
        total_steps = cfg.max_steps or max(1, math.ceil(updates_per_epoch * cfg.epochs))
        params = [p for p in model.parameters() if p.requires_grad]  # after sharding: the shards
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=cfg.betas)
        scheduler = get_scheduler(
            SCHEDULES[cfg.schedule],
            optimizer,
            num_warmup_steps=cfg.warmup_steps,
            num_training_steps=total_steps,
        )
        if fsdp:  # already sharded and placed; Accelerate must not wrap it again
            optimizer, loader, eval_loader = accelerator.prepare(optimizer, loader, eval_loader)
        else:
            model, optimizer, loader, eval_loader = accelerator.prepare(model, optimizer, loader, eval_loader)
        step, epoch, skip = 0, 0, 0
        if resume_from is not None:
            counters = load_training_state(resume_from, optimizer)
            step, epoch, skip = counters["step"], counters["epoch"], counters["batch_in_epoch"]
            for _ in range(step):
                scheduler.step()
            reporter.info(f"resumed from {resume_from} at step {step}")
        elif getattr(recipe.adapter, "init", None) == "gradient" and not fsdp:
            _gradient_init(accelerator, model, train_features, collate, recipe, reporter)
        scores: dict[str, float] = {}
        if recipe.eval.score_base and (main or fsdp) and resume_from is None:
            with adapter_disabled(accelerator.unwrap_model(model)) as base:
                scores["task_score_base"] = _score(
                    base, tokenizer, eval_examples, chat, recipe, reporter, "base model", synced=fsdp
                )

        # 5. Loop over optimizer steps.
        model.train()
        loop_started = time.perf_counter()
        reporter.start(total_steps)
        # Per-step bookkeeping stays on the device (no host sync in the hot path); it is read at log
        # steps, before checkpoints and at the end.
        device = accelerator.device
        loss_sum, loss_count, last_log = torch.zeros((), device=device), 0, time.perf_counter()
        tokens = torch.zeros((), dtype=torch.long, device=device)
        first_bad_step = torch.zeros((), dtype=torch.long, device=device)  # first step with a non-finite loss
        first_bad_loss = torch.zeros((), device=device)
        final_loss, eval_loss = float("nan"), None

        def raise_if_diverged() -> None:
            bad = int(accelerator.reduce(first_bad_step, reduction="max").item())
            if bad:
                raise Diverged(
                    f"loss became {first_bad_loss.item()} at step {bad}; lower train.lr or check the data "
                    f"(last good checkpoint: {_last_checkpoint(run_dir)})"
                )

        while step < total_steps:
            # The prepared loader re-sets its sampler's epoch from its own counter on every pass:
            # set both, so a resumed run (whose loader starts counting at 0) sees the right order.
            sampler.set_epoch(epoch)
            if hasattr(loader, "set_epoch"):
                loader.set_epoch(epoch)
            batches = accelerator.skip_first_batches(loader, skip) if skip else loader
            for batch_in_epoch, batch in enumerate(batches, start=skip + 1):
                with accelerator.accumulate(model):
                    if fsdp:  # reduce-scatter the gradients only on the micro-batch that steps
                        model.set_requires_gradient_sync(accelerator.sync_gradients)
                    loss = model(**batch).loss
                    accelerator.backward(loss)
                    grad_norm = None
                    if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                        grad_norm = accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                loss_sum += loss.detach().float()
                loss_count += 1
                tokens += batch["attention_mask"].sum()
                if not accelerator.sync_gradients:
                    continue
                scheduler.step()
                step += 1
                newly_bad = ~torch.isfinite(loss.detach()) & (first_bad_step == 0)
                first_bad_step.masked_fill_(newly_bad, step)
                first_bad_loss = torch.where(newly_bad, loss.detach().float(), first_bad_loss)
                counters = {"epoch": epoch, "batch_in_epoch": batch_in_epoch}

                is_log_step = step % recipe.logging.every == 0 or step == total_steps or step == 1
                is_save_step = bool(cfg.save_every) and step % cfg.save_every == 0 and step < total_steps
                # SIGTERM must be seen by every process at the same step: one collective at log/save
                # steps when there are several processes, a plain flag read otherwise.
                stopping = stop.raised
                if accelerator.num_processes > 1:
                    stopping = (is_log_step or is_save_step) and _any_process(accelerator, stop.raised)
                if is_log_step or is_save_step or stopping:
                    raise_if_diverged()  # before anything is logged or written
                if is_log_step:
                    mean_loss = accelerator.reduce(loss_sum / loss_count, reduction="mean").item()
                    loss_sum.zero_()
                    loss_count = 0
                    final_loss = mean_loss
                    now = time.perf_counter()
                    metrics = {
                        "step": step,
                        "loss": mean_loss,
                        "lr": scheduler.get_last_lr()[0],
                        "grad_norm": float(full_tensor(grad_norm)) if grad_norm is not None else None,
                        "tokens_per_s": int(tokens) * accelerator.num_processes / max(now - last_log, 1e-9),
                    }
                    tokens.zero_()
                    last_log = now
                    if recipe.eval.every and step % recipe.eval.every == 0 and len(eval_features):
                        eval_loss = heldout_loss(model, eval_loader, accelerator_sum(accelerator))
                        metrics["eval_loss"] = eval_loss
                    if main:
                        with open(run_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
                            f.write(json.dumps(metrics) + "\n")
                    reporter.step(step, {k: v for k, v in metrics.items() if v is not None}, log_line=True)
                else:
                    reporter.step(step, {}, log_line=False)

                if is_save_step or stopping:
                    accelerator.wait_for_everyone()
                    if main or fsdp:  # under FSDP every process gathers its shards
                        snapshot = take_snapshot(accelerator.unwrap_model(model), optimizer)
                    if main:
                        ckpt = save_checkpoint(
                            accelerator.unwrap_model(model),
                            recipe,
                            run_dir,
                            step,
                            cfg.keep_checkpoints,
                            counters=counters,
                            snapshot=snapshot,
                        )
                    if stopping:
                        raise Terminated(
                            f"stopped by SIGTERM at step {step}; checkpoint written to {run_dir / ckpt.name if main else run_dir}; "
                            "continue with: shardtune train RECIPE --resume"
                        )
                if step >= total_steps:
                    break
            epoch, skip = epoch + 1, 0
        reporter.stop()
        raise_if_diverged()
        train_seconds = time.perf_counter() - loop_started

        if len(eval_features):
            eval_loss = heldout_loss(model, eval_loader, accelerator_sum(accelerator))
            reporter.info(f"eval loss {eval_loss:.4f} (perplexity {math.exp(min(eval_loss, 50)):.2f})")
        if recipe.eval.score and (main or fsdp):
            tuned = accelerator.unwrap_model(model)
            scores["task_score"] = _score(
                tuned, tokenizer, eval_examples, chat, recipe, reporter, "tuned model", synced=fsdp
            )

        # 6. Final adapter.
        accelerator.wait_for_everyone()
        tensors = adapter_state_dict(accelerator.unwrap_model(model)) if main or fsdp else None
        if main:
            save_adapter(accelerator.unwrap_model(model), recipe, run_dir, step, tensors)
        result = TrainResult(
            run_dir=str(run_dir),
            method=recipe.adapter.method,
            steps=step,
            final_loss=final_loss,
            eval_loss=eval_loss,
            trainable_parameters=trainable,
            total_parameters=total,
            truncated_examples=n_truncated,
            seconds=time.perf_counter() - started,
            train_seconds=train_seconds,
            **scores,
        )
        if main:
            (run_dir / "result.json").write_text(json.dumps(asdict(result), indent=2) + "\n")
        reporter.info(f"adapter written to {run_dir}")
        return result
    except ShardtuneError as e:
        log.error("error: %s", e)
        raise
    except Exception:
        log.exception("training failed")  # the traceback goes to train.log; the user gets one line
        raise
    finally:
        stop.__exit__(None, None, None)
        reporter.stop()
        if accelerator.num_processes == 1:
            # Let a later run in this process (tests, `compare`) pick its own precision/device.
            AcceleratorState._reset_state(reset_partial_state=True)
            GradientState._reset_state()
        if handler is not None:
            log.removeHandler(handler)
            handler.close()


def _gradient_init(accelerator, model, features, collate, recipe: Recipe, reporter: Reporter) -> None:
    """LoRS: A from the SVD of the dense gradient on the first training examples (same on every rank)."""
    from shardtune.adapters.lors import gradient_init

    first = DataLoader(
        features[: recipe.adapter.init_samples], batch_size=recipe.train.batch_size, collate_fn=collate
    )
    batches = ({k: v.to(accelerator.device) for k, v in b.items()} for b in first)
    seen = gradient_init(accelerator.unwrap_model(model), batches, recipe.adapter)
    if accelerator.num_processes > 1:
        import torch.distributed as dist

        for p in model.parameters():
            if p.requires_grad:
                dist.broadcast(p.data, src=0)
    reporter.info(f"adapter A initialised from the dense gradient of {seen} examples (LoRS init)")


def _has_accelerator() -> bool:
    accelerator = getattr(torch, "accelerator", None)
    return accelerator.is_available() if accelerator is not None else torch.cuda.is_available()


def _any_process(accelerator: Accelerator, flag: bool) -> bool:
    if accelerator.num_processes == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(t, reduction="sum").item() > 0)


def accelerator_sum(accelerator: Accelerator):
    return lambda t: accelerator.reduce(t, reduction="sum")


def _score(
    model, tokenizer, examples, chat, recipe: Recipe, reporter: Reporter, who: str, synced: bool = False
) -> float:
    """Exact-match score; ``synced``: every process generates the same answers in lockstep (FSDP)."""
    if recipe.data.task is None:
        raise BadInput("eval.score: exact-match scoring needs a builtin task (data.task)")
    if not examples:
        raise BadInput("eval.score: no held-out examples to score (data.eval_samples is 0)")
    result = score_task(
        model, tokenizer, examples, chat, recipe.eval.max_new_tokens, recipe.eval.batch_size, synced=synced
    )
    reporter.info(
        f"{who}: exact match {result.correct}/{result.total} = {100 * result.accuracy:.1f}% on held-out "
        f"{recipe.data.task} items (e.g. {result.samples[0]['prompt']!r} → {result.samples[0]['answer']!r})"
    )
    return result.accuracy


def _last_checkpoint(run_dir: Path) -> str:
    found = list_checkpoints(run_dir)
    return str(found[-1]) if found else "none written yet"
