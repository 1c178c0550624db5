"""merge, export (PEFT LoRA), params: the adapter leaves shardtune in formats others can use."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from conftest import TINY_OPTIONS, tiny_recipe
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig
from typer.testing import CliRunner

from shardtune.adapters.model import adapter_named_parameters
from shardtune.artifacts.checkpoint import load_adapted_model
from shardtune.cli import app
from shardtune.inspection.params import count_trainable, method_options
from shardtune.models.loading import build_tiny_model

runner = CliRunner()
peft = pytest.importorskip("peft")
IDS = torch.randint(4, 200, (2, 13), generator=torch.Generator().manual_seed(5))


def trained_run(tmp_path, method, model="tiny-llama", **adapter):
    """A run dir whose adapter is trained a few steps and then given random values everywhere."""
    raw = tiny_recipe(
        tmp_path,
        model={"name": model},
        adapter={"method": method, **TINY_OPTIONS[method], **adapter},
        train={"max_steps": 2},
    )
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert runner.invoke(app, ["train", str(path), "-q"]).exit_code == 0
    return tmp_path / "run"


def ours_logits(run_dir):
    model, _, _ = load_adapted_model(run_dir)
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize(
    "method, model, adapter",
    [
        ("lora", "tiny-llama", {}),
        ("lora", "tiny-gpt2", {"targets": ["c_attn", "c_fc"]}),
        ("fossil", "tiny-llama", {"rank": 6}),  # 64 % 6 ≠ 0: the exported P ends with a truncated identity
        ("fossil", "tiny-qwen2", {"mode": "mini", "mini_r": 16, "targets": ["q_proj", "v_proj", "up_proj"]}),
        ("mos", "tiny-llama", {}),
        ("sharelora", "tiny-mistral", {"share": "ab"}),
        ("sharelora", "tiny-llama", {"scope": "attention"}),
        ("vera", "tiny-llama", {}),
        ("vera", "tiny-gpt2", {"targets": ["c_attn", "c_fc"]}),
        ("vblora", "tiny-qwen2", {}),
        ("tiedlora", "tiny-mistral", {"trainable": "VBUA"}),
        ("prolora", "tiny-llama", {}),
    ],
)
def test_export_peft_loads_in_peft_with_equal_logits(tmp_path, method, model, adapter):
    run_dir = trained_run(tmp_path, method, model, **adapter)
    ours = ours_logits(run_dir)
    base = build_tiny_model(model)
    with torch.no_grad():
        assert (ours - base(IDS).logits).abs().max() > 1e-4  # the trained adapter changes the model
    # VeRA and VB-LoRA: PEFT's own type (their shared stores kept), and on request a dense LoRA
    native = {"vera": "VERA", "vblora": "VBLORA"}.get(method)
    stored = {}
    for form in ("peft", "peft-lora") if native else ("peft",):
        out = tmp_path / form
        result = runner.invoke(app, ["export", str(run_dir), "--format", form, "--out", str(out), "--json"])
        assert result.exit_code == 0, result.output
        config = json.loads((out / "adapter_config.json").read_text())
        if form == "peft" and native:
            assert config["peft_type"] == native
        else:
            assert config["peft_type"] == "LORA" and config["lora_alpha"] == config["r"]
        stored[form] = json.loads(result.stdout)["stored_parameters"]
        assert stored[form] == sum(t.numel() for t in load_file(out / "adapter_model.safetensors").values())
        loaded = peft.PeftModel.from_pretrained(build_tiny_model(model), str(out))
        with torch.no_grad():
            torch.testing.assert_close(loaded(IDS).logits, ours, atol=1e-5, rtol=1e-5)
    if native:  # what defines the method: fewer numbers than its dense LoRA form
        assert stored["peft"] < stored["peft-lora"]


def test_export_refuses_lors_and_unknown_formats(tmp_path):
    run_dir = trained_run(tmp_path, "lors")
    result = runner.invoke(app, ["export", str(run_dir), "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "cannot be written as a PEFT LoRA" in result.stderr
    result = runner.invoke(app, ["export", str(run_dir), "--format", "gguf", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "unknown format 'gguf'" in result.stderr
    result = runner.invoke(
        app, ["export", str(run_dir), "--format", "shardtune", "--out", str(tmp_path / "copy")]
    )
    assert result.exit_code == 0
    torch.testing.assert_close(ours_logits(tmp_path / "copy"), ours_logits(run_dir))


@pytest.mark.parametrize(
    "method, dtype, adapter",
    [
        *((m, d, {}) for m in ("lora", "fossil", "mos", "sharelora") for d in ("fp32", "bf16")),
        *((m, "fp32", {}) for m in ("vera", "vblora", "tiedlora", "prolora")),
        ("fossil", "fp32", {"mode": "bat"}),
        ("fossil", "bf16", {"mode": "bat"}),
    ],
)
def test_merge_gives_a_plain_transformers_model(tmp_path, method, dtype, adapter):
    run_dir = trained_run(tmp_path, method, **adapter)
    ours = ours_logits(run_dir)
    result = runner.invoke(app, ["merge", str(run_dir), "--out", str(tmp_path / "merged"), "--dtype", dtype])
    assert result.exit_code == 0, result.output
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert plain.dtype == {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    assert not any("adapter" in n or "shardtune" in n for n, _ in plain.named_parameters())
    with torch.no_grad():
        err = (plain(IDS).logits.float() - ours).abs().max().item()
        if dtype == "fp32":
            assert err < 1e-4
        else:  # "within dtype tolerance": no worse than casting the base model itself to bf16, twice over
            base_err = (
                (
                    build_tiny_model("tiny-llama", torch.bfloat16)(IDS).logits.float()
                    - build_tiny_model("tiny-llama")(IDS).logits
                )
                .abs()
                .max()
                .item()
            )
            assert err <= 2 * base_err, (err, base_err)
    assert (tmp_path / "merged" / "tokenizer.json").is_file()


def test_export_refuses_fossil_bat(tmp_path):
    run_dir = trained_run(tmp_path, "fossil", mode="bat")
    result = runner.invoke(app, ["export", str(run_dir), "--out", str(tmp_path / "x")])
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        "error: export: this fossil adapter cannot be written as a PEFT LoRA: its update (W + I)·D depends on "
        "the base weight and is not low-rank; use `shardtune merge` instead"
    ]
    assert not (tmp_path / "x").exists()


def test_merge_lors_keeps_sparsity(tmp_path):
    result = runner.invoke(
        app, ["prune", "tiny-llama", "--out", str(tmp_path / "sparse"), "--pattern", "2:4"]
    )
    assert result.exit_code == 0
    run_dir = trained_run(tmp_path, "lors", str(tmp_path / "sparse"))
    sparse = AutoModelForCausalLM.from_pretrained(tmp_path / "sparse")
    assert (
        runner.invoke(app, ["merge", str(run_dir), "--out", str(tmp_path / "m"), "--dtype", "fp32"]).exit_code
        == 0
    )
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    before, after = dict(sparse.named_parameters()), dict(merged.named_parameters())
    changed = 0
    for name, w in before.items():
        if w.dim() == 2 and "proj" in name:
            assert torch.equal(w == 0, after[name] == 0), name  # the zero pattern, bit for bit
            changed += int(not torch.equal(w, after[name]))
    assert changed > 0
    torch.testing.assert_close(merged(IDS).logits, ours_logits(run_dir), atol=1e-4, rtol=0)


def test_interrupted_merge_leaves_nothing(tmp_path, monkeypatch):
    run_dir = trained_run(tmp_path, "lora")

    def disk_full(self, path, *a, **k):
        (path / "model.safetensors").write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(type(load_adapted_model(run_dir)[0]), "save_pretrained", disk_full)
    result = runner.invoke(app, ["merge", str(run_dir), "--out", str(tmp_path / "merged")])
    assert result.exit_code == 5 and "no space left on the device" in result.stderr  # a machine fault
    assert not (tmp_path / "merged").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".merged")]


LLAMA2_7B = LlamaConfig(
    hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, vocab_size=32000
)
ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.mark.parametrize(
    "method, options, paper",
    [  # the papers' LLaMA-2-7B figures (all seven projections)
        ("lora", {"rank": 36}, 89_948_160),  # MiSS paper Table 5: LoRA 89.9M
        ("fossil", {"rank": 64}, 87_031_808),  # MiSS paper Table 5: MiSS 87.0M
        ("lora", {"rank": 2}, 4_997_120),  # MoS paper: LoRA r=2, 5.00M
        ("mos", {"rank": 8, "equivalent_rank": 2}, 4_997_120),  # MoS (4/8): 5.00M
        ("mos", {"rank": 32, "equivalent_rank": 8}, 19_988_480),  # MoS (16/32): 19.99M
        ("lora", {"rank": 64}, 159_907_840),  # MoS paper: LoRA r=64, 159.91M
        ("sharelora", {"rank": 64, "share": "ab"}, 4_997_120),  # ShareAB, −96.9 %
    ],
)
def test_params_match_paper_figures(method, options, paper):
    trainable, base = count_trainable(LLAMA2_7B, method_options(method, targets=ALL7, **options))
    assert trainable == paper
    assert base == 6_738_415_616


@pytest.mark.parametrize("method", list(TINY_OPTIONS))
def test_params_equal_instantiated_counts(method):
    from shardtune.adapters.model import inject_adapter
    from shardtune.models.loading import TINY_CONFIGS

    options = method_options(method, targets="all-linear", **TINY_OPTIONS[method])
    model = build_tiny_model("tiny-llama")
    inject_adapter(model, options)
    instantiated = sum(p.numel() for _, p in adapter_named_parameters(model))
    assert count_trainable(TINY_CONFIGS["tiny-llama"](), options)[0] == instantiated


def test_params_cli_compare_and_70b(tmp_path):
    config = LlamaConfig(
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        vocab_size=32000,
    )
    config.save_pretrained(tmp_path / "llama70b")
    result = runner.invoke(
        app,
        [
            "params",
            "--model",
            str(tmp_path / "llama70b"),
            "--compare",
            "--rank",
            "16",
            "--targets",
            "all-linear",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    rows = {r["method"]: r for r in json.loads(result.stdout)["methods"]}
    from shardtune.adapters import METHODS

    assert rows.keys() == set(METHODS)  # every method, each with the options it understands
    assert all(r["trainable"] for r in rows.values()), rows
    assert all(rows[m]["trainable"] < rows["lora"]["trainable"] for m in ("vera", "tiedlora", "prolora"))
    # VB-LoRA trains h logits per sub-vector of length b: with PEFT's h = b = 256 that is LoRA's count
    # plus the bank (its saving is in what is stored: k indices and k − 1 weights per sub-vector)
    assert rows["vblora"]["trainable"] == rows["lora"]["trainable"] + 256 * 256
    assert rows["lora"]["base"] > 68e9 and rows["lora"]["vs_lora"] == 1.0
    assert rows["fossil"]["trainable"] < rows["lora"]["trainable"]
    result = runner.invoke(
        app,
        [
            "params",
            "--model",
            "tiny-llama",
            "--method",
            "mos",
            "--set",
            "equivalent_rank=2",
            "--rank",
            "2",
            "--targets",
            "all-linear",
        ],
    )
    assert result.exit_code == 0 and "mos" in result.output
    result = runner.invoke(app, ["params", "--model", "nope/none", "--method", "lora"])
    assert result.exit_code == 2 and "--model: 'nope/none' is not a builtin alias" in result.stderr


def test_the_vllm_line_takes_a_rank_vllm_accepts_and_the_pinned_revision(tmp_path):
    from shardtune.artifacts.export import vllm_command, vllm_max_lora_rank

    accepted = [vllm_max_lora_rank(r) for r in range(1, 1025)]
    assert accepted[:1] == [1] and set(accepted[1:8]) == {8} and set(accepted[8:16]) == {16}
    assert {r: accepted[r - 1] for r in (17, 33, 65, 129, 257, 300, 320, 321, 512)} == {
        17: 32,
        33: 64,
        65: 128,
        129: 256,
        257: 320,
        300: 320,
        320: 320,
        321: 512,
        512: 512,
    }
    assert set(accepted[512:]) == {None}  # vLLM serves no LoRA above rank 512
    line = vllm_command("org/model", tmp_path / "a", 16, revision="0123abc")
    assert line.startswith("vllm serve org/model --revision 0123abc --enable-lora") and line.endswith("16")
    assert "--revision" not in vllm_command("org/model", tmp_path / "a", 16)


def test_vera_exported_as_peft_says_vllm_needs_the_lora_form(tmp_path):
    run_dir = trained_run(tmp_path, "vera")
    result = runner.invoke(app, ["export", str(run_dir), "--out", str(tmp_path / "vera")])
    assert result.exit_code == 0, result.output
    assert "written as a PEFT VERA adapter" in result.stdout
    assert (
        "not served by vLLM: vLLM serves LoRA adapters only: write this vera adapter with --format peft-lora"
        in (result.stdout)
    )
    result = runner.invoke(app, ["export", str(run_dir), "-f", "peft-lora", "--out", str(tmp_path / "lora")])
    assert "serve with: vllm serve" in result.stdout


def test_an_own_peft_export_starts_a_run_of_the_same_recipe(tmp_path):
    """The export folds the scale α/r into B and writes α = r; init_from with the recipe's α rescales B,
    so the run starts from the exported update."""
    from safetensors.torch import load_file as load

    run_dir = trained_run(tmp_path, "lora", alpha=16.0)
    assert runner.invoke(app, ["export", str(run_dir), "--out", str(tmp_path / "peft")]).exit_code == 0
    raw = tiny_recipe(
        tmp_path / "again",
        adapter={
            "method": "lora",
            **TINY_OPTIONS["lora"],
            "alpha": 16.0,
            "init_from": str(tmp_path / "peft"),
        },
        train={"max_steps": 1, "lr": 1e-12},
    )
    (tmp_path / "again.yaml").write_text(yaml.safe_dump(raw))
    result = runner.invoke(app, ["train", str(tmp_path / "again.yaml"), "-q"])
    assert result.exit_code == 0, result.output
    first, again = (
        load(run_dir / "adapter.safetensors"),
        load(tmp_path / "again" / "run" / "adapter.safetensors"),
    )
    assert first.keys() == again.keys()
    for key in first:
        torch.testing.assert_close(again[key], first[key], atol=1e-8, rtol=1e-6)
