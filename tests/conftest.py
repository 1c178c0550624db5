"""Shared test helpers: tiny random models built in code (no download), small recipes."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

TINY = ["tiny-llama", "tiny-qwen2", "tiny-mistral", "tiny-gpt2"]


# Options that are valid on the 2-layer tiny models for every method (MoS needs a pool large
# enough for its rank: (rank − private) ≤ (equivalent_rank − private) · layers).
TINY_OPTIONS = {
    "lora": {"rank": 4},
    "fossil": {"rank": 4},
    "mos": {"rank": 4, "equivalent_rank": 4, "private_rank": 1, "shards_per_vector": 2},
    "sharelora": {"rank": 4, "share": "a"},
    "lors": {"rank": 4, "alpha": 4, "init": "kaiming"},  # on a dense model the mask keeps everything
}
CONV1D_UNSUPPORTED = {"lors"}  # methods that need nn.Linear (GPT-2 uses Conv1D)


def tiny_options(method: str, **kw):
    from shardtune.adapters import METHODS

    return METHODS[method].Options(method=method, **{**TINY_OPTIONS[method], **kw})


def copy_task(tmp_path):
    """64 examples of equal length (a data file): every micro-batch's or process's mean loss weighs its
    tokens as the mean over the whole batch does."""
    import json

    rows = [
        {"prompt": f"copy {a}{b}{c} =", "completion": f" {a}{b}{c}"}
        for a in "abcd"
        for b in "abcd"
        for c in "abcd"
    ]
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    return data


def tiny_recipe(tmp_path, **sections) -> dict:
    """A recipe dict for a seconds-long CPU run; pass sections to override (merged one level deep)."""
    raw = {
        "model": {"name": "tiny-llama"},
        "adapter": {"method": "lora", "rank": 4, "targets": "all-linear"},
        "data": {"task": "repeat", "num_samples": 128, "eval_samples": 16, "max_length": 48},
        "train": {"max_steps": 12, "batch_size": 8, "lr": 1e-2, "seed": 0},
        "output": {"dir": str(tmp_path / "run")},
        "logging": {"every": 4},
    }
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value}
    return raw


@pytest.fixture
def input_ids():
    g = torch.Generator().manual_seed(1)
    return torch.randint(4, 260, (2, 11), generator=g)
