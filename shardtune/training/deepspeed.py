"""DeepSpeed ZeRO training (``train.strategy: deepspeed``), through Accelerate's DeepSpeed plugin.

ZeRO keeps one flat fp32 vector of the trainable parameters per param group and partitions it across
the N processes: stage 1 partitions the optimizer state (each process updates 1/N of the vector),
stage 2 the gradients too (reduce-scattered instead of all-reduced), stage 3 the weights too — every
parameter, frozen base weights included, lives as 1/N on each process and is all-gathered for the
module that uses it. ``offload_optimizer`` keeps the optimizer's partition (and its update) in CPU
memory, ``offload_params`` (stage 3) the weight partitions between uses.

What shardtune adds to DeepSpeed's own engine:

* **the shared stores are seen once**: DeepSpeed partitions each parameter object once, so an MoS
  pool, a ShareLoRA matrix or a VB-LoRA bank held at the model root (``model.shardtune_stores``) is one
  entry of the flat vector however many layers use it, and its gradient is the sum over them. Under
  stage 3 a store is used by modules that do not own it: it is registered as an external parameter of
  the root, which gathers it for the whole forward and backward; each adapted layer, which reads its
  base weight and factors itself, gathers them all (:func:`gather_where_read`);
* **the same numbers as DDP**: the engine runs in fp32 (``precision: bf16`` is autocast around the
  forward, as under DDP, not DeepSpeed's bf16 master-weight scheme), with the recipe's AdamW as its
  optimizer, its clipping (``gradient_clipping`` = ``train.max_grad_norm``) and accumulation;
* **checkpoints in shardtune's layout**: whole adapter tensors and per-parameter AdamW moments
  (:func:`snapshot_optimizer`, :func:`restore_optimizer` go through a *mirror* optimizer over the
  model's own parameters), so a run checkpointed under DeepSpeed resumes under DeepSpeed (any stage,
  any number of processes), DDP, FSDP or on one process, and the other way round.

On a machine without a GPU DeepSpeed runs on its CPU accelerator, its processes connected over gloo
(the tests run it there).
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Iterator

import torch
from torch import nn

from shardtune.adapters.base import STORES_ATTR
from shardtune.core.errors import RecipeError
from shardtune.recipe.schema import TrainSection

log = logging.getLogger("shardtune")


@contextlib.contextmanager
def prints_to_log() -> Iterator[None]:
    """DeepSpeed prints on stdout (a compiled op's "built successfully", its first log lines): stdout
    carries shardtune's results only, so what it prints here goes to the run's log instead."""
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer):
            yield
    finally:
        for line in buffer.getvalue().splitlines():
            if line.strip():
                log.info("deepspeed: %s", line.rstrip())


def require_deepspeed():
    """The ``deepspeed`` module; its absence is one line naming the recipe key."""
    try:
        with prints_to_log():
            import deepspeed
            from deepspeed.accelerator import get_accelerator

            if get_accelerator().device_name() == "cpu":
                # On CPUs DeepSpeed compiles a shared-memory all-reduce (for inference) at its start:
                # ~25 s with the C++ compiler, again whenever the build environment differs. Training
                # goes through gloo without it. (DeepSpeed keeps this table for such edits.)
                deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    except ImportError:
        raise RecipeError(
            "train.strategy",
            "deepspeed needs the deepspeed package: pip install 'shardtune[deepspeed]' (or strategy: fsdp, "
            "which needs nothing more; docs/distributed.md maps a ZeRO config onto it)",
        ) from None
    return deepspeed


def deepspeed_plugin(cfg: TrainSection):
    """Accelerate's DeepSpeed plugin with the ZeRO config the recipe describes (fp32 engine; no
    DeepSpeed optimizer or scheduler: the recipe's AdamW and schedule run inside it)."""
    from accelerate.utils import DeepSpeedPlugin

    options = cfg.deepspeed
    zero: dict = {
        "stage": options.stage,
        "offload_optimizer": {"device": "cpu" if options.offload_optimizer else "none"},
    }
    if options.stage == 3:
        zero["offload_param"] = {"device": "cpu" if options.offload_params else "none"}
        zero["stage3_param_persistence_threshold"] = options.persistence_threshold
    config = {
        "train_micro_batch_size_per_gpu": cfg.batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "gradient_clipping": cfg.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": False},
        "fp16": {"enabled": False},
        # the recipe's torch AdamW, also with offload (DeepSpeed's CPU Adam would need a compiled op)
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**62,
    }
    return DeepSpeedPlugin(hf_ds_config=config)


def load_whole() -> None:
    """The base model loads whole in every process and ZeRO-3 partitions it when the engine starts
    (as FSDP shards it after loading): Accelerate tells transformers about a stage-3 config, which would
    then build or load every model under ``deepspeed.zero.Init`` — a random builtin model with other
    weights than everywhere else, and a base already partitioned before the adapter is injected into
    it. Called once Accelerate is set up."""
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()


def gather_where_read(model: nn.Module) -> None:
    """Stage 3 gathers a module's own parameters just before its forward; shardtune reads some where
    their module's forward never runs, so they are gathered there instead:

    * each adapted layer (:class:`~shardtune.adapters.base.AdaptedLinear`) reads its base weight and
      its adapter's factors in one fused function: it becomes a ZeRO-3 *leaf*, whose forward gathers
      every parameter below it;
    * the shared stores belong to the root, not to the layers that use them: registered as the
      root's external parameters they are gathered for its whole forward (and backward).

    Called before the engine is built."""
    from shardtune.adapters.base import AdaptedLinear

    deepspeed = require_deepspeed()
    from deepspeed.utils import set_z3_leaf_modules

    set_z3_leaf_modules(model, [AdaptedLinear])
    # A leaf gathers its parameters again for its backward when a gradient reaches it through its
    # input as well (DeepSpeed 0.19): the first adapted layers read the frozen embedding's output, which
    # asks for none unless told to (as PEFT does under gradient checkpointing).
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    stores = getattr(model, STORES_ATTR, None)
    for p in stores.parameters() if stores is not None else []:
        deepspeed.zero.register_external_parameter(model, p)


def gathered_on_access(model: nn.Module) -> list[str]:
    """Stage 3: the parameters DeepSpeed had to gather one by one when a module read one it did not
    own in its forward (DeepSpeed then registers it as that module's external parameter: one blocking
    all-gather per read, nothing prefetched). :func:`gather_where_read` leaves none; the log says."""
    names = {id(p): name for name, p in model.named_parameters()}
    return sorted(
        f"{where}: {names.get(id(p), '?')}"
        for where, module in model.named_modules()
        if module is not model
        for p in getattr(module, "_external_params", {}).values()
    )


def root_hooks_after_gathering(model: nn.Module) -> None:
    """Stage 3, after the engine is built: DeepSpeed gathers the root's parameters (the stores with
    them) in a forward pre-hook it adds last; the root's own pre-hooks that read the stores (MoS
    assembles every layer's factors from its pools there) move behind it."""
    hooks = model._forward_pre_hooks
    theirs = [k for k, h in hooks.items() if getattr(h, "__module__", "").startswith("deepspeed")]
    if not theirs:
        return
    ours = [k for k, h in hooks.items() if getattr(h, "__module__", "").startswith("shardtune")]
    for key in ours:
        hooks.move_to_end(key)


def partitioned(params: list[nn.Parameter]) -> bool:
    """Stage 3 parameters: each process holds a partition (``ds_tensor``), the tensor itself is empty."""
    return any(hasattr(p, "ds_tensor") for p in params)


@contextlib.contextmanager
def whole(params: list[nn.Parameter]) -> Iterator[None]:
    """Stage 3: the parameters gathered whole for the block (a collective: every process enters it);
    otherwise nothing to do."""
    if not partitioned(params):
        yield
        return
    deepspeed = require_deepspeed()
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield


def local_parts(params: list[nn.Parameter]) -> list[torch.Tensor]:
    """What this process holds of each parameter (its partition under stage 3)."""
    return [p.ds_tensor if hasattr(p, "ds_tensor") else p for p in params]


def layout(engine, trainable: list[nn.Parameter]) -> dict:
    """What the ZeRO optimizer partitions: each adapter tensor once (a shared store too, however many
    layers use it), for the log and the tests."""
    zero = engine.optimizer
    groups = getattr(zero, "bit16_groups", None) or getattr(zero, "fp16_groups", None) or []
    seen = [p for group in groups for p in group]
    return {
        "stage": engine.zero_optimization_stage(),
        "tensors": len(seen),
        "distinct": len({id(p) for p in seen}),
        "elements": sum(getattr(p, "ds_numel", p.numel()) for p in seen),
        "trainable_tensors": len(trainable),
        # stage 3: the model's parameters held as partitions (the others stay whole: persistent)
        "partitioned": sum(
            hasattr(p, "ds_tensor") and not getattr(p, "ds_persist", False)
            for p in engine.module.parameters()
        ),
        "parameters": sum(1 for _ in engine.module.parameters()),
        "offload_optimizer": bool(engine.zero_cpu_offload()),
    }


def grad_norm(engine) -> torch.Tensor | None:
    """The global gradient norm of the step just taken (before clipping), as DeepSpeed computed it."""
    norm = engine.get_global_grad_norm()
    return None if norm is None else torch.as_tensor(float(norm))


def _basic_optimizer(engine) -> torch.optim.Optimizer:
    """The recipe's AdamW inside the ZeRO optimizer, stepping the flat fp32 partitions."""
    return engine.optimizer.optimizer


def _flat_partitions(engine) -> list[torch.Tensor]:
    """The flat fp32 vectors (this process's partition of each param group, or sub-group under
    stage 3) that the recipe's AdamW steps, and by which it keys its state."""
    zero = engine.optimizer
    flats = getattr(zero, "fp32_partitioned_groups_flat", None)  # stage 3
    return list(flats if flats is not None else zero.single_partition_of_fp32_groups)


def _link_fragments(engine) -> None:
    """Stages 1 and 2 map each parameter to its piece of the flat optimizer state only once, after
    the first group steps (DeepSpeed 0.19): with several param groups the later ones stay unmapped.
    Map them all again (cheap: views)."""
    zero = engine.optimizer
    if hasattr(zero, "_lazy_init_hp_params_optimizer_state"):
        zero._hp_optimizer_states_linked = False
        zero._lazy_init_hp_params_optimizer_state()


def snapshot_optimizer(engine, mirror: torch.optim.Optimizer, params: list[nn.Parameter]) -> None:
    """Fill ``mirror`` (an AdamW over the model's own ``params``, never stepped) with the whole
    per-parameter moments of the ZeRO optimizer and its learning rates; a collective."""
    from deepspeed.utils import safe_get_full_optimizer_state

    _link_fragments(engine)
    basic = _basic_optimizer(engine)
    flat = next((t for t in _flat_partitions(engine) if t in basic.state), None)
    step = basic.state[flat]["step"] if flat is not None else torch.zeros(())
    for p in params:
        mirror.state[p] = {
            "step": torch.as_tensor(step).detach().to("cpu", torch.float32).clone(),
            "exp_avg": safe_get_full_optimizer_state(p, "exp_avg")
            .detach()
            .cpu()
            .reshape(p.ds_shape if hasattr(p, "ds_shape") else p.shape),
            "exp_avg_sq": safe_get_full_optimizer_state(p, "exp_avg_sq")
            .detach()
            .cpu()
            .reshape(p.ds_shape if hasattr(p, "ds_shape") else p.shape),
        }
    for ours, theirs in zip(mirror.param_groups, basic.param_groups, strict=True):
        ours["lr"] = theirs["lr"]


def restore_optimizer(engine, mirror: torch.optim.Optimizer, params: list[nn.Parameter]) -> None:
    """Load the moments ``mirror`` holds (read from a checkpoint) into the ZeRO optimizer: its state
    is created for the flat partitions first (AdamW makes it lazily, at its first step)."""
    from deepspeed.utils import safe_set_full_optimizer_state

    basic = _basic_optimizer(engine)
    step = next(iter(mirror.state.values()))["step"] if mirror.state else torch.zeros(())
    for flat in _flat_partitions(engine):
        basic.state[flat] = {
            "step": torch.as_tensor(step, dtype=torch.float32).clone().to(flat.device),
            "exp_avg": torch.zeros_like(flat),
            "exp_avg_sq": torch.zeros_like(flat),
        }
    _link_fragments(engine)
    for p in params:
        state = mirror.state[p]
        for key in ("exp_avg", "exp_avg_sq"):
            safe_set_full_optimizer_state(p, state[key].to(torch.float32), key)
    mirror.state.clear()
