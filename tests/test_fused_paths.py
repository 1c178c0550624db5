"""The fused update paths (``add_delta``: the update accumulated into the base output by one addmm,
the scale on the small N×r side; the fused layer ``_LowRankLinear``: base and update with one
written-out backward, FOSSIL's block sum included) compute what plain autograd computes from the spine's factors:
``y = base(x) + dropout(x)·Aᵀ·Bᵀ``, outputs and every gradient within 1e-6 in fp32 (of the largest value, for sums of many terms)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import randomize_adapter

from shardtune.adapters import METHODS
from shardtune.adapters.base import add_low_rank
from shardtune.adapters.model import adapted_layers, inject_adapter
from shardtune.models.loading import build_tiny_model

OPTIONS = {
    "lora": {"rank": 4, "alpha": 12},
    "fossil": {"rank": 7},  # 7 ∤ 64: the block sum's last block is zero-padded
    "mos": {"rank": 4, "equivalent_rank": 4, "private_rank": 1, "shards_per_vector": 2},
    "sharelora": {"rank": 4, "alpha": 8},
    "vera": {"rank": 8},
    "tiedlora": {"rank": 4},
    "prolora": {"rank": 4},
    "vblora": {"rank": 4, "vector_length": 16},
}


@pytest.mark.parametrize("method", sorted(OPTIONS))
def test_add_delta_equals_the_plain_formula_with_gradients(method):
    model = build_tiny_model("tiny-llama")
    options = METHODS[method].Options(method=method, targets=["q_proj", "down_proj"], **OPTIONS[method])
    inject_adapter(model, options)
    randomize_adapter(model, seed=0)
    g = torch.Generator().manual_seed(0 + 100)
    params = [p for p in model.parameters() if p.requires_grad]
    for name, layer in adapted_layers(model).items():
        x = torch.randn(2, 5, layer.adapter.in_features, generator=g, requires_grad=True)
        a, b = layer.adapter.factors()
        plain = layer.base_layer(x) + F.linear(F.linear(x, a), b)
        w = torch.randn(plain.shape, generator=g)
        want = torch.autograd.grad((plain * w).sum(), [x, *params], allow_unused=True)
        # the layer as training runs it (the fused layer where it applies) and the general add_delta
        for path, fused in [
            ("layer", layer(x)),
            ("add_delta", layer.adapter.add_delta(layer.base_layer(x), x)),
        ]:
            torch.testing.assert_close(fused, plain, atol=1e-6, rtol=1e-6, msg=f"{name} {path}")
            got = torch.autograd.grad((fused * w).sum(), [x, *params], allow_unused=True)
            for i, (gi, wi) in enumerate(zip(got, want, strict=True)):
                if wi is None:
                    assert gi is None or not gi.abs().max(), (name, path, i)
                    continue
                scale = max(1.0, wi.abs().max().item())
                err = (gi - wi).abs().max().item()
                assert err <= 1e-6 * scale, f"{name} {path} gradient {i}: {err} (largest {scale})"


def test_add_low_rank_is_one_addmm_and_leaves_mixed_dtypes_to_a_plain_add():
    out = torch.randn(3, 4, 6)
    h, b = torch.randn(3, 4, 2), torch.randn(6, 2)
    torch.testing.assert_close(add_low_rank(out, h, b), out + h @ b.T, atol=1e-6, rtol=1e-6)
    mixed = add_low_rank(out.bfloat16(), h, b)  # a bf16 base, an fp32 adapter, no autocast
    assert mixed.dtype == torch.bfloat16
    torch.testing.assert_close(mixed.float(), (out.bfloat16() + (h @ b.T).bfloat16()).float())


@pytest.mark.parametrize("method", ["lora", "mos", "sharelora", "fossil"])
def test_the_fused_layer_equals_plain_autograd_bias_and_base_gradients_included(method):
    """:class:`_LowRankLinear` takes the whole layer (base + update) while training without dropout:
    output and the gradients of x, the adapter's parameters and (when asked) W and the bias equal plain
    autograd's on ``x·Wᵀ + bias + x·Aᵀ·Bᵀ``; with dropout or no grad the general path runs."""
    model = build_tiny_model("tiny-qwen2")  # q_proj carries a bias
    inject_adapter(model, METHODS[method].Options(method=method, targets=["q_proj"], **OPTIONS[method]))
    randomize_adapter(model, seed=2)
    g = torch.Generator().manual_seed(2 + 100)
    layer = next(iter(adapted_layers(model).values()))
    base = layer.base_layer
    assert base.bias is not None
    base.requires_grad_(True)
    stores = getattr(model, "shardtune_stores", None)
    params = [p for p in layer.parameters() if p.requires_grad] + list(stores.parameters() if stores else [])
    x = torch.randn(2, 5, base.in_features, generator=g, requires_grad=True)
    fused = layer(x)
    assert type(fused.grad_fn).__name__ == "_LowRankLinearBackward"
    a, b = layer.adapter.factors()
    plain = F.linear(x, base.weight, base.bias) + F.linear(F.linear(x, a), b)
    torch.testing.assert_close(fused, plain, atol=1e-6, rtol=1e-6)
    w = torch.randn(plain.shape, generator=g)
    inputs = [x, *params]
    got = torch.autograd.grad((fused * w).sum(), inputs, allow_unused=True)
    want = torch.autograd.grad((plain * w).sum(), inputs, allow_unused=True)
    for i, (g_got, g_want) in enumerate(zip(got, want, strict=True)):
        assert (g_got is None) == (g_want is None)
        if g_got is not None:  # within 1e-6 of the largest value: sums of many terms, in another order
            scale = max(1.0, g_want.abs().max().item())
            assert (g_got - g_want).abs().max().item() <= 1e-6 * scale, (i, scale)
    with torch.no_grad():
        assert layer(x).grad_fn is None
    layer.adapter.dropout = torch.nn.Dropout(0.1)
    assert type(layer(x).grad_fn).__name__ != "_LowRankLinearBackward"


@pytest.mark.parametrize("method", ["lora", "mos", "sharelora", "fossil"])
@pytest.mark.parametrize("base_dtype", [torch.float32, torch.bfloat16])
def test_under_autocast_the_fused_layer_casts_what_autocast_casts(method, base_dtype):
    """Under bf16 autocast the fused layer runs too (an fp32 or bf16 base, fp32 adapters: what
    `train.precision: bf16` trains): every operand cast to bf16, the output bf16, the fp32 parameters'
    gradients fp32 through the cast. It computes what the general path computes under autocast, within
    bf16 rounding (a few products summed in another order), and what plain fp32 math does within bf16's
    precision."""
    model = build_tiny_model("tiny-qwen2")  # q_proj carries a bias
    model.to(base_dtype)
    options = METHODS[method].Options(method=method, targets=["q_proj"], dtype="float32", **OPTIONS[method])
    inject_adapter(model, options)
    randomize_adapter(model, seed=3)
    g = torch.Generator().manual_seed(3 + 100)
    layer = next(iter(adapted_layers(model).values()))
    stores = getattr(model, "shardtune_stores", None)
    params = [p for p in layer.parameters() if p.requires_grad] + list(stores.parameters() if stores else [])
    assert params and all(p.dtype == torch.float32 for p in params)
    x = torch.randn(2, 5, layer.adapter.in_features, generator=g, requires_grad=True)
    w = torch.randn(2, 5, layer.adapter.out_features, generator=g)

    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(x)
        return y, torch.autograd.grad((y.float() * w).sum(), [x, *params])

    fused, fused_grads = run()
    fused_path = type(fused.grad_fn).__name__ == "_LowRankLinearBackward"
    assert fused_path, type(fused.grad_fn).__name__
    assert fused.dtype == torch.bfloat16
    assert [t.dtype for t in fused_grads] == [torch.float32] * len(fused_grads)
    layer.adapter.dropout = torch.nn.Dropout(0.0)  # the same numbers through the general path
    general, general_grads = run()
    assert type(general.grad_fn).__name__ != "_LowRankLinearBackward"
    torch.testing.assert_close(fused.float(), general.float(), atol=2e-2, rtol=2e-2)
    for got, want in zip(fused_grads, general_grads, strict=True):
        scale = max(1e-3, want.abs().max().item())
        assert (got - want).abs().max().item() <= 2e-2 * scale
    a, b = layer.adapter.factors()
    base = layer.base_layer
    plain = F.linear(x, base.weight.float(), base.bias.float()) + F.linear(F.linear(x, a), b)
    torch.testing.assert_close(fused.float(), plain, atol=5e-2, rtol=2e-2)


def test_under_autocast_a_shared_matrix_is_cast_once_per_step_and_never_stale():
    """ShareLoRA's A, shared by every q_proj: one bf16 copy serves all the layers in a forward (as
    autocast's own cast cache does), and after an optimizer step the next forward casts the new values."""
    from shardtune.adapters import fused as spine

    model = build_tiny_model("tiny-llama")
    options = METHODS["sharelora"].Options(method="sharelora", targets=["q_proj"], rank=4, share="a")
    inject_adapter(model, options)
    layers = list(adapted_layers(model).values())
    assert len(layers) == 2
    randomize_adapter(model, seed=4)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    ids = torch.randint(4, 200, (2, 9))
    for _ in range(2):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(ids).logits.float().pow(2).mean()
            current = {(p.data_ptr(), p._version) for p in model.parameters() if p.requires_grad}
            casts = [key for key in spine._CASTS if (key[0], key[2]) in current]
            assert len(casts) == 1 + len(layers), len(casts)  # the shared A once, each layer's B
            x = torch.randn(2, 3, layers[0].adapter.in_features)
            fused = layers[0](x)
            a, b = layers[0].adapter.factors()
            want = layers[0].base_layer(x) + F.linear(F.linear(x, a), b)
        torch.testing.assert_close(fused.float(), want.float(), atol=3e-2, rtol=3e-2)
        loss.backward()
        opt.step()
        opt.zero_grad()
        held = fused  # noqa: F841  (keeps last step's casts alive: the next step must not use them)


@pytest.mark.parametrize("method, keeps_x", [("fossil", False), ("lora", True)])
def test_what_the_fused_layer_keeps_for_backward(method, keeps_x):
    """The fused layer keeps the small ``h`` (N×r) and the parameters for backward, and the (N, in) input
    only where a gradient needs it: LoRA's ``dA = dhᵀ·x`` does; FOSSIL's block sum has no trainable A,
    so a FOSSIL layer keeps none of its input (activation memory)."""
    model = build_tiny_model("tiny-llama")
    inject_adapter(model, METHODS[method].Options(method=method, targets=["down_proj"], **OPTIONS[method]))
    layer = model.model.layers[0].mlp.down_proj
    x = torch.randn(3, 5, layer.adapter.in_features, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(x)
    assert type(y.grad_fn).__name__ == "_LowRankLinearBackward"
    tokens = x.shape[0] * x.shape[1]
    per_token = sorted(
        tuple(t.shape) for t in saved if t.numel() and t.reshape(-1, t.shape[-1]).shape[0] == tokens
    )
    rank = OPTIONS[method]["rank"]
    assert per_token == sorted([(tokens, rank)] + ([tuple(x.shape)] if keeps_x else [])), per_token


@pytest.mark.parametrize("method", ["lora", "mos", "sharelora", "fossil"])
def test_under_autocast_the_factors_are_cast_inside_and_autocast_comes_back_on(method):
    """Under autocast the fused layer takes the adapter's fp32 factors as they are (cast inside, their
    gradients returned in fp32: no cast node of autograd's between the layer and the parameters), and
    autocast is on again after the layer, also when the layer raises."""
    model = build_tiny_model("tiny-llama")
    inject_adapter(model, METHODS[method].Options(method=method, targets=["q_proj"], **OPTIONS[method]))
    layer = next(iter(adapted_layers(model).values()))
    x = torch.randn(2, 3, layer.adapter.in_features, dtype=torch.bfloat16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        assert torch.is_autocast_enabled("cpu")
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16
        with pytest.raises(RuntimeError):
            layer(torch.randn(2, 3, layer.adapter.in_features + 1, dtype=torch.bfloat16))
        assert torch.is_autocast_enabled("cpu")
    assert not torch.is_autocast_enabled("cpu")
    assert type(y.grad_fn).__name__ == "_LowRankLinearBackward"
    upstream = {type(fn).__name__ for fn, _ in y.grad_fn.next_functions if fn is not None}
    assert "ToCopyBackward0" not in upstream, upstream
    if method == "lora":  # the parameters themselves feed the layer
        assert upstream == {"AccumulateGrad"}, upstream


def test_a_factor_gradient_keeps_its_scale_and_dtype_without_a_wider_product():
    """``_gradient_product``: ``alpha·m1·m2`` in the parameter's dtype, also where the device has no
    product that writes a wider result (the CPU: computed in bf16, then cast)."""
    from shardtune.adapters import fused

    assert not fused._writes_wider(torch.device("cpu"), torch.bfloat16)
    m1, m2 = torch.randn(4, 64), torch.randn(64, 3)
    got = fused._gradient_product(m1.bfloat16(), m2.bfloat16(), torch.float32, alpha=3.0)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, 3.0 * m1.bfloat16().float() @ m2.bfloat16().float(), atol=0.3, rtol=2e-2)
    same = fused._gradient_product(m1, m2, torch.float32, alpha=3.0)
    torch.testing.assert_close(same, 3.0 * m1 @ m2, atol=1e-5, rtol=1e-5)
