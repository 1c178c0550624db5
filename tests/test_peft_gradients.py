"""LoRA and FOSSIL against PEFT (``LoraConfig``, ``MissConfig``) on a whole tiny Llama, in train mode:
logits, the gradients of every adapter tensor and the gradient with respect to the input embeddings,
across rsLoRA, dropout, padding and mini mode. With the same seed both draw the same dropout masks
(one ``nn.Dropout`` on each adapted layer's input, in the same order), so dropout is compared exactly."""

from __future__ import annotations

import pytest
import torch

from shardtune.adapters import METHODS
from shardtune.adapters.model import adapted_layers, inject_adapter
from shardtune.models.loading import build_tiny_model

peft = pytest.importorskip("peft")
TARGETS = ["q_proj", "v_proj", "down_proj"]


def embeds(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 260, (2, 9), generator=g)
    return model.get_input_embeddings()(ids).detach()


def train_step(model, x, params: dict, seed: int = 99):
    """Logits and gradients (params and input embeddings) of a fixed random weighting of the logits."""
    x = x.clone().requires_grad_(True)
    model.train()
    torch.manual_seed(seed)
    logits = model(inputs_embeds=x).logits
    w = torch.randn(logits.shape, generator=torch.Generator().manual_seed(4))
    (logits * w).sum().backward()
    grads = {k: p.grad.detach().clone() for k, p in params.items()}
    return logits.detach(), grads, x.grad.detach().clone()


def randomize(tensors):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for t in tensors:
            t.copy_(torch.randn(t.shape, generator=g) * 0.1)


def compare(ours, ours_params, ref, ref_params, dropout):
    x = embeds(ours)
    got = train_step(ours, x, ours_params)
    want = train_step(ref, x, ref_params)
    base = build_tiny_model("tiny-llama")(inputs_embeds=x).logits.detach()
    assert (got[0] - base).abs().max() > 1e-2  # the adapter acts
    torch.testing.assert_close(got[0], want[0], atol=2e-5, rtol=0)
    for key in ours_params:
        assert got[1][key].abs().max() > 0, key
        largest = want[1][key].abs().max().item()
        torch.testing.assert_close(
            got[1][key], want[1][key], atol=max(1e-4, 5e-6 * largest), rtol=1e-4, msg=key
        )
    # The input gradient sums every layer's contributions (values up to ~200 here): shardtune adds the
    # update into the base output in one addmm, PEFT adds a separate tensor, so fp32 rounding differs
    # at ~1e-6 of the largest value (both are as close to a float64 run: 5.5e-4 vs PEFT's 6.2e-4).
    torch.testing.assert_close(got[2], want[2], atol=5e-6 * want[2].abs().max().item(), rtol=1e-4)
    if dropout:  # the masks matter: another seed gives other logits
        other = train_step(ours, x, ours_params, seed=100)
        assert (other[0] - got[0]).abs().max() > 1e-3


@pytest.mark.parametrize("rslora", [False, True])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_lora_logits_and_gradients_match_peft(rslora, dropout):
    ours = build_tiny_model("tiny-llama")
    inject_adapter(
        ours,
        METHODS["lora"].Options(
            method="lora", rank=4, alpha=12, rslora=rslora, dropout=dropout, targets=TARGETS
        ),
    )
    ref = peft.get_peft_model(
        build_tiny_model("tiny-llama"),
        peft.LoraConfig(r=4, lora_alpha=12, use_rslora=rslora, lora_dropout=dropout, target_modules=TARGETS),
    )
    ref_modules = dict(ref.named_modules())
    ours_params, ref_params = {}, {}
    for name, layer in adapted_layers(ours).items():
        randomize([layer.adapter.lora_A, layer.adapter.lora_B])
        peft_layer = ref_modules[f"base_model.model.{name}"]
        with torch.no_grad():
            peft_layer.lora_A["default"].weight.copy_(layer.adapter.lora_A)
            peft_layer.lora_B["default"].weight.copy_(layer.adapter.lora_B)
        for m in "AB":
            ours_params[f"{name}.{m}"] = getattr(layer.adapter, f"lora_{m}")
            ref_params[f"{name}.{m}"] = getattr(peft_layer, f"lora_{m}")["default"].weight
    compare(ours, ours_params, ref, ref_params, dropout)


@pytest.mark.parametrize(
    "rank, mode, mini_r, dropout",
    [
        (8, "default", 1, 0.0),
        (8, "default", 1, 0.3),  # 64 and 176 are multiples of 8: PEFT drops the same mask
        (6, "default", 1, 0.0),  # 64 % 6 and 176 % 6 ≠ 0: zero padding
        (8, "mini", 16, 0.3),
        (6, "mini", 16, 0.0),
    ],
)
def test_fossil_logits_and_gradients_match_peft_miss(rank, mode, mini_r, dropout):
    targets = ["q_proj", "v_proj", "up_proj"] if mode == "mini" else TARGETS
    ours = build_tiny_model("tiny-llama")
    inject_adapter(
        ours,
        METHODS["fossil"].Options(
            method="fossil", rank=rank, mode=mode, mini_r=mini_r, dropout=dropout, targets=targets
        ),
    )
    ref = peft.get_peft_model(
        build_tiny_model("tiny-llama"),
        peft.MissConfig(
            r=rank,
            target_modules=targets,
            init_weights="mini" if mode == "mini" else True,
            mini_r=mini_r,
            miss_dropout=dropout,
        ),
    )
    ref_modules = dict(ref.named_modules())
    ours_params, ref_params = {}, {}
    for name, layer in adapted_layers(ours).items():
        randomize([layer.adapter.shard])
        block = ref_modules[f"base_model.model.{name}"].miss_block["default"]
        with torch.no_grad():
            block.copy_(layer.adapter.shard)
        ours_params[name], ref_params[name] = layer.adapter.shard, block
    compare(ours, ours_params, ref, ref_params, dropout)
