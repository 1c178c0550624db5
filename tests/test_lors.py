"""LoRS and `shardtune prune`: masked merged forward, both gradient modes, saved tensors, sparsity kept."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from conftest import tiny_recipe
from typer.testing import CliRunner

from shardtune.adapters import METHODS
from shardtune.adapters.lors import LorsLinearFunction
from shardtune.adapters.model import adapted_layers, find_targets, inject_adapter, merge_adapter
from shardtune.artifacts.prune import prune_model, sparsity_of
from shardtune.cli import app
from shardtune.models.loading import build_tiny_model

runner = CliRunner()


def sparse_weight(out_f=24, in_f=16, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g, dtype=dtype)
    keep = torch.rand(out_f, in_f, generator=g) > 0.5
    return w * keep, keep


def factors(out_f=24, in_f=16, r=4, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(r, in_f, generator=g, dtype=dtype, requires_grad=True)
    b = torch.randn(out_f, r, generator=g, dtype=dtype, requires_grad=True)
    return a, b


@pytest.mark.parametrize("mode", ["lors", "exact", "authors"])
def test_forward_and_gradients_against_dense_reference(mode):
    w, keep = sparse_weight()
    bias = torch.randn(24, dtype=torch.float64)
    a, b = factors()
    s = 0.7
    x = torch.randn(3, 5, 16, dtype=torch.float64, requires_grad=True)
    y = LorsLinearFunction.apply(x, w, bias, a, b, s, mode, 7)  # chunk 7: rows split unevenly
    dy = torch.randn_like(y)
    y.backward(dy)
    got = (x.grad.clone(), a.grad.clone(), b.grad.clone())

    x_ref = x.detach().clone().requires_grad_(True)
    a_ref, b_ref = factors()
    y_ref = torch.nn.functional.linear(x_ref, (w + s * b_ref @ a_ref) * keep, bias)  # naive masked LoRA
    torch.testing.assert_close(y, y_ref)
    y_ref.backward(dy)
    torch.testing.assert_close(got[0], x_ref.grad)  # dx is exact in both modes
    if mode == "exact":
        torch.testing.assert_close(got[1], a_ref.grad)
        torch.testing.assert_close(got[2], b_ref.grad)
    else:  # the paper's rearranged gradient: the mask passes straight through (authors: without s)
        x2, dy2 = x.detach().reshape(-1, 16), dy.reshape(-1, 24)
        g = s if mode == "lors" else 1.0
        torch.testing.assert_close(got[2], g * dy2.T @ (x2 @ a_ref.detach().T))
        torch.testing.assert_close(got[1], g * (dy2 @ b_ref.detach()).T @ x2)
        assert not torch.allclose(got[1], a_ref.grad)  # and it is not the exact one


def test_saves_no_dense_delta():
    """Only x, W, A, B are saved: the one out×in tensor kept for backward is W itself."""
    w, _ = sparse_weight(64, 48, torch.float32)
    a, b = factors(64, 48, 4, torch.float32)
    x = torch.randn(10, 48, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        LorsLinearFunction.apply(x, w, None, a, b, 1.0, "lors", 16).sum().backward()
    dense = [t for t in saved if t.shape == (64, 48)]
    assert len(dense) == 1 and dense[0].data_ptr() == w.data_ptr()
    assert len(saved) == 4


def pruned_tiny(pattern="2:4"):
    model = build_tiny_model("tiny-llama")
    prune_model(model, "magnitude", pattern=pattern)
    return model


def test_prune_patterns_and_wanda():
    model = pruned_tiny("2:4")
    for name, layer in model.named_modules():
        if isinstance(layer, torch.nn.Linear) and "lm_head" not in name:
            groups = (layer.weight != 0).reshape(layer.weight.shape[0], -1, 4).sum(-1)
            assert (groups <= 2).all(), name
    assert sparsity_of(model) == pytest.approx(0.5)
    model = build_tiny_model("tiny-llama")
    report = prune_model(model, "magnitude", sparsity=0.3)
    assert all(abs(r["sparsity"] - 0.3) < 0.01 for r in report["layers"])
    model = build_tiny_model("tiny-llama")
    batches = [{"input_ids": torch.randint(4, 200, (2, 16))}]
    report = prune_model(model, "wanda", sparsity=0.5, calibration=batches)
    q = model.model.layers[0].self_attn.q_proj.weight
    assert ((q == 0).sum(1) == q.shape[1] // 2).all()  # Wanda: the ratio holds in every row


def test_merge_keeps_zero_pattern_bit_for_bit():
    model = pruned_tiny()
    zeros_before = {
        n: (m.weight == 0).clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
    }
    inject_adapter(
        model, METHODS["lors"].Options(method="lors", rank=4, init="kaiming", targets="all-linear")
    )
    with torch.no_grad():
        for layer in adapted_layers(model).values():
            layer.adapter.lora_B.normal_()
    ids = torch.randint(4, 200, (2, 9))
    before = model(ids).logits
    merge_adapter(model)
    torch.testing.assert_close(model(ids).logits, before, atol=1e-4, rtol=1e-4)
    for name, layer in adapted_layers(model).items():
        w = layer.base_layer.weight
        assert torch.equal(w == 0, zeros_before[name]), name  # same zeros, no new ones
        assert int((w == 0).sum()) == int(zeros_before[name].sum())


def test_prune_then_train_lors_with_gradient_init(tmp_path):
    result = runner.invoke(
        app, ["prune", "tiny-llama", "--out", str(tmp_path / "sparse"), "--pattern", "2:4", "--json"]
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["overall_sparsity"] == pytest.approx(0.5)
    raw = tiny_recipe(
        tmp_path,
        model={"name": str(tmp_path / "sparse")},
        adapter={"method": "lors", "rank": 4, "alpha": 4, "init": "gradient", "init_samples": 16},
        train={"max_steps": 30},
        logging={"every": 1},
    )
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    result = runner.invoke(app, ["train", str(path)])
    assert result.exit_code == 0, result.output
    assert "LoRS init" in result.output
    losses = [
        json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    assert losses[-1] < 0.7 * losses[0]

    from shardtune.artifacts.checkpoint import load_adapted_model

    model, _, _ = load_adapted_model(tmp_path / "run")
    merge_adapter(model)
    assert sparsity_of(model) == pytest.approx(0.5)


def test_gradient_init_gives_orthonormal_a_and_zero_b():
    from shardtune.adapters.lors import gradient_init

    model = pruned_tiny()
    opts = METHODS["lors"].Options(method="lors", rank=4, targets=["q_proj", "down_proj"])
    inject_adapter(model, opts)
    ids = torch.randint(4, 200, (4, 12))
    seen = gradient_init(model, [{"input_ids": ids, "labels": ids}], opts)
    assert seen == 4
    for layer in adapted_layers(model).values():
        a = layer.adapter.lora_A.detach()
        torch.testing.assert_close(a @ a.T, torch.eye(4), atol=1e-4, rtol=0)
        assert not layer.adapter.lora_B.any()
    assert not any(p.requires_grad for n, p in model.named_parameters() if "base_layer" in n)


def test_prune_errors(tmp_path):
    out = str(tmp_path / "pruned")  # (not a fixed path: whatever a machine holds there is checked first)
    for method in ("wanda", "sparsegpt"):
        result = runner.invoke(app, ["prune", "tiny-llama", "--out", out, "--method", method])
        assert result.exit_code == 2 and f"--method {method} needs calibration samples" in result.stderr
    result = runner.invoke(app, ["prune", "tiny-llama", "--out", out, "--method", "obs"])
    assert result.exit_code == 2 and "--method: expected one of magnitude, wanda, sparsegpt" in result.stderr
    result = runner.invoke(app, ["prune", "tiny-llama", "--out", out, "--pattern", "4:2"])
    assert result.exit_code == 2 and "--pattern: need 0 < N < M" in result.stderr
    result = runner.invoke(app, ["prune", "tiny-gpt2", "--out", out])
    assert result.exit_code == 2 and "Conv1D" in result.stderr


# ---------------------------------------------------------------------------------------------------
# LoRS: the authors' gradient, α = r


def test_authors_grad_mode_is_the_released_backward():
    """hyx1999/LoRS LorsFn.backward, restated with their names (their lora_A is our B, out×r; their
    lora_B our A, r×in): grad_A = dyᵀ·(x·lora_Bᵀ), grad_B = (dy·lora_A)ᵀ·x — no scale s."""
    w, keep = sparse_weight()
    a, b = factors()
    s = 1.7
    x = torch.randn(4, 3, 16, dtype=torch.float64, requires_grad=True)
    y = LorsLinearFunction.apply(x, w, None, a, b, s, "authors", 8)
    dy = torch.randn_like(y)
    y.backward(dy)
    their_a, their_b = b.detach(), a.detach()
    x2, dy2 = x.detach().reshape(-1, 16), dy.reshape(-1, 24)
    torch.testing.assert_close(b.grad, dy2.T @ (x2 @ their_b.T))  # their grad_A
    torch.testing.assert_close(a.grad, (dy2 @ their_a).T @ x2)  # their grad_B
    merged = (w + s * their_a @ their_b) * (w != 0)  # their forward: weight.addmm(A, B, alpha=s).mul_(W≠0)
    torch.testing.assert_close(y, x.detach() @ merged.T)
    torch.testing.assert_close(x.grad, (dy @ merged))
    # and ours (grad_mode lors) is exactly s times theirs
    a2, b2 = factors()
    LorsLinearFunction.apply(x.detach(), w, None, a2, b2, s, "lors", 8).backward(dy)
    torch.testing.assert_close(a2.grad, s * a.grad)
    torch.testing.assert_close(b2.grad, s * b.grad)


def test_alpha_defaults_to_rank():
    opts = METHODS["lors"].Options(method="lors", rank=16)
    assert opts.alpha == 16.0
    model = pruned_tiny()
    inject_adapter(model, METHODS["lors"].Options(method="lors", rank=9, init="kaiming", targets=["q_proj"]))
    layer = next(iter(adapted_layers(model).values())).adapter
    assert layer.scale == pytest.approx(3.0)  # α/√r = 9/3 = √r
    assert METHODS["lors"].Options(method="lors", rank=16, alpha=4).alpha == 4.0


# ---------------------------------------------------------------------------------------------------
# SparseGPT


def obs_reference(w, h, sparsity, nm, blocksize, percdamp=0.01):
    """SparseGPT written the slow, direct way: explicit inverses of the Hessian of the columns not yet
    processed (no Cholesky, no lazy block updates). Float64 throughout."""
    w, h = w.double().clone(), h.double().clone()
    n = w.shape[1]
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h += percdamp * torch.diag(h).mean() * torch.eye(n, dtype=torch.float64)
    inv_rest = [torch.linalg.inv(h[j:, j:]) for j in range(n)]  # H_F⁻¹ for F = {j, …, n−1}
    d2 = torch.tensor([inv_rest[j][0, 0] for j in range(n)])  # = U_jj²
    pruned = torch.zeros_like(w, dtype=torch.bool)
    for j in range(n):
        if nm is None and j % blocksize == 0:  # choose the block's mask on the current weights
            cols = slice(j, min(j + blocksize, n))
            sal = (w[:, cols] ** 2 / d2[cols]).flatten()
            k = int(sal.numel() * sparsity)
            order = sal.argsort()[:k]
            block = torch.zeros_like(sal, dtype=torch.bool)
            block[order] = True
            pruned[:, cols] = block.reshape(w.shape[0], -1)
        if nm is not None and j % nm[1] == 0:
            sal = w[:, j : j + nm[1]] ** 2 / d2[j : j + nm[1]]
            for row in range(w.shape[0]):
                for c in sal[row].argsort()[: nm[1] - nm[0]]:
                    pruned[row, j + c] = True
        for row in torch.nonzero(pruned[:, j]).flatten():  # OBS: remove w[row, j], fix the rest of the row
            w[row, j:] -= w[row, j] / inv_rest[j][0, 0] * inv_rest[j][0, :]
            w[row, j] = 0
    return w


@pytest.mark.parametrize(
    "sparsity, nm, blocksize", [(0.5, None, 8), (0.3, None, 128), (None, (2, 4), 8), (None, (1, 4), 16)]
)
def test_sparsegpt_equals_the_direct_obs_formula(sparsity, nm, blocksize):
    from shardtune.artifacts.prune import sparsegpt_prune

    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 24, generator=g) @ torch.randn(24, 24, generator=g)  # correlated inputs
    x[:, 5] = 0  # a dead input
    h = (x.T @ x).double()
    w = torch.randn(10, 24, generator=g)
    ours = sparsegpt_prune(w, h, sparsity, nm, blocksize=blocksize)
    ref = obs_reference(w, h, sparsity, nm, blocksize)
    assert torch.equal(ours == 0, ref == 0)
    torch.testing.assert_close(ours.double(), ref, atol=1e-4, rtol=1e-4)
    if nm:
        assert ((ours != 0).reshape(10, -1, nm[1]).sum(-1) <= nm[0]).all()


def test_sparsegpt_reconstructs_better_than_magnitude_and_wanda():
    from shardtune.artifacts.prune import prune_mask, sparsegpt_prune

    g = torch.Generator().manual_seed(1)
    x = torch.randn(500, 64, generator=g) @ torch.randn(64, 64, generator=g) + 0.5
    w = torch.randn(32, 64, generator=g)
    err = {}
    for name in ("magnitude", "wanda", "sparsegpt"):
        if name == "sparsegpt":
            pruned = sparsegpt_prune(w, x.T @ x, None, (2, 4))
        else:
            score = w.abs() * (x.norm(dim=0) if name == "wanda" else 1)
            pruned = w * prune_mask(score, None, (2, 4), per_row=True)
        err[name] = ((x @ (w - pruned).T) ** 2).sum().item()
    assert err["sparsegpt"] < 0.7 * err["wanda"] < 0.7 * err["magnitude"], err


def test_sequential_calibration_feeds_each_block_the_pruned_outputs():
    """The captured block inputs replay the model; each block's statistics come from the outputs of
    the blocks before it *after* they were pruned."""
    from shardtune.artifacts.prune import _block_inputs, _run_block, calibration_statistics, decoder_blocks

    model = build_tiny_model("tiny-llama")
    model.eval()
    ids = torch.randint(4, 200, (3, 10))
    mask = torch.ones_like(ids)
    mask[0, 7:] = 0  # padding: excluded from the statistics
    batches = [{"input_ids": ids, "attention_mask": mask}]
    modules = {t.name: t.module for t in find_targets(model, "all-linear")}
    _, blocks = decoder_blocks(model, modules)
    items = _block_inputs(model, list(blocks), batches)
    hidden = items[0]["hidden"]
    for i, block in enumerate(blocks):
        items[0]["hidden"] = _run_block(block, i, items[0])
    replayed = model.lm_head(model.model.norm(items[0]["hidden"]))
    torch.testing.assert_close(replayed, model(input_ids=ids, attention_mask=mask).logits)
    seen = {}

    def record(name, statistic):
        seen[name] = statistic
        modules[name].weight.mul_(0.5)  # "prune": changes what the next blocks see

    calibration_statistics(model, modules, batches, "wanda", record)
    q1 = "model.layers.1.self_attn.q_proj"
    # recompute layer 1's q_proj input by hand: layer 0 already halved, padding dropped
    x = model.model.layers[0](hidden, *items[0]["calls"][0][0], **items[0]["calls"][0][1])
    x = x[0] if isinstance(x, tuple) else x
    x = model.model.layers[1].input_layernorm(x).reshape(-1, 64)[mask.reshape(-1).bool()].double()
    torch.testing.assert_close(seen[q1], (x * x).sum(0))


@pytest.mark.parametrize("pattern", [["--pattern", "2:4"], ["--sparsity", "0.5"]])
def test_prune_sparsegpt_from_the_cli_then_train_lors(tmp_path, pattern):
    raw = tiny_recipe(tmp_path, data={"num_samples": 32})
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(raw))
    args = ["prune", "tiny-llama", "--out", str(tmp_path / "sparse"), "--method", "sparsegpt"]
    args += ["--recipe", str(tmp_path / "r.yaml"), "--samples", "16", "--json", *pattern]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["method"] == "sparsegpt" and report["overall_sparsity"] == pytest.approx(0.5, abs=0.01)
    from transformers import AutoModelForCausalLM

    sparse = AutoModelForCausalLM.from_pretrained(tmp_path / "sparse")
    dense = build_tiny_model("tiny-llama")
    q, q0 = sparse.model.layers[1].self_attn.q_proj.weight, dense.model.layers[1].self_attn.q_proj.weight
    kept = q != 0
    assert not torch.equal(q[kept], q0[kept])  # SparseGPT also updates the weights it keeps
    if pattern[0] == "--pattern":
        assert ((q != 0).reshape(q.shape[0], -1, 4).sum(-1) <= 2).all()
    raw = tiny_recipe(
        tmp_path,
        model={"name": str(tmp_path / "sparse")},
        adapter={"method": "lors", "rank": 4, "init": "kaiming", "grad_mode": "authors"},
        train={"max_steps": 4},
    )
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(raw))
    assert runner.invoke(app, ["train", str(tmp_path / "t.yaml"), "-q"]).exit_code == 0
