"""The speed benchmarks run end to end (tiny settings) and write what docs/benchmarks.md reads: every
variant's row, the ablation rows beside the variants they switch a lever off in, the JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def run(script: str, *args: str) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return done


def test_step_time_with_ablations_writes_every_row(tmp_path):
    only = "frozen base,shardtune lora,shardtune mos,lora (unfused),mos (per-layer gather)"
    out = tmp_path / "st.json"
    done = run(
        "step_time.py",
        "--rounds",
        "1",
        "--steps",
        "1",
        "--ablations",
        "--floor",
        "--only",
        only,
        "--json",
        str(out),
    )
    rows = {r["variant"]: r for r in json.loads(out.read_text())["rows"]}
    assert list(rows) == [*only.split(","), "floor (computed)", "floor (from memory)"]
    floor, cold = rows.pop("floor (computed)"), rows.pop("floor (from memory)")
    assert floor["step_ms"] > rows["frozen base"]["step_ms"] and floor["trainable_params"] is None
    assert cold["step_ms"] > rows["frozen base"]["step_ms"] and cold["trainable_params"] is None
    assert rows["frozen base"]["vs_frozen_base"] == 1.0
    assert rows["lora (unfused)"]["trainable_params"] == rows["shardtune lora"]["trainable_params"] > 0
    assert rows["mos (per-layer gather)"]["trainable_params"] == rows["shardtune mos"]["trainable_params"] > 0
    assert all(r["step_ms"] > 0 for r in rows.values())
    assert "mos (per-layer gather)" in done.stdout


def test_profile_step_splits_each_variants_step_and_writes_json(tmp_path):
    """``profile_step.py``: per variant the step's operators (kernels on a GPU) with their time and count,
    and where an adapter spends more than the frozen base (its rank-r products among them)."""
    out = tmp_path / "prof.json"
    done = run(
        "profile_step.py", "--variants", "frozen base,shardtune lora", "--steps", "1", "--batch", "1",
        "--seq", "16", "--top", "40", "--json", str(out),
    )  # fmt: skip
    variants = json.loads(out.read_text())["variants"]
    assert list(variants) == ["frozen base", "shardtune lora"]
    frozen, lora = variants["frozen base"], variants["shardtune lora"]
    assert 0 < frozen["count"] < lora["count"] and frozen["busy_ms"] > 0 and lora["wall_ms"] > 0
    assert lora["names"]["aten::addmm_"]["count"] > frozen["names"].get("aten::addmm_", {"count": 0})["count"]
    assert "shardtune lora: where it spends more than frozen base" in done.stdout
    assert "aten::addmm_" in done.stdout.split("where it spends more")[1]


def test_layer_time_checks_its_variants_and_writes_json(tmp_path):
    out = tmp_path / "lt.json"
    run("layer_time.py", "--tokens", "16", "--reps", "1", "--rounds", "1", "--json", str(out))
    rows = json.loads(out.read_text())["rows"]
    variants = {r["variant"] for r in rows}
    assert {"frozen", "general", "fused"} <= variants
    assert {r["shape"] for r in rows} >= {"1b gate/up", "smollm2 down"}


def test_each_ablation_switches_its_lever_off():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import step_time
    import torch

    from shardtune.adapters.model import adapted_layers

    specs = step_time.variants(16, 4)
    for name, (of, how) in step_time.ABLATIONS.items():
        model = step_time.prepare((*specs[of], how), "small", torch.float32, "cpu", "float32")
        kept = step_time.prepare(specs[of], "small", torch.float32, "cpu", "float32")
        layers, kept_layers = adapted_layers(model).values(), adapted_layers(kept).values()
        if how == "unfused":
            for layer, kept_layer in zip(layers, kept_layers, strict=True):
                forms = [layer.adapter.low_rank_factors(), layer.adapter.block_sum_shard()]
                kept_forms = [kept_layer.adapter.low_rank_factors(), kept_layer.adapter.block_sum_shard()]
                assert forms == [None, None] and kept_forms != [None, None], name
        elif how == "no products":  # the frozen model's output; A and B get zero gradients
            ids = torch.randint(0, 4096, (1, 8))
            model(input_ids=ids).logits.sum().backward()
            assert all(not p.grad.any() for p in model.parameters() if p.requires_grad), name
            for layer in kept_layers:
                layer.enabled = False
            torch.testing.assert_close(model(input_ids=ids).logits, kept(input_ids=ids).logits)
        elif how in step_time.EARLIER_LAYERS:  # the same gradients through earlier fused layers
            ids = torch.randint(0, 4096, (1, 8))
            for m in (model, kept):
                torch.manual_seed(1)  # B non-zero, the same in both: A gets a gradient too
                for layer in adapted_layers(m).values():
                    torch.nn.init.normal_(layer.adapter.lora_B, std=0.02)
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    m(input_ids=ids).logits.float().pow(2).mean().backward()
            for layer, kept_layer in zip(layers, kept_layers, strict=True):
                assert layer.forward.func is step_time.forward_through
                assert layer.forward.args[0] is step_time.EARLIER_LAYERS[how]
                for p, q in zip(layer.adapter.parameters(), kept_layer.adapter.parameters(), strict=True):
                    assert p.grad.dtype == torch.float32
                    torch.testing.assert_close(p.grad, q.grad, atol=3e-2 * q.grad.abs().max().item(), rtol=0)
        else:
            assert not model.shardtune_stores.assemble_per_step and kept.shardtune_stores.assemble_per_step


def test_the_floor_times_the_products_a_rank_r_layer_adds():
    """The floor's six products are those of the fused layer's docstring, on one projection's shapes:
    forward h = x·Aᵀ and the update into y; backward dB, dh, dA and the update into dx."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import step_time

    n_in, n_out, rank, tokens = 24, 40, 4, 8
    products, base_dx = step_time.rank_r_products(n_in, n_out, rank, tokens, torch.float32, "cpu")
    shapes = [tuple(fn().shape) for fn in products.values()]
    assert shapes == [
        (tokens, rank),
        (tokens, n_out),
        (n_out, rank),
        (tokens, rank),
        (rank, n_in),
        (tokens, n_in),
    ]
    assert tuple(base_dx().shape) == (tokens, n_in)
    shapes = step_time.projection_shapes("small")
    assert shapes["k_proj"] == (512, 256) and shapes["down_proj"] == (1408, 512)


def test_the_cold_floor_evicts_the_caches_before_each_timed_call(monkeypatch):
    """``cold``: every timed call comes right after a write larger than the caches (none in the warm-up)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import step_time

    order = []
    monkeypatch.setattr(step_time, "evict_caches", lambda device: order.append("evict"))
    step_time.per_call_ms(lambda: order.append("call"), "cpu", samples=2, calls=3, cold=True)
    assert order == ["call"] * 3 + ["evict", "call"] * 6
    order.clear()
    step_time.per_call_ms(lambda: order.append("call"), "cpu", samples=2, calls=3)
    assert order == ["call"] * 9
    assert step_time.EVICT_BYTES >= 4 * 32 * 2**20  # 4× the CI CPU's L3, 5× an H100's L2


def test_layer_overhead_times_every_variant_and_its_plain_function_computes_the_fused_layers_gradients(
    tmp_path,
):
    out = tmp_path / "lo.json"
    done = run("layer_overhead.py", "--reps", "5", "--rounds", "1", "--layers", "28", "--json", str(out))
    rows = json.loads(out.read_text())["rows"]
    assert [r["variant"] for r in rows] == [
        "nn.Linear (frozen)",
        "bare autograd.Function",
        "plain Function, LoRA's products",
        "fused layer (_LowRankLinear)",
        "AdaptedLinear (LoRA)",
    ]
    assert rows[0]["above_frozen_us"] == 0 and all(r["us"] > 0 for r in rows)
    assert rows[-1]["ms_per_step"]["28"] == pytest.approx(28e-3 * rows[-1]["above_frozen_us"])
    assert "AdaptedLinear (LoRA)" in done.stdout

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import layer_overhead

    from shardtune.adapters.base import AdaptedLinear
    from shardtune.adapters.lora import LoraAdapter

    torch.manual_seed(0)
    base = torch.nn.Linear(8, 6, bias=False, dtype=torch.float64).requires_grad_(False)
    layer = AdaptedLinear(base, LoraAdapter(8, 6, 4, scale=2.0).double(), fan_in_fan_out=False)
    torch.nn.init.normal_(layer.adapter.lora_B)
    x = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(3, 6, dtype=torch.float64)
    wants = [x, layer.adapter.lora_A, layer.adapter.lora_B]
    grads = {}
    for name, fn in layer_overhead.variants(layer).items():
        if "LoRA" in name or "fused" in name:
            grads[name] = torch.autograd.grad(fn(x), wants, dy)
    reference = grads.pop("AdaptedLinear (LoRA)")
    assert len(grads) == 2
    for got in grads.values():
        for g, want in zip(got, reference, strict=True):
            torch.testing.assert_close(g, want)


def test_packing_benchmark_times_both_on_the_same_examples(tmp_path, monkeypatch, capsys):
    """``packing.py`` (in this process): padding and packing over the same examples, the pad share of
    each from its batches, and the speed-up of useful tokens per second."""
    from benchmarks import packing

    out = tmp_path / "packing.json"
    argv = ["packing.py", "--shape", "small", "--examples", "24", "--median", "20", "--max-length", "128"]
    monkeypatch.setattr(sys, "argv", [*argv, "--rounds", "1", "--batch", "4", "--json", str(out)])
    packing.main()
    found = json.loads(out.read_text())
    padding, packed = found["rows"]
    assert (padding["variant"], packed["variant"]) == ("padding", "packing")
    assert packed["token_slots"] >= found["useful_tokens"] and packed["pad_share"] < padding["pad_share"]
    assert padding["token_slots"] > found["useful_tokens"] and padding["batches"] == 6
    for row in (padding, packed):
        assert row["useful_tokens_per_s"] == pytest.approx(found["useful_tokens"] / row["seconds"])
    assert found["speedup"] == pytest.approx(packed["useful_tokens_per_s"] / padding["useful_tokens_per_s"])
    assert "packing / padding, useful tokens per second" in capsys.readouterr().out


def test_streaming_benchmark_trains_streamed_and_reads_whole_each_in_its_own_process(
    tmp_path, monkeypatch, capsys
):
    """``streaming.py``: the file generated once (a second run reuses it), the streamed run trains its
    steps and the whole read reads every record, each process's peak memory reported; the watchdog
    stops a variant above the cap."""
    from benchmarks import streaming

    data, out = tmp_path / "big.jsonl", tmp_path / "streaming.json"
    argv = [
        "streaming.py",
        "--gb",
        "0.0005",
        "--record-kb",
        "0.05",
        "--file",
        str(data),
        "--model",
        "tiny-llama",
    ]
    monkeypatch.setattr(
        sys, "argv", [*argv, "--steps", "2", "--batch", "2", "--max-length", "64", "--json", str(out)]
    )
    streaming.main()
    found = json.loads(out.read_text())
    streamed, small, whole = found["rows"]
    records = json.loads(data.with_suffix(".json").read_text())["records"]
    assert found["file"] == {"bytes": data.stat().st_size, "records": records} and records > 100
    assert streamed["steps"] == small["steps"] == 2 and whole["examples"] == records
    assert found["ratio"] == pytest.approx(whole["peak_rss_bytes"] / streamed["peak_rss_bytes"])
    assert found["streamed_over_small"] == pytest.approx(streamed["peak_rss_bytes"] / small["peak_rss_bytes"])
    assert "whole read / streamed, peak resident memory" in capsys.readouterr().out
    stamp = data.stat().st_mtime_ns
    monkeypatch.setattr(
        sys, "argv", [*argv, "--steps", "2", "--batch", "2", "--max-length", "64", "--cap-gb", "0.05"]
    )
    streaming.main()
    assert data.stat().st_mtime_ns == stamp  # the same file, not generated again
    assert "> 0.05 GiB" in capsys.readouterr().out  # (a Python process with torch holds more)
