"""Step time and peak memory of every method vs the frozen base and vs PEFT, side by side in one run.

    python benchmarks/step_time.py                          # CPU, small Llama shape, fp32
    python benchmarks/step_time.py --shape 1b --device cuda --dtype bf16 --batch 8 --seq 1024
    python benchmarks/step_time.py --compile                # every variant's decoder blocks compiled

A training step is forward + backward + AdamW step on the adapter parameters (shardtune's
``train.adamw`` for every variant, PEFT's included, so the optimizer is not what differs), all linear layers
adapted, the same assembled rank r for every method (MoS: budget R = r/4 or the least that fits, p = 1, l = 2;
ShareLoRA: ShareA). LoRS needs a pruned model and is measured by benchmarks/lors_memory.py. "frozen
base" is the same forward + backward with no adapter (gradients flow to the input embeddings only):
the floor every adapter method pays. ``--ablations`` adds rows with one speed lever switched off
(LoRA and FOSSIL without the fused layer, MoS with a gather per layer, LoRA's fused layer with its
factors cast outside it, or with the update written before the base product; and LoRA without its rank-r products, which does not train: what its step
costs beside them). ``--floor`` adds two computed rows:
the frozen base plus the rank-r products of every adapted layer timed alone (:func:`floor_ms`), the time
no rank-r adapter built on torch's matrix products gets under, once with their operands in cache
(timed over and over) and once with them evicted before each call (read from memory, as a real step
reads most of them). Variants run interleaved, round after round, and the median
is reported, so machine noise hits all of them alike (their models, all resident, are frozen out of the
garbage collector's walks first). ``--compile``: every variant's decoder blocks
are compiled as ``train.compile`` does (the frozen base's too, so ratios compare compiled with
compiled), plus a row "frozen base (eager)"; compile time is not in the step time (warm-up steps). Prints a table and writes JSON
(benchmarks/results/step_time-<device>-<shape>.json unless --json is given; <device> names the
card on CUDA, e.g. cuda-h200).
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shardtune.adapters import METHODS, fused  # noqa: E402
from shardtune.adapters.model import adapted_layers, count_parameters, inject_adapter  # noqa: E402
from shardtune.training.loop import adamw, compile_blocks  # noqa: E402

SHAPES = {
    # hidden, intermediate, layers, heads, kv heads, vocab
    "small": (512, 1408, 4, 8, 4, 4096),
    "smollm2-135m": (576, 1536, 30, 9, 3, 49152),
    "1b": (2048, 5632, 22, 32, 4, 32000),  # TinyLlama-1.1B shape
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_base(shape: str, dtype: torch.dtype, device: str):
    hidden, inter, layers, heads, kv, vocab = SHAPES[shape]
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        vocab_size=vocab,
        max_position_embeddings=4096,
    )
    torch.manual_seed(0)
    with torch.device(device):  # initialise on the target device (a 1B model on CPU takes long)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def variants(rank: int, n_layers: int) -> dict:
    big_r = max(2, rank // 4)
    while rank - 1 > (big_r - 1) * n_layers:  # the pool must hold r − p public vectors per layer
        big_r += 1
    mos = {"rank": rank, "equivalent_rank": big_r, "private_rank": 1, "shards_per_vector": 2}
    return {
        "frozen base": None,
        "shardtune lora": ("ours", "lora", {"rank": rank, "alpha": 2 * rank}),
        "shardtune fossil": ("ours", "fossil", {"rank": rank}),
        "shardtune mos": ("ours", "mos", mos),
        "shardtune sharelora": ("ours", "sharelora", {"rank": rank, "alpha": 2 * rank, "share": "a"}),
        "peft lora": ("peft", "lora", {"r": rank, "lora_alpha": 2 * rank}),
        "peft miss": ("peft", "miss", {"r": rank}),
    }


FLOOR = "floor (computed)"  # the products' operands in cache
FLOOR_COLD = "floor (from memory)"  # evicted before each product

# Ablations (``--ablations``): one lever of issue 17 switched off, measured beside the variant it is in.
ABLATIONS = {
    # the update through the general path (base product, then the update added): no fused layer
    "lora (unfused)": ("shardtune lora", "unfused"),
    "fossil (unfused)": ("shardtune fossil", "unfused"),
    # every MoS layer gathers its own factors in each forward (no per-step assembly)
    "mos (per-layer gather)": ("shardtune mos", "per-layer gather"),
    # LoRA's layers keep their bookkeeping but leave out the rank-r products (does not train: A and B
    # get zero gradients): what a LoRA step costs beside its products
    "lora (no products)": ("shardtune lora", "no products"),
    # the fused layer as it was before its factors' casts moved inside: A and B cast by autograd (a copy
    # each way per factor and step), the scale a pass of its own over h and dh, the update added after
    "lora (casts outside)": ("shardtune lora", "casts outside"),
    # tried and not kept: the update written first and the base product accumulated onto it (addmm_ with
    # beta 1: no pass of its own over y and dx; less GPU time in kernels, a slower H200 step)
    "lora (update first)": ("shardtune lora", "update first"),
}


class _ProductsLeftOut(torch.autograd.Function):
    """The fused layer (``_LowRankLinear``) without its six rank-r products: the frozen product and its
    input gradient, ``x`` and the factors saved for backward, zero gradients for A and B."""

    @staticmethod
    def forward(ctx, x, weight, bias, a, b):
        ctx.save_for_backward(x, weight, a, b)
        return torch.nn.functional.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, dy):
        x, weight, a, b = ctx.saved_tensors
        dx = torch.matmul(dy, weight) if ctx.needs_input_grad[0] else None
        return dx, None, None, torch.zeros_like(a), torch.zeros_like(b)


def _forward_without_products(layer, x):
    a, b, _ = layer.adapter.low_rank_factors()
    return _ProductsLeftOut.apply(x, layer.base_layer.weight, layer.base_layer.bias, a, b)


class CastsOutside(torch.autograd.Function):
    """The fused layer (LoRA's form) before its factors' casts moved inside (``_LowRankLinear``): ``a`` and
    ``b`` arrive in the compute dtype, cast by autograd outside (so their gradients leave in it and are
    cast back), and the scale is a pass of its own over ``h`` and ``dh``."""

    @staticmethod
    def forward(ctx, x, weight, bias, a, b, scale):
        flat = x.reshape(-1, x.shape[-1])
        h = torch.mm(flat, a.t()).mul_(scale)
        y = torch.addmm(bias, flat, weight.t()) if bias is not None else torch.mm(flat, weight.t())
        y.addmm_(h, b.t())
        ctx.save_for_backward(x, weight, a, b, h)
        ctx.scale = scale
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x, weight, a, b, h = ctx.saved_tensors
        dy = dy.reshape(-1, dy.shape[-1])
        dh = torch.mm(dy, b).mul_(ctx.scale)
        db = torch.mm(dy.t(), h)
        da = torch.mm(dh.t(), x.reshape(-1, x.shape[-1]))
        dx = torch.mm(dy, weight).addmm_(dh, a) if ctx.needs_input_grad[0] else None
        return None if dx is None else dx.view(x.shape), None, None, da, db, None


class UpdateFirst(torch.autograd.Function):
    """``_LowRankLinear`` (LoRA's form) with the update written first and the base product accumulated
    onto it: ``y = h·Bᵀ`` then ``y += x·Wᵀ``, ``dx = s·g·A`` then ``dx += dy·W`` (``addmm_``, beta 1)."""

    @staticmethod
    def forward(ctx, x, weight, bias, a, b, scale):
        flat = x.reshape(-1, x.shape[-1])
        ctx.dtypes = a.dtype, b.dtype
        a, b = fused._autocast_copy(a, x.dtype), fused._autocast_copy(b, x.dtype)
        h = fused._scaled_product(flat, a.t(), scale)
        y = torch.addmm(bias, h, b.t()) if bias is not None else torch.mm(h, b.t())
        y.addmm_(flat, weight.t())
        ctx.save_for_backward(x, weight, a, b, h)
        ctx.scale = scale
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x, weight, a, b, h = ctx.saved_tensors
        dy = dy.reshape(-1, dy.shape[-1])
        g = torch.mm(dy, b)
        db = fused._gradient_product(dy.t(), h, ctx.dtypes[1])
        da = fused._gradient_product(g.t(), x.reshape(-1, x.shape[-1]), ctx.dtypes[0], ctx.scale)
        dx = fused._scaled_product(g, a, ctx.scale).addmm_(dy, weight) if ctx.needs_input_grad[0] else None
        return None if dx is None else dx.view(x.shape), None, None, da, db, None


def forward_through(function, layer, x):
    """``layer(x)`` through one of the earlier fused layers above (LoRA's form): under autocast x, W and
    the bias are cast by autograd, and so are A and B for :class:`CastsOutside` (:class:`UpdateFirst`
    casts its factors inside, as ``_LowRankLinear`` does)."""
    a, b, scale = layer.adapter.low_rank_factors()
    operands = (x, layer.base_layer.weight, layer.base_layer.bias, a, b)
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        cast = 5 if function is CastsOutside else 3
        operands = tuple(t if t is None or k >= cast else t.to(dtype) for k, t in enumerate(operands))
    with torch.autocast(device_type, enabled=False):
        return function.apply(*operands, scale)


# the ablations that route every adapted layer through an earlier fused layer
EARLIER_LAYERS = {"casts outside": CastsOutside, "update first": UpdateFirst}


def ablate(model, how: str) -> None:
    if how == "unfused":
        for layer in adapted_layers(model).values():  # the fused layer then never applies
            layer.adapter.low_rank_factors = layer.adapter.block_sum_shard = lambda: None
    elif how == "per-layer gather":
        model.shardtune_stores.assemble_per_step = False
    elif how == "no products":
        for layer in adapted_layers(model).values():
            layer.forward = functools.partial(_forward_without_products, layer)
    elif how in EARLIER_LAYERS:
        for layer in adapted_layers(model).values():
            layer.forward = functools.partial(forward_through, EARLIER_LAYERS[how], layer)


def projection_shapes(shape: str) -> dict[str, tuple[int, int]]:
    """(in, out) of each adapted projection of one decoder block of ``shape``."""
    hidden, inter, _, heads, kv, _ = SHAPES[shape]
    kv_width = kv * (hidden // heads)
    return {
        "q_proj": (hidden, hidden),
        "k_proj": (hidden, kv_width),
        "v_proj": (hidden, kv_width),
        "o_proj": (hidden, hidden),
        "gate_proj": (hidden, inter),
        "up_proj": (hidden, inter),
        "down_proj": (inter, hidden),
    }


def rank_r_products(n_in: int, n_out: int, rank: int, tokens: int, dtype, device: str):
    """The six products a rank-r layer adds to a frozen one (see ``_LowRankLinear``), as callables on
    random operands of one projection's shape; and the frozen layer's own input gradient ``dy·W``."""
    gen = torch.Generator().manual_seed(0)

    def rand(*size):
        return torch.randn(*size, generator=gen).to(device, dtype)

    x, dx, y, dy = rand(tokens, n_in), rand(tokens, n_in), rand(tokens, n_out), rand(tokens, n_out)
    a, b, h, dh, w = (
        rand(rank, n_in),
        rand(n_out, rank),
        rand(tokens, rank),
        rand(tokens, rank),
        rand(n_out, n_in),
    )
    products = {
        "h = x·Aᵀ": lambda: torch.mm(x, a.t()),
        "y += h·Bᵀ": lambda: y.addmm_(h, b.t()),
        "dB = dyᵀ·h": lambda: torch.mm(dy.t(), h),
        "dh = dy·B": lambda: torch.mm(dy, b),
        "dA = dhᵀ·x": lambda: torch.mm(dh.t(), x),
        "dx += dh·A": lambda: dx.addmm_(dh, a),
    }
    return products, (lambda: torch.mm(dy, w))


# Larger than the last-level cache of the machines measured (32 MiB L3 on the CI CPU, 50 MiB L2 on an
# H100/H200): writing it evicts every operand.
EVICT_BYTES = 256 * 2**20
_evict_buffers: dict[str, torch.Tensor] = {}


def evict_caches(device: str) -> None:
    """Write a buffer larger than the caches, so that what runs next reads its operands from memory."""
    if device not in _evict_buffers:
        _evict_buffers[device] = torch.empty(EVICT_BYTES // 4, dtype=torch.float32, device=device)
    _evict_buffers[device].fill_(1.0)


def per_call_ms(fn, device: str, samples: int, calls: int = 10, cold: bool = False) -> float:
    """Median time of one call of ``fn`` over ``samples`` batches of ``calls`` (after a warm-up);
    ``cold``: each call timed alone, right after :func:`evict_caches` (``samples × calls`` of them)."""
    for _ in range(3):
        fn()
    times = []
    if cold:
        for _ in range(samples * calls):
            evict_caches(device)
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times.append(time.perf_counter() - t0)
        return 1000 * statistics.median(times)
    for _ in range(samples):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        sync(device)
        times.append((time.perf_counter() - t0) / calls)
    return 1000 * statistics.median(times)


def floor_ms(
    base_ms: float, shape: str, rank: int, tokens: int, dtype, device: str, samples: int, cold: bool = False
) -> float:
    """The least step time of a rank-r adapter on all 7 projections, from the frozen base's: plus the six
    rank-r products of every adapted layer timed alone, less what an adapted model never computes (layer
    0's q/k/v input gradients, base and update: nothing below them trains). An estimate, and one that
    assumes torch's matrix products: what no implementation of the method built on them avoids. Timed
    over and over, the operands stay in cache (an optimistic bound); ``cold``: each product reads them
    from memory (:func:`evict_caches`), which a real step does for some of them (``x`` saved in forward
    for ``dA``) and not for others (``dy`` just written)."""
    layers = SHAPES[shape][2]
    total = base_ms
    for name, (n_in, n_out) in projection_shapes(shape).items():
        products, base_dx = rank_r_products(n_in, n_out, rank, tokens, dtype, device)
        times = {product: per_call_ms(fn, device, samples, cold=cold) for product, fn in products.items()}
        total += layers * sum(times.values())
        if name in ("q_proj", "k_proj", "v_proj"):
            total -= per_call_ms(base_dx, device, samples, cold=cold) + times["dx += dh·A"]
    return total


def prepare(spec, shape, dtype, device, adapter_dtype):
    model = build_base(shape, dtype, device)
    if spec is None:
        return model
    kind, method, kw, *how = spec
    if kind == "ours":
        inject_adapter(
            model, METHODS[method].Options(method=method, targets=TARGETS, dtype=adapter_dtype, **kw)
        )
        for h in how:
            ablate(model, h)
        return model
    import peft

    config = (
        peft.LoraConfig(target_modules=TARGETS, **kw)
        if method == "lora"
        else peft.MissConfig(target_modules=TARGETS, **kw)
    )
    # PEFT keeps adapters in fp32 by default (autocast_adapter_dtype), like shardtune's default.
    return peft.get_peft_model(model, config, autocast_adapter_dtype=adapter_dtype == "float32")


def step_fn(model, ids, device, autocast_dtype):
    params = [p for p in model.parameters() if p.requires_grad]
    # shardtune's optimizer (train.adamw: fused where it applies) for every variant, PEFT's included
    opt = adamw(params, lr=1e-4, weight_decay=0.01, betas=(0.9, 0.999)) if params else None
    embed = model.get_input_embeddings()

    def step():
        with torch.autocast(
            device_type=device.split(":")[0], dtype=autocast_dtype, enabled=autocast_dtype is not None
        ):
            if params:
                loss = model(input_ids=ids, labels=ids).loss
            else:  # frozen base: backward through all activations to the embedding output
                emb = embed(ids).detach().requires_grad_(True)
                loss = model(inputs_embeds=emb, labels=ids).loss
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)

    return step


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=SHAPES, default="small")
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--dtype", choices=["fp32", "bf16"], default="fp32", help="base weights; bf16 also autocasts"
    )
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per round and variant")
    ap.add_argument("--only", default="", help="comma-separated variant names (default: all)")
    ap.add_argument("--compile", action="store_true", help="compile every variant's decoder blocks")
    ap.add_argument(
        "--ablations", action="store_true", help=f"also: {', '.join(ABLATIONS)} (one lever off each)"
    )
    ap.add_argument(
        "--floor",
        action="store_true",
        help="also two computed rows: the frozen base plus every layer's rank-r products timed alone, "
        "their operands in cache and read from memory",
    )
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.compile:  # one code object, a few graphs per variant: more than dynamo's default of 8
        torch._dynamo.config.recompile_limit = 256

    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    autocast_dtype = torch.bfloat16 if args.dtype == "bf16" else None
    n_layers = SHAPES[args.shape][2]
    specs = variants(args.rank, n_layers)
    if args.ablations:
        specs = {**specs, **{name: (*specs[of], how) for name, (of, how) in ABLATIONS.items()}}
    if args.compile:
        specs = {**specs, "frozen base (eager)": None}
    if args.only:
        specs = {k: v for k, v in specs.items() if k in args.only.split(",")}
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, SHAPES[args.shape][5], (args.batch, args.seq), generator=gen).to(args.device)

    rows = {name: {"times": [], "peak_mem_gib": None} for name in specs}
    if args.device.startswith("cuda"):
        # Peak memory first, one variant alone on the GPU at a time (nothing else resident).
        for name, spec in specs.items():
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            model = prepare(spec, args.shape, dtype, args.device, "float32")
            step = step_fn(model, ids, args.device, autocast_dtype)
            step()
            step()
            sync(args.device)
            rows[name]["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
            del model, step

    for name, spec in specs.items():
        model = prepare(spec, args.shape, dtype, args.device, "float32")
        if args.compile and name != "frozen base (eager)":
            compile_blocks(model, reset=False)  # train.compile's, the variants side by side
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        if spec is not None and spec[0] == "ours":
            trainable = count_parameters(model)[0]
        step = step_fn(model, ids, args.device, autocast_dtype)
        for _ in range(3 if args.compile else 2):  # warm-up (allocator, kernels, optimizer state, compiling)
            step()
        sync(args.device)
        rows[name].update(step=step, trainable=trainable)

    # Every variant's model stays resident while they take turns: out of the garbage collector's walks,
    # so that one collection over many models' objects does not land in some variant's timed steps.
    gc.collect()
    gc.freeze()
    for _ in range(args.rounds):
        for _name, row in rows.items():
            sync(args.device)
            t0 = time.perf_counter()
            for _ in range(args.steps):
                row["step"]()
            sync(args.device)
            row["times"].append((time.perf_counter() - t0) / args.steps)

    tokens = args.batch * args.seq
    med = {n: statistics.median(r["times"]) for n, r in rows.items()}

    def row(name: str, seconds: float, trainable, peak_mem_gib, **extra) -> dict:
        def vs(other):
            return seconds / med[other] if other in med else None

        return {
            "variant": name,
            "trainable_params": trainable,
            "step_ms": 1000 * seconds,
            "tokens_per_s": tokens / seconds,
            "vs_frozen_base": vs("frozen base"),
            "vs_shardtune_lora": vs("shardtune lora"),
            "vs_peft_lora": vs("peft lora"),
            "peak_mem_gib": peak_mem_gib,
            **extra,
        }

    out = [row(name, med[name], r["trainable"], r["peak_mem_gib"]) for name, r in rows.items()]
    if args.floor and "frozen base" in med:
        for name, cold, how in (
            (FLOOR, False, "frozen base + rank-r products timed alone, operands in cache (floor_ms)"),
            (FLOOR_COLD, True, "frozen base + rank-r products timed alone, operands from memory (floor_ms)"),
        ):
            floor = floor_ms(
                1000 * med["frozen base"],
                args.shape,
                args.rank,
                tokens,
                dtype,
                args.device,
                2 * args.rounds,
                cold=cold,
            )
            out.append(row(name, floor / 1000, None, None, computed=how))

    device_name = (
        torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    )
    print(
        f"\nstep time — {args.shape} Llama shape, {args.dtype}, batch {args.batch} × seq {args.seq}, "
        f"rank {args.rank}, all 7 projections, {device_name}, torch {torch.__version__}"
        + (", decoder blocks compiled" if args.compile else "")
    )
    header = f"{'variant':24} {'trainable':>11} {'ms/step':>9} {'tok/s':>9} {'×base':>7} {'×our lora':>9} {'×peft lora':>10} {'peak GiB':>9}"
    print(header)
    print("-" * len(header))
    for r in out:

        def f(v, spec):  # an empty cell keeps the column's width
            return format(v, spec) if v is not None else format("-", spec.split(".")[0].rstrip(","))

        print(
            f"{r['variant']:24} {f(r['trainable_params'], '>11,')} {r['step_ms']:>9.1f} {r['tokens_per_s']:>9.0f} "
            f"{f(r['vs_frozen_base'], '>7.2f')} {f(r['vs_shardtune_lora'], '>9.2f')} {f(r['vs_peft_lora'], '>10.2f')} "
            f"{f(r['peak_mem_gib'], '>9.2f')}"
        )
    device_slug = args.device.split(":")[0]
    if device_slug == "cuda":  # the card in the name: results of different cards never overwrite each other
        device_slug += "-" + (device_name.replace("NVIDIA", "").split() or ["gpu"])[0].lower()
    path = Path(
        args.json
        or Path(__file__).parent
        / "results"
        / f"step_time-{device_slug}-{args.shape}{'-compiled' if args.compile else ''}.json"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        json.dumps(
            {"args": vars(args), "device": device_name, "torch": torch.__version__, "rows": out}, indent=2
        )
        + "\n"
    )
    print(f"\nwritten to {path}")


if __name__ == "__main__":
    main()
