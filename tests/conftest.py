"""Shared test helpers: tiny random models built in code (no download), small recipes."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

TINY = ["tiny-llama", "tiny-qwen2", "tiny-mistral", "tiny-gpt2"]


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
