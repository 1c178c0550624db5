"""Shared test helpers: tiny random models built in code (no download), small recipes."""

from __future__ import annotations

import os
import re

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# Under pytest-xdist (make test) each worker computes on one thread, and so do the processes it starts:
# the workers share the cores.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
else:
    torch.set_num_threads(min(2, torch.get_num_threads()))

TINY = ["tiny-llama", "tiny-qwen2", "tiny-mistral", "tiny-gpt2"]

# make test runs the suite on 2 workers (pytest-xdist, --dist loadgroup). These run on one worker, one
# after another: a module whose fixture is an expensive run its tests share (made once, not once per
# worker), and each docs page, whose blocks run in order in one scratch directory.
ONE_WORKER_MODULES = ("tests/test_multinode.py", "tests/test_slurm.py")
DOCS_BLOCK = re.compile(
    r"tests/test_docs_commands\.py::test_the_documented_commands_run\[(?P<page>[^:\]]+):\d+\]$"
)


def worker_group(nodeid: str) -> str:
    """The unit of work a worker takes whole: the module, the docs page, or the test itself."""
    path = nodeid.partition("::")[0]
    if path in ONE_WORKER_MODULES:
        return path
    block = DOCS_BLOCK.match(nodeid)
    return f"docs:{block['page']}" if block else nodeid


@pytest.hookimpl(tryfirst=True)
def pytest_xdist_make_scheduler(config, log):
    """``--dist loadgroup`` by :func:`worker_group` (xdist's own reads ``xdist_group`` marks through
    ``item._nodeid``, which pytest 9 no longer uses, so its groups fall apart); the largest groups
    are handed out first."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class GroupScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return worker_group(nodeid)

    return GroupScheduling(config, log)


@pytest.fixture(scope="session")
def preimported():
    """``preimported.env(env)``: ``env`` in which ``shardtune`` is the pre-imported one of tests/zygote.py,
    for shell commands where a process's own start is not the point: each command is still a process
    of its own, without the 4.5 s of imports every fresh one spends."""
    from zygote import Zygotes

    servers = Zygotes()
    yield servers
    servers.close()


# The signals whose handling a test may change in this process (the CLI's `main` and the launcher's
# ignore SIGTERM and SIGINT once their work is done, as the processes they are). A disposition left
# ignored would be inherited by every process a later test starts on this worker: a shell cannot trap
# a signal ignored on entry, so a SIGTERM sent to a job script would silently do nothing.
RESTORED_SIGNALS = ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGPIPE")


@pytest.fixture(autouse=True)
def signal_handlers_restored():
    """Each test leaves this process's signal handlers as it found them."""
    import signal

    saved = {name: signal.getsignal(getattr(signal, name)) for name in RESTORED_SIGNALS}
    yield
    for name, handler in saved.items():
        if handler is not None and signal.getsignal(getattr(signal, name)) != handler:
            signal.signal(getattr(signal, name), handler)


# Options that are valid on the 2-layer tiny models for every method (MoS needs a pool large
# enough for its rank: (rank − private) ≤ (equivalent_rank − private) · layers).
TINY_OPTIONS = {
    "lora": {"rank": 4},
    "fossil": {"rank": 4},
    "mos": {"rank": 4, "equivalent_rank": 4, "private_rank": 1, "shards_per_vector": 2},
    "sharelora": {"rank": 4, "share": "a"},
    "lors": {"rank": 4, "alpha": 4, "init": "kaiming"},  # on a dense model the mask keeps everything
    "vera": {"rank": 4},
    "vblora": {"rank": 4, "num_vectors": 32, "vector_length": 16},  # 16 divides 32, 64, 176 (and GPT-2's)
    "tiedlora": {"rank": 4},
    "prolora": {"rank": 4, "unshared_rank": 1, "share_a": 2, "share_b": 2},
}
# Training overrides for the 40-step loss test: VeRA trains only scaling vectors and needs the higher
# learning rates its paper uses; VB-LoRA mixes a bank that starts at ±0.02.
TINY_TRAIN = {"vera": {"lr": 5e-2}, "vblora": {"lr": 2e-2}}
CONV1D_UNSUPPORTED = {"lors"}  # methods that need nn.Linear (GPT-2 uses Conv1D)
NONZERO_INIT = {"vblora"}  # ΔW ≠ 0 at step 0 by design (PEFT's and the authors' VB-LoRA init)


def paper_count(options, targets) -> int:
    """Trainable parameters from the papers' formulas (not from the modules): r, sizes, layers per type."""
    from math import ceil

    m, r = options.method, getattr(options, "rank", None)
    kinds: dict[str, list] = {}
    for t in targets:
        kinds.setdefault(t.kind, []).append(t)
    if m in ("lora", "lors"):
        return sum(r * (t.in_features + t.out_features) for t in targets)
    if m == "mos":  # exactly LoRA at rank R
        return sum(options.equivalent_rank * (t.in_features + t.out_features) for t in targets)
    if m == "fossil":
        return sum(r * (options.mini_r if options.mode == "mini" else t.out_features) for t in targets)
    if m == "vera":  # L·Σ_t (r + d_out)
        return sum(r + t.out_features for t in targets)
    if m == "vblora":  # the bank h·b + logits r·h·(in + out)/b per layer
        h, b = options.num_vectors, options.vector_length
        return h * b + sum(r * h * (t.in_features + t.out_features) // b for t in targets)
    if m == "prolora":  # (r−u)(⌈in/m⌉ + ⌈out/n⌉) + u(in + out) per layer
        u = options.unshared_rank
        return sum(
            (r - u) * (ceil(t.in_features / options.share_a) + ceil(t.out_features / options.share_b))
            + u * (t.in_features + t.out_features)
            for t in targets
        )
    if m == "tiedlora":  # [A]·r·d_in + [B]·r·d_out + L·([u]·r + [v]·d_out) per type
        v, b, u, a = (c.isupper() for c in options.trainable)
        return sum(
            a * r * g[0].in_features + b * r * g[0].out_features + len(g) * (u * r + v * g[0].out_features)
            for g in kinds.values()
        )
    if m == "sharelora":
        return sum(
            r * g[0].in_features * (1 if "a" in options.share else len(g))
            + r * g[0].out_features * (1 if "b" in options.share else len(g))
            for g in kinds.values()
        )
    raise KeyError(m)


@torch.no_grad()
def randomize_adapter(model, seed: int = 0, std: float = 0.1) -> None:
    """Every trainable (adapter) parameter drawn from N(0, std²), on the CPU then copied to its device:
    an update ΔW ≠ 0 that a test can see (B starts at zero in most methods)."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.requires_grad:
            p.copy_(torch.randn(p.shape, generator=g) * std)


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
    if raw["data"].get("task") is None:
        raw["data"].pop("num_samples", None)  # the task's key: refused with another data source
    return raw


@pytest.fixture
def input_ids():
    g = torch.Generator().manual_seed(1)
    return torch.randint(4, 260, (2, 11), generator=g)


def resumed_and_uninterrupted(make_recipe, tmp_path, checkpoint: int) -> tuple[dict, dict]:
    """Train ``make_recipe(tmp_path)`` to the end, then resume a copy of its run (under
    ``tmp_path/again``, whose recipe is ``make_recipe(tmp_path / "again")``) from checkpoint-N;
    returns (the resumed run's final adapter tensors, the uninterrupted run's)."""
    import shutil

    from safetensors.torch import load_file

    from shardtune.training.loop import train

    train(make_recipe(tmp_path))
    final = load_file(tmp_path / "run" / "adapter.safetensors")
    (tmp_path / "again").mkdir()
    shutil.copytree(tmp_path / "run", tmp_path / "again" / "run")
    train(make_recipe(tmp_path / "again"), resume=tmp_path / "again" / "run" / f"checkpoint-{checkpoint}")
    return load_file(tmp_path / "again" / "run" / "adapter.safetensors"), final


@pytest.fixture(scope="session")
def two_step_run(tmp_path_factory):
    """A 2-step tiny run (the CLI, in this process), shared by the tests that only read it."""
    import yaml
    from typer.testing import CliRunner

    from shardtune.cli import app

    tmp = tmp_path_factory.mktemp("two-step")
    (tmp / "r.yaml").write_text(yaml.safe_dump(tiny_recipe(tmp, train={"max_steps": 2})))
    assert CliRunner().invoke(app, ["train", str(tmp / "r.yaml"), "-q"]).exit_code == 0
    return tmp / "run"
