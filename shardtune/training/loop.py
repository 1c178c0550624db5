"""The training loop, top to bottom, as named phases.

    train(recipe)
      connect_processes         Accelerate: one process, or the launched ones (DDP; FSDP or ZeRO shards over them)
      Trainer.run_directory     output.dir checked and locked (shardtune.training.rundir), SIGTERM → checkpoint + exit,
                                heartbeats (shardtune.training.peers): a lost process stops the others, naming it
      Trainer.read_data         the training and held-out examples, read and checked before any model loads
      Trainer.setup_model       the frozen base model with the adapter (resumed: the checkpoint's weights);
                                train.compile: its decoder blocks compiled (on the first step)
      Trainer.setup_data        examples → token rows → loaders
      Trainer.start_run         resumed: the checkpoint checked against model and data; then the run
                                directory is written: replaced or created, recipe.yaml, train.log
      Trainer.setup_optimizer   LoRS gradient init, FSDP sharding, AdamW + schedule, Accelerate's prepare
                                (strategy: deepspeed: the ZeRO engine, shardtune.training.deepspeed)
      Trainer.restore_or_score  resumed: optimizer, RNG, data position; fresh: the base model's task score
      Trainer.loop              each optimizer step: train_step (per micro-batch), then at_interval
                                (log, evaluate and judge: best/, early stopping; checkpoint, SIGTERM) when due
      Trainer.finish            held-out loss and task score, final adapter, result.json

Accelerate handles the device, DDP, bf16 autocast and gradient accumulation; with
``train.strategy: fsdp`` the model is sharded by :mod:`shardtune.training.fsdp` and Accelerate prepares only
the optimizer and the data. Everything a checkpoint needs to resume exactly (adapter, optimizer,
RNG states, data position) is in :mod:`shardtune.artifacts.checkpoint`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shlex
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import DistributedType, InitProcessGroupKwargs, broadcast, set_seed
from torch.utils.data import DataLoader

from shardtune.adapters import METHODS
from shardtune.adapters.base import parameter_role
from shardtune.adapters.model import (
    adapter_disabled,
    adapter_named_parameters,
    adapter_state_dict,
    inject_adapter,
    trainable_share,
)
from shardtune.artifacts.checkpoint import (
    BEST_DIR,
    RECIPE_FILE,
    TRAINER_STATE,
    attach_weights,
    check_checkpoint,
    check_optimizer_fits,
    check_same_run,
    init_adapter_from,
    list_checkpoints,
    load_training_state,
    read_trainer_state,
    resolve_resume,
    save_adapter,
    save_best,
    save_checkpoint,
    take_snapshot,
)
from shardtune.core.errors import (
    BadInput,
    Diverged,
    Interrupted,
    MachineError,
    ProcessLost,
    RecipeError,
    ShardtuneError,
    StopSignal,
    Terminated,
    environment_failure,
    error_chain,
    first_line,
    hub_answer_failure,
)
from shardtune.core.fileio import atomic_write_text
from shardtune.core.limits import MAX_STEPS
from shardtune.core.progress import Reporter
from shardtune.data.examples import (
    Collator,
    Example,
    encode_all,
    model_inputs,
    pack,
    real_tokens,
    uses_chat,
)
from shardtune.data.streaming import ExampleStream, StreamedRows, read_examples
from shardtune.data.templates import template_text
from shardtune.data.tokenized import encode_cached
from shardtune.inspection.evaluate import heldout_loss, score_task
from shardtune.models import quant
from shardtune.models.dtensor import full_tensor, is_sharded
from shardtune.models.dtypes import DTYPES
from shardtune.models.loading import cache_dir, check_packed_examples_stay_apart, load_model
from shardtune.recipe.schema import Recipe, TrainSection
from shardtune.training.fsdp import block_classes, shard_model
from shardtune.training.peers import PeerWatch, collective_timeout, who
from shardtune.training.rundir import METRICS_FILE, RESULT_FILE, RunDirectory, metrics_lines
from shardtune.training.selection import Selection

log = logging.getLogger("shardtune")


@dataclass
class TrainResult:
    run_dir: str
    method: str
    steps: int
    final_loss: float | None  # None when no step was logged (JSON has no NaN)
    eval_loss: float | None
    trainable_parameters: int
    total_parameters: int
    truncated_examples: int
    seconds: float
    task_score_base: float | None = None
    task_score: float | None = None
    train_seconds: float = 0.0  # the optimizer-step loop alone (no loading, evaluation or scoring)
    compile_seconds: float = 0.0  # train.compile: the first optimizer step (compiling), not in train_seconds
    base_bytes: int = 0  # the frozen base's parameters as held (quantized layers as codes + scales)
    base_bytes_unquantized: int = 0  # the same in model.dtype, unquantized
    best: dict | None = None  # output.keep_best: {"dir", "step", "metric", "value"}
    stopped_early: str | None = None  # train.early_stopping: why the run ended before its last step


def train(recipe: Recipe, reporter: Reporter | None = None, resume: str | Path | None = None) -> TrainResult:
    """Train as the recipe says. ``resume``: ``"latest"`` (the run's newest checkpoint) or a checkpoint path."""
    started = time.perf_counter()
    with connect_processes(recipe.train) as accelerator:
        trainer = Trainer(recipe, accelerator, reporter or Reporter(quiet=True))
        with trainer.run_directory(resume):
            trainer.read_data()
            trainer.setup_model()
            trainer.setup_data()
            trainer.start_run()
            trainer.setup_optimizer()
            trainer.restore_or_score()
            trainer.loop()
            return trainer.finish(started)


# ---------------------------------------------------------------------------------------------------
# Processes


# What Accelerate (and a one-process DeepSpeed world) write into the environment.
RENDEZVOUS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@contextmanager
def connect_processes(cfg: TrainSection) -> Iterator[Accelerator]:
    """An Accelerator over the launched processes (gloo on CPUs); on one process its global state is
    reset afterwards (and the environment it wrote put back), so a later run in the same process
    (tests, `compare`) picks its own settings."""
    with _environment_kept(), _deepspeed_world(cfg):
        accelerator = _accelerator(cfg)
        try:
            yield accelerator
        finally:
            if accelerator.num_processes == 1:
                AcceleratorState._reset_state(reset_partial_state=True)
                GradientState._reset_state()


@contextmanager
def _environment_kept() -> Iterator[None]:
    """Accelerate's settings (``ACCELERATE_*``) and the rendezvous as they were before the run, after it."""
    before = {k: v for k, v in os.environ.items() if k.startswith("ACCELERATE_") or k in RENDEZVOUS}
    try:
        yield
    finally:
        if int(before.get("WORLD_SIZE", "1")) == 1:  # (a launched process ends with its run)
            for key in [k for k in os.environ if k.startswith("ACCELERATE_") or k in RENDEZVOUS]:
                if key not in before:
                    del os.environ[key]
            os.environ.update(before)


@contextmanager
def _deepspeed_world(cfg: TrainSection) -> Iterator[None]:
    """``strategy: deepspeed``: DeepSpeed always runs in a process group, so an unlaunched run is a
    world of one (on 127.0.0.1), closed afterwards; and DeepSpeed, not Accelerate's CPU mode, picks
    the device (a launch on CPUs asks Accelerate for its CPU mode, which would turn DeepSpeed off)."""
    if cfg.strategy != "deepspeed":
        yield
        return
    from shardtune.training import deepspeed as zero

    zero.require_deepspeed()
    os.environ.pop("ACCELERATE_USE_CPU", None)
    alone = "WORLD_SIZE" not in os.environ
    if alone:
        os.environ.update(
            RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1"
        )
        os.environ["MASTER_PORT"] = str(_free_port())
    try:
        yield
    finally:
        import torch.distributed as dist

        if alone and dist.is_initialized():  # (DeepSpeed's, which forgets the groups it made of it too)
            import deepspeed.comm

            deepspeed.comm.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _accelerator(cfg: TrainSection) -> Accelerator:
    """Accelerate's state for this process; a launch that cannot connect is a one-line error."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    deepspeed = cfg.strategy == "deepspeed"
    # Several processes on a machine without an accelerator (torchrun on CPUs): connect them over
    # gloo (DeepSpeed: on its CPU accelerator, which Accelerate must be told is gloo's).
    cpu_only = launched > 1 and not _has_accelerator()
    connect = {"timeout": collective_timeout(cfg.timeout_s)}
    if deepspeed and not _has_accelerator():
        connect["backend"] = "gloo"
    environment = {key: os.environ.get(key) for key in RENDEZVOUS}  # Accelerate writes these
    try:
        with _prints_to_log(deepspeed):
            accelerator = Accelerator(
                # (DeepSpeed: an fp32 engine with autocast around the forward, shardtune.training.deepspeed)
                mixed_precision="bf16" if cfg.precision == "bf16" and not deepspeed else "no",
                cpu=(cfg.cpu or cpu_only) and not deepspeed,
                gradient_accumulation_steps=cfg.grad_accum,
                deepspeed_plugin=_deepspeed_plugin(cfg) if deepspeed else None,
                # How long a collective may wait for the other processes (gloo and NCCL alike): longer
                # than the heartbeats take to name a lost machine (shardtune.training.peers), so that they do.
                kwargs_handlers=[InitProcessGroupKwargs(**connect)],
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
        if launched == 1 and not deepspeed:
            raise
        first = str(e).strip().splitlines()[0]
        if launched == 1:
            raise BadInput(f"train.strategy: deepspeed could not start: {first}") from None
        raise BadInput(f"{launched} processes were launched but cannot connect: {first}") from None
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
    if deepspeed:  # (the base loads whole: shardtune.training.deepspeed.load_whole)
        from shardtune.training.deepspeed import load_whole

        load_whole()
    if (accelerator.distributed_type == DistributedType.DEEPSPEED) != deepspeed:
        raise BadInput(
            "the launcher turned on Accelerate's DeepSpeed plugin; shardtune picks DeepSpeed through the "
            "recipe: set train.strategy: deepspeed and launch without DeepSpeed options"
            if not deepspeed
            else f"train.strategy: deepspeed did not start DeepSpeed (Accelerate runs {accelerator.distributed_type})"
        )
    return accelerator


def _prints_to_log(deepspeed: bool):
    from contextlib import nullcontext

    if not deepspeed:
        return nullcontext()
    from shardtune.training.deepspeed import prints_to_log

    return prints_to_log()


def _deepspeed_plugin(cfg: TrainSection):
    from shardtune.training.deepspeed import deepspeed_plugin

    return deepspeed_plugin(cfg)


def _has_accelerator() -> bool:
    accelerator = getattr(torch, "accelerator", None)
    return accelerator.is_available() if accelerator is not None else torch.cuda.is_available()


def _any_process(accelerator: Accelerator, flag: bool) -> bool:
    """True on every process when ``flag`` is true on any (a collective with several processes)."""
    if accelerator.num_processes == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(t, reduction="sum").item() > 0)


def accelerator_sum(accelerator: Accelerator):
    return lambda t: accelerator.reduce(t, reduction="sum")


def _compiler_failure(error: BaseException) -> str | None:
    """What torch.compile's stack (dynamo, inductor) failed on, when it did: no working C++ compiler,
    a backend that does not build here, ...; None when the error came from elsewhere."""
    for e in error_chain(error):
        module = type(e).__module__ or ""
        if module.startswith(("torch._inductor", "torch._dynamo")):
            return (
                f"torch.compile failed on this machine ({type(e).__name__}: {first_line(e)}); set "
                "train.compile: false, or give it what it needs (on CPUs a working C++ compiler: g++, or "
                "CXX=/path/to/compiler)"
            )
    return None


def _collective_failed(error: BaseException) -> bool:
    """A collective (or the store behind it) failed: a peer may be gone. gloo reports a closed
    connection or a timeout as a RuntimeError naming itself; NCCL and the store raise DistError."""
    import torch.distributed as dist

    text = str(error).lower()
    return isinstance(error, dist.DistError) or (
        isinstance(error, RuntimeError) and ("gloo" in text or "nccl" in text)
    )


# ---------------------------------------------------------------------------------------------------
# SIGTERM and the learning rate


def lr_factor(done: int, warmup: int, total: int, schedule: str, floor: float = 0.0) -> float:
    """The learning rate of optimizer step ``done + 1`` as a share of ``train.lr``.

    Warm-up: step k of the first W rises linearly to k/W (the first step already learns); then, with
    progress p = (done − W) / (total − W) and ``floor`` = min_lr / lr, ``cosine`` falls as
    floor + (1 − floor)·½(1 + cos πp), ``linear`` as floor + (1 − floor)·(1 − p), both reaching the
    floor after the last step; ``constant`` stays at 1.
    """
    if done < warmup:
        return (done + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (done - warmup) / max(1, total - warmup)
    if schedule == "linear":
        return floor + (1.0 - floor) * max(0.0, 1.0 - progress)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def adamw(params: list, lr: float, weight_decay: float, betas, sharded: bool = False):
    """AdamW over the adapter's parameters (tensors, or param groups as :func:`param_groups` makes them:
    what torch's optimizers take): torch's fused kernel (one pass over every tensor, not a dozen small
    ops per tensor) where it applies, i.e. unsharded parameters on CPU or CUDA; the default
    implementation for FSDP's sharded ones. Same update rule either way."""
    tensors = [p for item in params for p in (item["params"] if isinstance(item, dict) else [item])]
    fused = not sharded and bool(tensors) and all(p.device.type in ("cpu", "cuda") for p in tensors)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=betas, fused=fused or None)


def make_optimizer(params: list, cfg: TrainSection, sharded: bool = False):
    """``train.optimizer`` over ``params`` (param groups), at ``train.lr`` (the schedule sets
    each step's rate): torch's AdamW (:func:`adamw`) or Adafactor, or bitsandbytes' 8-bit AdamW."""
    if cfg.optimizer == "adamw":
        return adamw(params, cfg.lr, cfg.weight_decay, cfg.betas, sharded=sharded)
    if cfg.optimizer == "adafactor":
        return torch.optim.Adafactor(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise RecipeError(
            "train.optimizer", f"{cfg.optimizer} needs bitsandbytes: pip install 'shardtune[quant]'"
        ) from None
    # (paged on the CPU: bitsandbytes falls back to unpaged, with a warning that goes to train.log)
    kind = bnb.optim.PagedAdamW8bit if cfg.optimizer == "paged_adamw_8bit" else bnb.optim.AdamW8bit
    return kind(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)


def param_groups(named: list[tuple[str, torch.nn.Parameter]], cfg: TrainSection, method: str) -> list:
    """The trainable parameters as the optimizer takes them: one group in the model's order when every
    role learns alike (the optimizer's own defaults), else one group per role (sorted by name) with its
    ``lr_scale`` (a multiple of the scheduled rate: the method's paper, ``train.lr_ratio_b``,
    ``train.param_groups``) and weight decay. A role the recipe names that this method does not have
    is one line."""
    roles: dict[str, list] = {}
    for name, p in named:
        roles.setdefault(parameter_role(name), []).append(p)
    scales = {**METHODS[method].lr_scales}
    if cfg.lr_ratio_b is not None:
        scales["B"] = cfg.lr_ratio_b
    decays = {}
    asked = {f"param_groups.{role}": role for role in cfg.param_groups}
    if cfg.lr_ratio_b is not None:
        asked["lr_ratio_b"] = "B"
    for key, role in asked.items():
        if role not in roles:
            raise RecipeError(
                f"train.{key}", f"{method} has no {role} parameters (its roles: {', '.join(sorted(roles))})"
            )
    for role, group in cfg.param_groups.items():
        if group.lr_scale is not None:
            scales[role] = group.lr_scale
        if group.weight_decay is not None:
            decays[role] = group.weight_decay
    if not any(role in scales or role in decays for role in roles):
        return [{"params": [p for _, p in named]}]
    return [
        {
            "params": roles[role],
            "role": role,
            "lr_scale": scales.get(role, 1.0),
            "lr": cfg.lr * scales.get(role, 1.0),
            "weight_decay": decays.get(role, cfg.weight_decay),
        }
        for role in sorted(roles)
    ]


def compile_blocks(model: torch.nn.Module, reset: bool = True) -> list[str]:
    """``train.compile``: ``torch.compile`` each decoder block in place (``Module.compile``: the
    parameter names stay those of the model, so checkpoints and exports do not change). Identical
    blocks share one compiled graph, so compiling costs about one block, not the whole model. The
    blocks are the model's ``_no_split_modules`` classes (those FSDP would wrap); the names of the
    classes compiled are returned."""
    classes = tuple(block_classes(model, None, key="train.compile"))
    on_cpu = any(p.device.type == "cpu" for p in model.parameters())
    if on_cpu and not any(shutil.which(c) for c in (os.environ.get("CXX") or "c++", "g++", "clang++")):
        raise RecipeError(
            "train.compile", "compiling on the CPU needs a C++ compiler; none found (install g++ or set CXX)"
        )
    # A fresh start: graphs compiled for an earlier run in this process (`shardtune compare`, a
    # notebook) would count against dynamo's recompile limit and could leave these blocks uncompiled.
    if reset:
        torch._dynamo.reset()
    for module in model.modules():
        if isinstance(module, classes):
            module.compile()
    return [c.__name__ for c in classes]


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """``train.gradient_checkpointing``: transformers' activation checkpointing of every decoder block
    (non-reentrant), and no key/value cache. transformers 5 renamed the switch (the old name warns);
    4.x has only the old one."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False


class StopFlag:
    """SIGTERM. Inside the loop (:attr:`in_loop`) it sets :attr:`raised`: the loop writes a checkpoint
    at the end of the current step and exits. Anywhere else (loading the model or the data, a hub
    download, the base model's score, the final evaluation) there is no step to finish: it raises
    :class:`Terminated` at once, naming the phase and the last checkpoint (``describe()``), so that
    a scheduler's notice ends the run within seconds, not after minutes of work it would lose anyway.

    Leaving with an error in one of several processes, SIGTERM stays caught: the process is ending
    and about to say why (its first process speaks for each machine), and a SIGTERM that comes late
    (the launcher's copy of a cluster's signal, or torch's agent stopping the processes once one has
    left) must not kill it before it has. On success, or in a single process, the previous handler
    comes back."""

    def __init__(self, several_processes: bool = False, describe: Callable[[], str] | None = None):
        self.raised = False
        self.in_loop = False
        self.leaving = False  # an error is on its way out: a late SIGTERM must not replace it
        self.several_processes = several_processes
        self.describe = describe or (lambda: "")
        self._previous = None

    def __enter__(self) -> StopFlag:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._set)
        return self

    def _set(self, *_):
        already = self.raised
        self.raised = True
        if not self.in_loop and not self.leaving and not already:
            raise StopSignal(f"stopped by SIGTERM {self.describe()}")

    def __exit__(self, error_type, *_) -> None:
        self.leaving = True
        if self._previous is not None and not (error_type is not None and self.several_processes):
            signal.signal(signal.SIGTERM, self._previous)


# ---------------------------------------------------------------------------------------------------
# Data


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


@dataclass
class TrainingData:
    """The run's token rows and their loaders (before Accelerate prepares them)."""

    train_rows: list[dict]  # (streamed: empty, the rows come from ``stream``)
    eval_rows: list[dict]
    eval_examples: list[Example]
    chat: bool
    truncated: int
    collate: Collator
    sampler: EpochSampler | None
    loader: DataLoader | None
    eval_loader: DataLoader
    stream: StreamedRows | None = None  # data.streaming

    def first_rows(self, n: int) -> list[dict]:
        """The first ``n`` training rows of the run (LoRS init)."""
        return self.stream.first_rows(n) if self.stream is not None else self.train_rows[:n]

    def truncated_examples(self) -> int:
        return self.stream.truncated if self.stream is not None else self.truncated


def build_data(
    recipe: Recipe,
    examples: tuple[list[Example], list[Example]],
    tokenizer,
    num_processes: int,
    reporter: Reporter,
    write_cache: bool = True,
) -> TrainingData:
    """(training, held-out) examples → token rows with loss masks (truncated, optionally packed; read
    from the tokenized cache when there, :mod:`shardtune.data.tokenized`) → shuffled batches.
    ``write_cache``: whether this process writes what the cache lacks (the main process does)."""
    cfg = recipe.train
    chat = uses_chat(tokenizer, recipe.data.chat_template)
    train_examples, eval_examples = examples
    data = recipe.data
    if isinstance(train_examples, ExampleStream):
        return _streamed_data(recipe, examples, tokenizer, chat, reporter)
    cache = cache_dir() / "tokenized" if data.tokenized_cache else None
    options = (data.max_length, chat, data.assistant_turns, cache, data.num_proc)
    train_rows, truncated, train_cached = encode_cached(
        train_examples, tokenizer, *options, write=write_cache, warn=reporter.warn
    )
    if not train_rows:  # (before the held-out examples are tokenized: a doomed run fails at once)
        if truncated:
            raise RecipeError(
                "data.max_length",
                f"{recipe.data.max_length} tokens leave no training example a token to learn from (their "
                "prompts fill them); raise it",
            )
        source = recipe.data.describe_source()
        raise BadInput(
            f"data: {source} has no training example with a token to learn from (empty completions?)"
        )
    eval_rows, _, eval_cached = encode_cached(
        eval_examples, tokenizer, *options, write=write_cache, warn=reporter.warn
    )
    cached = [kind for kind, hit in (("training", train_cached), ("held-out", eval_cached)) if hit]
    _check_held_out_rows(eval_examples, eval_rows)
    if truncated:
        reporter.warn(f"{truncated} of {len(train_examples)} examples truncated to data.max_length")
    for examples_of_a_kind, rows, kind, what in (
        (train_examples, train_rows, "training", "to learn from"),
        (eval_examples, eval_rows, "held-out", "to score"),
    ):
        if len(rows) < len(examples_of_a_kind):
            reporter.warn(
                f"{len(examples_of_a_kind) - len(rows)} of {len(examples_of_a_kind)} {kind} examples have no "
                f"token {what} (an empty completion, or a prompt that fills data.max_length): left out"
            )
    if recipe.data.packing:
        train_rows = pack(train_rows, recipe.data.max_length)
    reporter.info(
        f"data: {len(train_examples)} training examples ({len(train_rows)} rows), "
        f"{len(eval_rows)} held out{', chat template' if chat else ''}"
        f"{'; token rows of the ' + ' and '.join(cached) + ' examples from the cache' if cached else ''}"
    )
    collate = Collator(tokenizer.pad_token_id)
    sampler = EpochSampler(len(train_rows), cfg.seed)
    loader = DataLoader(
        train_rows,
        batch_size=cfg.batch_size,
        sampler=sampler,
        collate_fn=collate,
        # Its own generator: creating a loader iterator must not draw from the global RNG (which
        # drives dropout), or a resumed run would drift from an uninterrupted one.
        generator=torch.Generator().manual_seed(cfg.seed),
        drop_last=len(train_rows) >= cfg.batch_size * num_processes,
    )
    eval_loader = DataLoader(eval_rows, batch_size=recipe.eval.batch_size, collate_fn=collate)
    return TrainingData(
        train_rows, eval_rows, eval_examples, chat, truncated, collate, sampler, loader, eval_loader
    )


def _check_held_out_rows(eval_examples: list[Example], eval_rows: list[dict]) -> None:
    """Held-out examples with nothing to score would leave eval_loss unmeasured without a word."""
    if eval_examples and not eval_rows:
        raise BadInput(
            f"data: none of the {len(eval_examples)} held-out examples has a token to score (empty "
            "completions, or prompts that fill data.max_length)"
        )


def _streamed_data(
    recipe: Recipe, examples: tuple[ExampleStream, list[Example]], tokenizer, chat: bool, reporter: Reporter
) -> TrainingData:
    """``data.streaming``: rows tokenized window by window as training reads them
    (:mod:`shardtune.data.streaming`); the held-out rows, a few, at once. The first window is built
    here, so that data with nothing to learn from fails before the run starts."""
    data = recipe.data
    stream_of_examples, eval_examples = examples

    def tokenize(window: list[Example]) -> tuple[list[dict], int]:
        return encode_all(window, tokenizer, data.max_length, chat, data.assistant_turns)

    stream = StreamedRows(stream_of_examples, tokenize, data.packing, data.max_length)
    stream.first_rows(1)
    eval_rows, _ = tokenize(eval_examples)
    _check_held_out_rows(eval_examples, eval_rows)
    sources = len(stream_of_examples.sources)
    reporter.info(
        f"data: streamed from {sources} source{'s' if sources > 1 else ''} in windows of "
        f"{data.stream_window} examples{', packed' if data.packing else ''}, {len(eval_rows)} held out"
        f"{', chat template' if chat else ''}"
    )
    collate = Collator(tokenizer.pad_token_id)
    eval_loader = DataLoader(eval_rows, batch_size=recipe.eval.batch_size, collate_fn=collate)
    return TrainingData([], eval_rows, eval_examples, chat, 0, collate, None, None, eval_loader, stream)


# ---------------------------------------------------------------------------------------------------
# The loop's bookkeeping


@dataclass
class Position:
    """Where the run is: optimizer steps done, the epoch, and batches of it already trained on."""

    step: int = 0
    epoch: int = 0
    skip: int = 0  # batches of ``epoch`` a resumed run must not see again


@dataclass
class Tally:
    """Loss, tokens and the first non-finite loss since the last log step, kept on the device so
    the hot path never waits for the host; read at log and save steps and at the end."""

    device: torch.device
    loss_sum: torch.Tensor = field(init=False)
    tokens: torch.Tensor = field(init=False)
    first_bad_step: torch.Tensor = field(init=False)  # 0 while every loss is finite
    first_bad_loss: torch.Tensor = field(init=False)
    micro_batches: int = 0
    since: float = field(default_factory=time.perf_counter)

    def __post_init__(self):
        self.loss_sum = torch.zeros((), device=self.device)
        self.tokens = torch.zeros((), dtype=torch.long, device=self.device)
        self.first_bad_step = torch.zeros((), dtype=torch.long, device=self.device)
        self.first_bad_loss = torch.zeros((), device=self.device)

    def add(self, loss: torch.Tensor, batch: dict) -> None:
        self.loss_sum += loss.detach().float()
        self.micro_batches += 1
        self.tokens += real_tokens(batch)

    def check_finite(self, loss: torch.Tensor, step: int) -> None:
        newly_bad = ~torch.isfinite(loss.detach()) & (self.first_bad_step == 0)
        self.first_bad_step.masked_fill_(newly_bad, step)
        self.first_bad_loss = torch.where(newly_bad, loss.detach().float(), self.first_bad_loss)

    def take(self, accelerator: Accelerator) -> tuple[float, float]:
        """(mean loss over every process, tokens per second over every process) since the last call."""
        mean_loss = accelerator.reduce(self.loss_sum / self.micro_batches, reduction="mean").item()
        now = time.perf_counter()
        tokens_per_s = int(self.tokens) * accelerator.num_processes / max(now - self.since, 1e-9)
        self.loss_sum.zero_()
        self.tokens.zero_()
        self.micro_batches, self.since = 0, now
        return mean_loss, tokens_per_s


# ---------------------------------------------------------------------------------------------------
# The run


class Trainer:
    """One training run; :func:`train` calls its phases in order (module docstring)."""

    def __init__(self, recipe: Recipe, accelerator: Accelerator, reporter: Reporter):
        self.recipe, self.cfg, self.accelerator = recipe, recipe.train, accelerator
        self.main = accelerator.is_main_process
        self.reporter = reporter if self.main else Reporter(quiet=True)
        # Several processes, each holding only its shards: collectives (gathering a checkpoint,
        # generating for a score) must then run on every process, not only on the main one.
        self.fsdp = self.cfg.strategy == "fsdp" and accelerator.num_processes > 1
        self.deepspeed = self.cfg.strategy == "deepspeed"  # (shardtune.training.deepspeed)
        # ZeRO-3 partitions the weights even on one process: reading them whole is a collective too
        self.gathers = self.fsdp or (self.deepspeed and self.cfg.deepspeed.stage == 3)
        self.position = Position()
        self.scores: dict[str, float] = {}
        self.final_loss, self.eval_loss, self.grad_norm = float("nan"), None, None
        self.lr = self.cfg.lr
        self.train_seconds = 0.0
        self.compile_seconds = 0.0
        self.trackers = None  # logging.report_to, on the main process
        self.selection = Selection()  # output.keep_best, train.early_stopping (training.selection)
        self.stopped_early: str | None = None
        self.phase = "before the first step (loading the model and the data)"  # for a SIGTERM there

    @contextmanager
    def run_directory(self, resume: str | Path | None) -> Iterator[None]:
        """Claim ``output.dir`` (checked on every process, locked by the main one; a checkpoint to
        resume from is read whole first) and catch SIGTERM; an error met inside goes to train.log."""
        self.resume_from = resolve_resume(Path(self.recipe.output.dir), resume)
        if resume == "latest" and self.resume_from is None:
            raise BadInput(f"--resume: {self.recipe.output.dir} has no checkpoint to resume from")
        if self.resume_from is not None:
            option = "--resume" if resume == "latest" else "--resume-from"
            self.resumed_step = check_checkpoint(self.resume_from, self.recipe.adapter, option)
            check_same_run(self.resume_from, self.recipe, self.accelerator.num_processes)
            metrics = Path(self.recipe.output.dir).expanduser() / METRICS_FILE
            if metrics.is_file():
                metrics_lines(metrics)  # a damaged log is named before anything is written
        else:
            self.resumed_step = 0
        self.directory = RunDirectory(self.recipe, self.resume_from, self.main, self.recipe.logging.level)
        self.run_dir = self.directory.path
        self.directory.claim(agree=lambda failed: _any_process(self.accelerator, failed))
        try:
            several = self.accelerator.num_processes > 1
            with StopFlag(several, self.stopped_outside_the_loop) as self.stop, self._heartbeats():
                yield
        except ShardtuneError as e:
            e.args = (f"{e}{self.directory.earlier_run_note()}",)
            log.error("error: %s", e)
            raise
        except StopSignal as e:
            terminated = Terminated(f"{e}{self.directory.earlier_run_note()}")
            log.error("error: %s", terminated)
            raise terminated from None
        except KeyboardInterrupt:
            interrupted = Interrupted(self.interrupted_message() + self.directory.earlier_run_note())
            log.error("error: %s", interrupted)
            raise interrupted from None
        except Exception as e:
            compiler = _compiler_failure(e) if self.cfg.compile else None
            if compiler is not None:  # torch.compile cannot work on this machine: the recipe key says so
                failure = RecipeError("train.compile", compiler)
                log.error("error: %s", failure)
                raise failure from None
            machine = environment_failure(e)
            if machine is not None or hub_answer_failure(e) is not None:  # not shardtune's bug (exit 5)
                failure = MachineError(self._machine_failure(e, machine))
                log.error("error: %s", failure)
                raise failure from None
            log.exception("training failed")  # the traceback goes to train.log; the user gets one line
            if self.directory.earlier_run_note():
                log.error("%s", self.directory.earlier_run_note().removeprefix("; "))
            self.directory.keep_log = True
            raise
        finally:
            self.reporter.stop()
            if self.trackers is not None:
                self.trackers.finish()
            self.directory.close()

    def _machine_failure(self, error: BaseException, machine: str | None) -> str:
        """The line for a failure of the machine or the hub: a write into the run directory names it
        (``output.dir``); a file elsewhere (the data, a cache) or the hub speak for themselves."""
        if machine is None:
            return hub_answer_failure(error) or ""
        names = [getattr(e, "filename", None) for e in error_chain(error)]
        where = next((os.fsdecode(n) for n in names if isinstance(n, str | bytes) and n), None)
        run = Path(self.run_dir).resolve()
        if where is None or run == Path(where).resolve() or run in Path(where).resolve().parents:
            return f"output.dir: writing {self.run_dir}: {machine}"
        return machine

    @contextmanager
    def _heartbeats(self) -> Iterator[None]:
        """With several processes, a :class:`PeerWatch` for as long as the run goes on; a collective
        that fails because a process was lost becomes :class:`ProcessLost`, naming it."""
        peers = PeerWatch.for_launch(self.cfg.timeout_s) if self.accelerator.num_processes > 1 else None
        if peers is None:
            yield
            return
        peers.describe = lambda lost, silent_s: (
            f"lost {who(peers, lost)}: silent for {silent_s:.0f} s; last checkpoint: "
            f"{_last_checkpoint(self.run_dir)}; continue with: {self.resume_command()}"
        )
        try:
            yield
        except Exception as e:
            verdict = peers.explain() if _collective_failed(e) else None
            if verdict is None:
                raise
            log.info("a collective failed: %s", str(e).strip().splitlines()[0] if str(e).strip() else e)
            raise ProcessLost(verdict) from None
        finally:
            peers.close()

    def read_data(self) -> None:
        """Read and check the training and held-out examples (a bad data file fails before a model loads)."""
        self.chat_template = template_text(self.recipe.data.chat_template)  # (a file: read once, here)
        self.examples = read_examples(self.recipe.data, self.reporter.info)
        scoring = [k for k in ("score", "score_base", "score_every") if getattr(self.recipe.eval, k)]
        # (plain text is an Example with the whole text as its completion and no prompt; streamed: the
        # held-out examples are the ones read by now)
        training = self.examples[0] if isinstance(self.examples[0], list) else []
        if scoring and any(not (e.prompt or e.messages) for e in training + self.examples[1]):
            raise BadInput(
                f"eval.{scoring[0]}: the examples are plain text, with no completion to score an answer "
                "against; score a builtin task (data.task) or data with completions (prompt_completion, "
                "alpaca, messages)"
            )
        if scoring and not self.examples[1]:
            raise BadInput(f"eval.{scoring[0]}: no held-out examples to score (data.eval_samples is 0)")

    def setup_model(self) -> None:
        """Load the frozen base model and inject the adapter (resumed: the checkpoint's adapter weights)."""
        recipe, cfg = self.recipe, self.cfg
        set_seed(cfg.seed)
        quantization = quant.quantization_of(recipe.model)
        quant.check_strategy(quantization is not None, sharded=self.fsdp)
        self.model, self.tokenizer = load_model(
            recipe.model.name,
            recipe.model.dtype,
            recipe.model.trust_remote_code,
            recipe.model.revision,
            quantization=quantization,
            device=self.accelerator.device,
        )
        if self.chat_template is not None:  # data.chat_template names one: the run renders with it
            self.tokenizer.chat_template = self.chat_template
            self.model.shardtune_chat_template = self.chat_template  # (adapter.json keeps it)
        if recipe.data.packing:
            check_packed_examples_stay_apart(self.model)
        targets = inject_adapter(self.model, recipe.adapter)
        self._check_fits_model()
        if cfg.gradient_checkpointing:
            enable_gradient_checkpointing(self.model)
        if cfg.compile:
            blocks = compile_blocks(self.model)
            self.reporter.info(f"train.compile: {', '.join(blocks)} blocks compile on the first step")
        self.trainable, base, share = trainable_share(self.model)
        self.total = self.trainable + base
        self.reporter.info(
            f"{recipe.adapter.method} on {recipe.model.name}: {len(targets)} layers adapted, "
            f"{self.trainable:,} trainable parameters ({share:.3f}% of the base model's {base:,})"
        )
        adapter = [p for _, p in adapter_named_parameters(self.model)]
        self.base_memory = quant.base_memory(self.model, DTYPES[recipe.model.dtype], leave_out=adapter)
        self.reporter.info(self.base_memory.describe())
        if self.resume_from is not None:
            attach_weights(self.model, self.resume_from)
        elif recipe.adapter.init_from is not None:
            init_adapter_from(self.model, Path(recipe.adapter.init_from).expanduser())
            self.reporter.info(f"adapter weights from {recipe.adapter.init_from} (adapter.init_from)")
        if cfg.strategy == "fsdp" and not self.fsdp:
            self.reporter.warn("train.strategy: fsdp with one process: nothing to shard, training unsharded")

    def _check_fits_model(self) -> None:
        """Recipe keys that only the loaded model can check: the FSDP block classes, the context length."""
        if self.cfg.strategy == "fsdp":
            block_classes(
                self.model, self.cfg.fsdp.wrap
            )  # a wrong train.fsdp.wrap fails here, on one process too
        context = getattr(self.model.config, "max_position_embeddings", None)
        if isinstance(context, int) and self.recipe.data.max_length > context:
            raise RecipeError(
                "data.max_length",
                f"{self.recipe.data.max_length} is longer than the model's context of {context} tokens "
                "(max_position_embeddings)",
            )

    def setup_data(self) -> None:
        """Token rows and loaders of the training and held-out examples; the run's optimizer steps."""
        self.data = build_data(
            self.recipe,
            self.examples,
            self.tokenizer,
            self.accelerator.num_processes,
            self.reporter,
            write_cache=self.main,
        )
        cfg = self.cfg
        if self.data.stream is not None:  # (the recipe's schema makes streamed runs set max_steps)
            self.total_steps = cfg.max_steps
            return
        updates_per_epoch = max(1, len(self.data.loader) // self.accelerator.num_processes // cfg.grad_accum)
        steps = cfg.max_steps or max(1, math.ceil(min(updates_per_epoch * cfg.epochs, 1e18)))
        if steps > MAX_STEPS:  # (train.max_steps is bounded by the recipe's schema)
            raise RecipeError(
                "train.epochs",
                f"{cfg.epochs:g} passes of {updates_per_epoch} steps come to {steps:,} optimizer steps; at "
                f"most {MAX_STEPS:,} (set fewer epochs, or train.max_steps)",
            )
        self.total_steps = steps

    def _check_resume_fits(self) -> None:
        """Resumed: the checkpoint's position and optimizer state fit this run, checked before the run
        directory is written — steps left to train, a batch inside the epoch, moments of the adapter's
        shapes. Each misfit: one line naming the recipe key or the checkpoint's file and key."""
        directory, step = self.resume_from, self.resumed_step
        if directory is None:
            return
        if self.total_steps <= step:
            cfg = self.cfg
            key, value = ("train.max_steps", cfg.max_steps) if cfg.max_steps else ("train.epochs", cfg.epochs)
            steps = "" if cfg.max_steps else f" ({self.total_steps} steps)"
            raise BadInput(
                f"{key}: {value}{steps} is not past the checkpoint's step {step} ({directory}); "
                "raise it to train further"
            )
        state = read_trainer_state(directory)
        if self.data.stream is not None:  # (its position, in place of the batch of an epoch)
            self.data.stream.check_state(state.get("stream"), str(directory / TRAINER_STATE))
        else:
            # (Accelerate deals the loader's batches out to the processes in turn: each gets at most this many)
            batches = math.ceil(len(self.data.loader) / self.accelerator.num_processes)
            if state["batch_in_epoch"] > batches:
                raise BadInput(
                    f"{directory / TRAINER_STATE}: key 'batch_in_epoch' is {state['batch_in_epoch']} but an "
                    f"epoch of this run has {batches} batches; the file was edited"
                )
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        groups = param_groups(named, self.cfg, self.recipe.adapter.method)  # the optimizer's order
        check_optimizer_fits(directory, [g["params"] for g in groups], self.cfg.optimizer)

    def start_run(self) -> None:
        """A resumed run's checkpoint checked against model and data; then the run directory is written
        (an earlier run set aside, metrics started or cut back, recipe.yaml) and trackers
        (``logging.report_to``) start with the recipe as hyper-parameters."""
        self._check_resume_fits()
        self.directory.start(self.resumed_step)
        if self.main and self.recipe.logging.report_to:
            from shardtune.training.tracking import Trackers

            self.trackers = Trackers(self.recipe.logging, self.run_dir, self.recipe.model_dump(mode="json"))

    def setup_optimizer(self) -> None:
        """LoRS gradient init (a fresh run), FSDP sharding, AdamW, Accelerate's prepare."""
        cfg, accelerator = self.cfg, self.accelerator
        fresh = self.resume_from is None and self.recipe.adapter.init_from is None
        if getattr(self.recipe.adapter, "init", None) == "gradient" and fresh:
            # Before sharding: LoRS init needs whole dense gradients, computed on every process alike.
            self.model.to(accelerator.device)
            self._gradient_init()
        if self.fsdp:
            self._shard()
        loader = self.data.loader
        # after sharding: the shards
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        self.params = [p for _, p in named]
        self.param_names = [n for n, _ in named]
        groups = param_groups(named, cfg, self.recipe.adapter.method)
        self.optimizer = make_optimizer(groups, cfg, sharded=self.fsdp)
        # (streamed: no loader to prepare; every process builds the rows, each collates its slice)
        loaders = (self.data.eval_loader,) if loader is None else (loader, self.data.eval_loader)
        if self.fsdp:  # already sharded and placed; Accelerate must not wrap it again
            self.optimizer, *prepared = accelerator.prepare(self.optimizer, *loaders)
        elif self.deepspeed:
            prepared = self._zero(named, loaders)
        else:
            self.model, self.optimizer, *prepared = accelerator.prepare(self.model, self.optimizer, *loaders)
        if loader is None:
            self.eval_loader = prepared[0]
            self.loader = self.data.stream.batches(
                cfg.batch_size,
                accelerator.num_processes,
                accelerator.process_index,
                self.data.collate,
                accelerator.device,
            )
        else:
            self.loader, self.eval_loader = prepared

    def _zero(self, named: list, loaders: tuple) -> list:
        """DeepSpeed's engine around the model and the recipe's AdamW (ZeRO partitions the flat adapter
        vector; stage 3 the weights too); a *mirror* AdamW over the model's own parameters carries the
        moments to and from checkpoints. Returns the prepared loaders."""
        from shardtune.training import deepspeed as zero

        cfg = self.cfg
        self.mirror = make_optimizer(param_groups(named, cfg, self.recipe.adapter.method), cfg)
        if cfg.precision == "bf16":  # autocast around the forward, as Accelerate does for DDP
            self.model.forward = torch.autocast(self.accelerator.device.type, dtype=torch.bfloat16)(
                self.model.forward
            )
        if cfg.deepspeed.stage == 3:
            zero.gather_where_read(self.model)
        with zero.prints_to_log():
            self.model, self.optimizer, *prepared = self.accelerator.prepare(
                self.model, self.optimizer, *loaders
            )
        if cfg.deepspeed.stage == 3:
            zero.root_hooks_after_gathering(self.unwrapped())
        layout = zero.layout(self.model, self.params)
        self.reporter.info(
            f"DeepSpeed ZeRO-{layout['stage']} over {self.accelerator.num_processes} processes: the adapter's "
            f"{layout['distinct']} tensors ({layout['elements']:,} parameters, each once, shared stores "
            f"included) partitioned"
            + (", the optimizer state in CPU memory" if layout["offload_optimizer"] else "")
        )
        log.info("deepspeed layout: %s", json.dumps(layout))
        return prepared

    def _gradient_init(self) -> None:
        """LoRS: A from the SVD of the dense gradient on the first training examples (same on every rank)."""
        from shardtune.adapters.lors import gradient_init

        recipe, accelerator = self.recipe, self.accelerator
        first = DataLoader(
            self.data.first_rows(recipe.adapter.init_samples),
            batch_size=recipe.train.batch_size,
            collate_fn=self.data.collate,
        )
        batches = (model_inputs({k: v.to(accelerator.device) for k, v in b.items()}) for b in first)
        seen = gradient_init(self.model, batches, recipe.adapter)
        if accelerator.num_processes > 1:
            import torch.distributed as dist

            for p in self.model.parameters():
                if p.requires_grad:
                    dist.broadcast(p.data, src=0)
        self.reporter.info(f"adapter A initialised from the dense gradient of {seen} examples (LoRS init)")

    def _shard(self) -> None:
        """FSDP2 units per block plus the root (which holds the shared stores); report the layout."""
        cfg = self.cfg
        layout = shard_model(
            self.model,
            wrap=cfg.fsdp.wrap,
            reshard_after_forward=cfg.fsdp.reshard_after_forward,
            device=self.accelerator.device,
            bf16=cfg.precision == "bf16",
        )
        self.reporter.info(
            f"FSDP over {layout['processes']} processes: {layout['units']} units "
            f"({', '.join(layout['classes'])}) + the root, which holds the shared adapter stores "
            f"({layout['root_store_tensors']} tensors); each process holds "
            f"{100 * layout['local_bytes'] / layout['whole_bytes']:.1f}% of the parameters "
            f"({layout['local_bytes'] / 2**20:.1f} of {layout['whole_bytes'] / 2**20:.1f} MiB)"
        )

    def restore_or_score(self) -> None:
        """Resumed: optimizer, RNG states and data position from the checkpoint. Fresh: the base
        model's task score (``eval.score_base``), before any update."""
        if self.resume_from is not None:
            counters = load_training_state(
                self.resume_from, self.mirror if self.deepspeed else self.optimizer
            )
            if self.deepspeed:
                from shardtune.training.deepspeed import restore_optimizer

                restore_optimizer(self.model, self.mirror, self.params)
            self.position = Position(counters["step"], counters["epoch"], counters["batch_in_epoch"])
            if self.data.stream is not None:  # (checked before the run directory was written)
                self.data.stream.load_state_dict(counters["stream"])
            self.selection = Selection.from_json(counters["selection"])
            self.reporter.info(f"resumed from {self.resume_from} at step {self.position.step}")
        elif self.recipe.eval.score_base and (self.main or self.gathers):
            with adapter_disabled(self.unwrapped()) as base:
                self.scores["task_score_base"] = self._score(base, "base model")

    def loop(self) -> None:
        """Optimizer steps until the last one: :meth:`train_step` per micro-batch, then
        :meth:`at_interval` after each optimizer step."""
        self.model.train()
        started = time.perf_counter()
        self.reporter.start(self.total_steps)
        self.stop.in_loop = True
        try:
            self._steps(started)
        finally:
            self.stop.in_loop = False
            self.phase = f"after the last step, {self.position.step} (the final evaluation and the adapter)"
        self.reporter.stop()
        self._raise_if_diverged()
        self.train_seconds = time.perf_counter() - started - self.compile_seconds

    def _steps(self, started: float) -> None:
        self.tally = Tally(self.accelerator.device)
        position = self.position
        while position.step < self.total_steps:
            for batch_in_epoch, batch in self._epoch_batches():
                if self.train_step(batch):
                    if self.cfg.compile and not self.compile_seconds:
                        self._compiled(started)
                    self.at_interval(batch_in_epoch)
                    if position.step >= self.total_steps or self.stopped_early:
                        break
            if self.stopped_early:
                break
            position.epoch, position.skip = position.epoch + 1, 0

    def _compiled(self, started: float) -> None:
        """``train.compile``: the first optimizer step compiled the blocks; its time is reported apart."""
        self.compile_seconds = time.perf_counter() - started
        self.reporter.info(f"train.compile: first step {self.compile_seconds:.1f} s (compiling included)")

    def _epoch_batches(self):
        """(batch number in the epoch, batch) for the current epoch, without the ones already trained on.
        Streamed: the stream's batches from where it stands (it never ends; max_steps does)."""
        if self.data.stream is not None:
            return enumerate(self.loader, start=1)
        epoch, skip = self.position.epoch, self.position.skip
        # The prepared loader re-sets its sampler's epoch from its own counter on every pass:
        # set both, so a resumed run (whose loader starts counting at 0) sees the right order.
        self.data.sampler.set_epoch(epoch)
        if hasattr(self.loader, "set_epoch"):
            self.loader.set_epoch(epoch)
        batches = self.accelerator.skip_first_batches(self.loader, skip) if skip else self.loader
        return enumerate(batches, start=skip + 1)

    def train_step(self, batch: dict) -> bool:
        """Forward, backward and (on the last micro-batch of a step) clip, AdamW and schedule;
        True when an optimizer step was taken."""
        accelerator, model = self.accelerator, self.model
        with accelerator.accumulate(model):
            if self.fsdp:  # reduce-scatter the gradients only on the micro-batch that steps
                model.set_requires_gradient_sync(accelerator.sync_gradients)
            if accelerator.sync_gradients:  # (DeepSpeed steps inside backward)
                self._set_lr()
            loss = model(**model_inputs(batch)).loss
            accelerator.backward(loss)
            self.grad_norm = None
            if accelerator.sync_gradients and self.deepspeed:  # (it clipped by train.max_grad_norm)
                from shardtune.training.deepspeed import grad_norm

                self.grad_norm = grad_norm(model) if self.cfg.max_grad_norm > 0 else None
            elif accelerator.sync_gradients and self.cfg.max_grad_norm > 0:
                self.grad_norm = accelerator.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.tally.add(loss, batch)
        if not accelerator.sync_gradients:
            return False
        self.position.step += 1
        self.tally.check_finite(loss, self.position.step)
        return True

    def _set_lr(self) -> None:
        """The learning rate of the step about to be taken (a function of the step: resumes exactly)."""
        cfg = self.cfg
        warmup, floor = cfg.warmup_for(self.total_steps), cfg.min_lr / cfg.lr
        self.lr = cfg.lr * lr_factor(self.position.step, warmup, self.total_steps, cfg.schedule, floor)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr * group.get("lr_scale", 1.0)

    def at_interval(self, batch_in_epoch: int) -> None:
        """After an optimizer step: log, evaluate (and judge), checkpoint, and stop on SIGTERM, each
        when due."""
        step, cfg, every = self.position.step, self.cfg, self.recipe.eval
        is_log_step = step % self.recipe.logging.every == 0 or step == self.total_steps or step == 1
        is_eval_step = bool(every.every) and step % every.every == 0 and len(self.data.eval_rows) > 0
        is_score_step = bool(every.score_every) and step % every.score_every == 0
        is_save_step = bool(cfg.save_every) and step % cfg.save_every == 0 and step < self.total_steps
        # (SIGTERM at the last step: the run finishes; a checkpoint of it would leave nothing to resume)
        stopping = self._stop_requested(at_sync_point=is_log_step or is_save_step) and step < self.total_steps
        if is_log_step or is_save_step or stopping or is_eval_step or is_score_step:
            self._raise_if_diverged()  # before anything is logged or written
        evaluations = self.evaluate(is_eval_step, is_score_step)
        if is_log_step:
            self.log_metrics(evaluations)
        else:
            if evaluations:
                self.write_metrics({"step": step, **evaluations})
            self.reporter.step(step, evaluations, log_line=bool(evaluations))
        if evaluations:
            self.judge(step, evaluations)
        if self.stopped_early:
            return  # the run ends at this step: finish writes its adapter (a checkpoint would resume nothing)
        if is_save_step or stopping:
            self._raise_if_weights_diverged()
            checkpoint = self.save_checkpoint(
                {
                    "epoch": self.position.epoch,
                    "batch_in_epoch": batch_in_epoch,
                    "processes": self.accelerator.num_processes,  # the global batch, checked on resume
                    "selection": self.selection.to_json(),
                    **({"stream": self.data.stream.state_dict()} if self.data.stream is not None else {}),
                }
            )
        if stopping:
            written = checkpoint or self.run_dir / f"checkpoint-{step}"  # (the main process wrote it)
            raise Terminated(
                f"stopped by SIGTERM at step {step}; checkpoint written to {written}; "
                f"continue with: {self.resume_command()}"
            )

    def evaluate(self, held_out_loss: bool, task_score: bool) -> dict[str, float]:
        """The held-out loss and the task score, as due (the same numbers on every process)."""
        found = {}
        if held_out_loss:
            self.eval_loss = heldout_loss(self.model, self.eval_loader, accelerator_sum(self.accelerator))
            found["eval_loss"] = self.eval_loss
        if task_score:
            model = self.unwrapped()
            score = self._score(model, f"step {self.position.step}") if self.main or self.gathers else None
            found["task_score"] = self._from_main(score)
        return found

    def judge(self, step: int, evaluations: dict[str, float]) -> None:
        """output.keep_best: a better evaluation replaces ``best/``; train.early_stopping: the run stops
        once its metric has not improved for ``patience`` evaluations."""
        early = self.cfg.early_stopping
        self._keep_best(step, evaluations)
        if early is not None and early.metric in evaluations:
            value = evaluations[early.metric]
            exhausted = self.selection.exhausted(early.metric, value, early.patience, early.min_delta)
            if exhausted and step < self.total_steps:  # (at the last step the run ends anyway)
                self.stopped_early = (
                    f"{early.metric} did not improve by more than {early.min_delta:g} in {early.patience} "
                    f"evaluations (best {self.selection.reference:.6g}); stopped at step {step} of "
                    f"{self.total_steps}"
                )
                self.reporter.info(f"early stopping: {self.stopped_early}")

    def _keep_best(self, step: int, evaluations: dict[str, float]) -> None:
        """output.keep_best: ``best/`` becomes this step's adapter when its metric is the best so far."""
        metric = self.recipe.output.best_metric
        if self.recipe.output.keep_best and evaluations.get(metric) is not None:
            if self.selection.improves_best(metric, step, evaluations[metric]):
                self.save_best(step, metric, evaluations[metric])

    def save_best(self, step: int, metric: str, value: float) -> None:
        self._raise_if_weights_diverged()
        unwrapped = self.unwrapped()
        tensors = self._adapter_tensors(unwrapped)
        if self.main:
            written = save_best(unwrapped, self.recipe, self.run_dir, step, tensors, metric, value)
            if written is not None:
                self.reporter.info(f"best so far: {metric} {value:.6g} at step {step}, in {written}")

    def unwrapped(self) -> torch.nn.Module:
        """The model inside Accelerate's wrapper (DDP's or DeepSpeed's engine hold it as ``.module``;
        FSDP2 and one process leave it as it is). Not Accelerate's ``unwrap_model``, which imports
        DeepSpeed wherever it is installed (0.4 s of every run)."""
        wrapped = self.deepspeed or isinstance(self.model, torch.nn.parallel.DistributedDataParallel)
        return self.model.module if wrapped else self.model

    def _adapter_tensors(self, unwrapped) -> dict | None:
        """The whole adapter tensors on the main process (None elsewhere); under FSDP and ZeRO-3 every
        process takes part in gathering them."""
        if not (self.main or self.gathers):
            return None
        if self.deepspeed:
            from shardtune.training.deepspeed import whole

            with whole(self.params):
                return adapter_state_dict(unwrapped) if self.main else None
        return adapter_state_dict(unwrapped)

    def _from_main(self, value: float | None) -> float:
        """The main process's number on every process (a score computed there alone)."""
        if self.accelerator.num_processes == 1:
            return float(value)
        shared = torch.tensor([value if value is not None else 0.0], device=self.accelerator.device)
        return float(broadcast(shared, from_process=0).item())

    def stopped_outside_the_loop(self) -> str:
        """What a SIGTERM outside the loop stopped (:class:`StopFlag`): the phase, and how to go on."""
        last = _last_checkpoint(self.run_dir)
        message = f"{self.phase}; last checkpoint: {last}"
        if list_checkpoints(self.run_dir):
            message += f"; continue with: {self.resume_command()}"
        return message

    def interrupted_message(self) -> str:
        """Ctrl-C: after which step the run stopped, its last checkpoint and, where there is one, the
        command that continues from it (no checkpoint is written: Ctrl-C means now)."""
        message = (
            f"interrupted after step {self.position.step}; last checkpoint: {_last_checkpoint(self.run_dir)}"
        )
        if list_checkpoints(self.run_dir):
            message += f"; continue with: {self.resume_command()}"
        return message

    def resume_command(self) -> str:
        """The command that continues this run exactly on this machine: its resolved recipe (overrides
        included), the processes per machine and, over several machines, this one's place among them."""
        command = f"shardtune train {shlex.quote(str(self.run_dir / RECIPE_FILE))} --resume"
        processes = self.accelerator.num_processes
        if processes == 1:
            return command
        env = os.environ
        per_machine = int(env.get("LOCAL_WORLD_SIZE", processes))
        machines = processes // per_machine
        command += f" --nproc {per_machine}"
        if machines > 1:
            flags = (
                f"--num_machines {machines} --machine_rank {env.get('GROUP_RANK', '0')} "
                f"--main_process_ip {env.get('MASTER_ADDR', 'HOST')} --main_process_port {env.get('MASTER_PORT', 'PORT')}"
            )
            command += f" --launch-args {shlex.quote(flags)}"
        return command

    def _stop_requested(self, at_sync_point: bool) -> bool:
        """SIGTERM seen. With several processes it must be seen by all at the same step: one
        collective, at log/save steps only."""
        if self.accelerator.num_processes == 1:
            return self.stop.raised
        return at_sync_point and _any_process(self.accelerator, self.stop.raised)

    def _raise_if_diverged(self) -> None:
        """Stop with exit code 3 if any process saw a non-finite loss."""
        bad = int(self.accelerator.reduce(self.tally.first_bad_step, reduction="max").item())
        if bad:
            raise Diverged(
                f"loss became {self.tally.first_bad_loss.item()} at step {bad}; lower train.lr or check the "
                f"data (last good checkpoint: {_last_checkpoint(self.run_dir)})"
            )

    def _raise_if_weights_diverged(self) -> None:
        """Stop with exit code 3 when an adapter weight holds NaN or infinity on any process. The loss
        is computed before the update it drives, so it cannot see what the last step did: the weights
        themselves are checked before every checkpoint, ``best/`` and the final adapter, and none of
        them is ever written non-finite."""
        if self.deepspeed:
            from shardtune.training.deepspeed import local_parts

            local = local_parts(self.params)
        else:
            local = [p.to_local() if is_sharded(p) else p for p in self.params]
        finite = torch.stack([torch.isfinite(p.detach()).all() for p in local]) if local else None
        bad = finite is not None and not bool(finite.all())
        if not _any_process(self.accelerator, bad):
            return
        name = self.param_names[int((~finite).nonzero()[0])] if bad else "a shard of another process"
        raise Diverged(
            f"adapter weights became NaN or infinite ({name}) by step {self.position.step}; nothing was "
            f"written from them; lower train.lr or check the data (last good checkpoint: "
            f"{_last_checkpoint(self.run_dir)})"
        )

    def log_metrics(self, evaluations: dict[str, float]) -> None:
        """One metrics.jsonl line and progress update: mean loss since the last one, lr, gradient
        norm, tokens/s, and the evaluations of this step."""
        step = self.position.step
        mean_loss, tokens_per_s = self.tally.take(self.accelerator)
        self.final_loss = mean_loss
        metrics = {
            "step": step,
            "loss": mean_loss,
            "lr": self.lr,
            "grad_norm": float(full_tensor(self.grad_norm)) if self.grad_norm is not None else None,
            "tokens_per_s": tokens_per_s,
            **evaluations,
        }
        self.write_metrics(metrics)
        self.reporter.step(step, {k: v for k, v in metrics.items() if v is not None}, log_line=True)

    def write_metrics(self, metrics: dict) -> None:
        """A line of metrics.jsonl, and the same to the experiment trackers (main process)."""
        if self.main:
            with open(self.run_dir / METRICS_FILE, "a", encoding="utf-8") as f:
                f.write(json.dumps(metrics) + "\n")
            if self.trackers is not None:
                self.trackers.log(metrics, metrics["step"])

    def save_checkpoint(self, counters: dict) -> Path | None:
        """``checkpoint-<step>`` with everything needed to resume exactly; the main process writes it
        (under FSDP every process first gathers its shards). Returns its path on the main process."""
        self.accelerator.wait_for_everyone()
        unwrapped = self.unwrapped()
        snapshot = None
        if self.deepspeed:  # (whole moments from the partitions: every process takes part)
            from shardtune.training.deepspeed import snapshot_optimizer, whole

            snapshot_optimizer(self.model, self.mirror, self.params)
            with whole(self.params):
                snapshot = take_snapshot(unwrapped, self.mirror) if self.main else None
            self.mirror.state.clear()
        elif self.main or self.gathers:
            snapshot = take_snapshot(unwrapped, self.optimizer)
        if not self.main:
            return None
        return save_checkpoint(
            unwrapped,
            self.recipe,
            self.run_dir,
            self.position.step,
            self.cfg.keep_checkpoints,
            counters=counters,
            snapshot=snapshot,
        )

    def finish(self, started: float) -> TrainResult:
        """Held-out loss and task score of the tuned model; the final adapter and result.json."""
        accelerator, main = self.accelerator, self.main
        self._raise_if_weights_diverged()  # (before the evaluations: they would be NaN)
        if len(self.data.eval_rows):
            self.eval_loss = heldout_loss(self.model, self.eval_loader, accelerator_sum(accelerator))
            self.reporter.info(
                f"eval loss {self.eval_loss:.4f} (perplexity {math.exp(min(self.eval_loss, 50)):.2f})"
            )
        if self.recipe.eval.score and (main or self.gathers):
            self.scores["task_score"] = self._score(self.unwrapped(), "tuned model")
        self.judge_the_end()
        self._streamed_counts()
        accelerator.wait_for_everyone()
        unwrapped = self.unwrapped()
        if self.deepspeed and self.cfg.deepspeed.stage == 3:
            from shardtune.training.deepspeed import gathered_on_access

            late = gathered_on_access(unwrapped)
            log.info("deepspeed gathered on access: %d parameters %s", len(late), json.dumps(late[:8]))
        tensors = self._adapter_tensors(unwrapped)
        if main:
            save_adapter(unwrapped, self.recipe, self.run_dir, self.position.step, tensors)
        result = TrainResult(
            run_dir=str(self.run_dir),
            method=self.recipe.adapter.method,
            steps=self.position.step,
            final_loss=_finite_or_none(self.final_loss),
            eval_loss=_finite_or_none(self.eval_loss),
            trainable_parameters=self.trainable,
            total_parameters=self.total,
            truncated_examples=self.data.truncated_examples(),
            seconds=time.perf_counter() - started,
            train_seconds=self.train_seconds,
            compile_seconds=self.compile_seconds,
            base_bytes=self.base_memory.stored_bytes,
            base_bytes_unquantized=self.base_memory.unquantized_bytes,
            **{k: _finite_or_none(v) for k, v in self.scores.items()},
            best=self._best(),
            stopped_early=self.stopped_early,
        )
        if main:
            atomic_write_text(self.run_dir / RESULT_FILE, json.dumps(asdict(result), indent=2) + "\n")
            self.directory.finish()
        self.reporter.info(f"adapter written to {self.run_dir}")
        return result

    def _streamed_counts(self) -> None:
        """Streamed data: the examples truncated or left out, counted as the windows were read."""
        stream = self.data.stream
        if stream is None:
            return
        if stream.truncated:
            self.reporter.warn(f"{stream.truncated} streamed examples truncated to data.max_length")
        if stream.left_out:
            self.reporter.warn(
                f"{stream.left_out} streamed examples have no token to learn from (an empty completion, or a "
                "prompt that fills data.max_length): left out"
            )

    def judge_the_end(self) -> None:
        """output.keep_best: the final evaluations count too (the last step may be the best)."""
        if not self.recipe.output.keep_best:
            return
        final = {"eval_loss": self.eval_loss}  # all-reduced: the same on every process
        if self.recipe.eval.score:
            final["task_score"] = self._from_main(self.scores.get("task_score"))
        self._keep_best(self.position.step, final)

    def _best(self) -> dict | None:
        best = self.selection.best.get(self.recipe.output.best_metric)
        if not self.recipe.output.keep_best or best is None:
            return None
        return {"dir": str(self.run_dir / BEST_DIR), "metric": self.recipe.output.best_metric, **best}

    def _score(self, model, who: str) -> float:
        """Exact-match score on the held-out items; under FSDP every process generates in lockstep."""
        recipe = self.recipe
        examples = self.data.eval_examples  # (some: read_data made sure)
        result = score_task(
            model,
            self.tokenizer,
            examples,
            self.data.chat,
            recipe.eval.max_new_tokens,
            recipe.eval.batch_size,
            synced=self.gathers,
            metric=recipe.eval.metric,
        )
        how = "exact match" if recipe.eval.metric == "exact" else "answer contains the completion"
        items = f"{recipe.data.task} items" if recipe.data.task else "examples"
        self.reporter.info(
            f"{who}: {how} {result.correct}/{result.total} = {100 * result.accuracy:.1f}% on held-out "
            f"{items} (e.g. {result.samples[0]['prompt']!r} → {result.samples[0]['answer']!r})"
        )
        return result.accuracy


def _finite_or_none(value: float | None) -> float | None:
    """A result's number as JSON can hold it: NaN or infinity (nothing measured) becomes None (null)."""
    return value if value is not None and math.isfinite(value) else None


def _last_checkpoint(run_dir: Path) -> str:
    found = list_checkpoints(run_dir)
    return str(found[-1]) if found else "none written yet"
