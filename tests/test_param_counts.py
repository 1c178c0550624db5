"""`params` counts on a model's layout (shardtune.inspection.layout), not on the model: the counts equal those of
the instantiated model for every method and architecture, and a cached layout spares transformers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CONV1D_UNSUPPORTED, TINY_OPTIONS

from shardtune.adapters.model import inject_adapter, trainable_share
from shardtune.core.errors import ShardtuneError
from shardtune.inspection.layout import ModelLayout, layout_of, model_layout
from shardtune.inspection.params import count_on_layout, count_trainable, method_options
from shardtune.models.loading import TINY_CONFIGS, build_tiny_model

ROOT = Path(__file__).resolve().parents[1]
ARCHS = sorted(TINY_CONFIGS)
TARGETS = {  # a name list, a regex and all-linear with an exclusion
    "list": {"targets": ["q_proj", "v_proj", "c_attn"]},
    "regex": {"targets": r".*\.(mlp\.\w+|mlp\.c_fc)"},
    "exclude": {"targets": "all-linear", "exclude": ["o_proj", "c_proj"]},
}


def outcome(count):
    try:
        return count()
    except ShardtuneError as e:
        return type(e).__name__, str(e)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", sorted(TINY_OPTIONS))
def test_layout_counts_equal_the_instantiated_model(arch, method):
    """Trainable and base counts, and the errors of options that do not fit, are those of the real
    model with the adapter injected (weights allocated, tied head and all)."""
    for kind, targets in TARGETS.items():
        if kind == "list" and arch == "tiny-gpt2":
            targets = {"targets": ["c_attn"]}
        elif kind == "list":
            targets = {"targets": ["q_proj", "v_proj"]}
        options = method_options(method, **{**TINY_OPTIONS[method], **targets})

        def instantiated(options=options):
            model = build_tiny_model(arch)
            inject_adapter(model, options)
            return trainable_share(model)[:2]

        expected = outcome(instantiated)
        assert outcome(lambda options=options: count_trainable(TINY_CONFIGS[arch](), options)) == expected
        if method in CONV1D_UNSUPPORTED and arch == "tiny-gpt2":
            assert isinstance(expected[0], str)  # an error, and the same one


def test_layout_survives_json_and_names_every_linear_layer():
    layout = layout_of(TINY_CONFIGS["tiny-gpt2"]())
    assert ModelLayout.from_json(layout.to_json()) == layout
    head = [s for s in layout.linears if not s.adaptable]
    assert [s.name for s in head] == ["lm_head"]
    assert all(s.fan_in_fan_out for s in layout.linears if s.adaptable)
    assert layout.parameters == sum(p.numel() for p in build_tiny_model("tiny-gpt2").parameters())


def run_params(args: list[str], cache: Path) -> tuple[dict, bool]:
    """`shardtune params ARGS --json` in a fresh interpreter: (its report, whether transformers was
    imported)."""
    probe = (
        "import sys, json; from shardtune.cli import main\n"
        "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] == 'transformers')), file=sys.stderr)"
    )
    env = {**os.environ, "SHARDTUNE_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", probe, "params", *args, "--json"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    modules = json.loads(done.stderr.strip().splitlines()[-1])
    return json.loads(done.stdout), bool(modules)


def test_a_cached_layout_counts_without_importing_transformers(tmp_path):
    """First count on a model builds its layout (transformers imported); later ones read the cache and
    import nothing of transformers, with the same report, for a builtin and for a model directory."""
    model_dir = tmp_path / "model"
    build_tiny_model("tiny-qwen2").save_pretrained(model_dir)
    cache = tmp_path / "cache"
    for model in ["tiny-llama", str(model_dir)]:
        args = ["-m", model, "--compare", "--quantize", "nf4"]
        first, imported = run_params(args, cache)
        assert imported
        again, imported = run_params(args, cache)
        assert not imported, "a cached layout should spare transformers"
        assert again == first
    assert len(list((cache / "layouts").glob("*.json"))) == 2


def test_an_edited_config_is_counted_anew(tmp_path, monkeypatch):
    """The cache is keyed by the config's text: a changed config.json is never counted from an old
    layout, and a cache file that cannot be read is left alone while the count is made from the config."""
    model_dir = tmp_path / "model"
    build_tiny_model("tiny-llama").save_pretrained(model_dir)
    monkeypatch.setenv("SHARDTUNE_CACHE", str(tmp_path / "cache"))
    lora = method_options("lora", rank=4)
    two = model_layout(str(model_dir))
    text = (model_dir / "config.json").read_text()
    assert text.count('"num_hidden_layers": 2,') == 1
    (model_dir / "config.json").write_text(text.replace('"num_hidden_layers": 2,', '"num_hidden_layers": 3,'))
    three = model_layout(str(model_dir))
    assert count_on_layout(three, lora)[0] == count_on_layout(two, lora)[0] * 3 // 2
    paths = sorted((tmp_path / "cache" / "layouts").glob("*.json"))
    assert len(paths) == 2
    for path in paths:
        path.write_text("not json")
    assert model_layout(str(model_dir)) == three
    assert all(path.read_text() == "not json" for path in paths)


def test_remote_code_layouts_are_never_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("SHARDTUNE_CACHE", str(tmp_path / "cache"))
    model_layout("tiny-llama", trust_remote_code=True)
    assert not (tmp_path / "cache" / "layouts").exists()
    model_layout("tiny-llama")
    assert len(list((tmp_path / "cache" / "layouts").glob("*.json"))) == 1
