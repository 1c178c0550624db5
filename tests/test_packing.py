"""Packing done right (``data.packing``): whole examples share a row and never see each other.

The reference is each example run alone: the loss of a packed batch must be the token-weighted mean of
the examples' own losses (fp32, ≤ 1e-5), on Llama, Qwen2 and GPT-2, with SDPA and eager attention. A
transformers that does not read restarting position ids as separate sequences (seeded here by turning
its detection off) fails that comparison, and shardtune's own check refuses to train with it.
"""

from __future__ import annotations

import json
import random

import pytest
import torch
import transformers.masking_utils as masking_utils
from conftest import resumed_and_uninterrupted, tiny_recipe
from typer.testing import CliRunner

from shardtune.cli import app
from shardtune.data.examples import IGNORE, Collator, model_inputs, pack, real_tokens
from shardtune.models.loading import build_tiny_model, check_packed_examples_stay_apart
from shardtune.recipe.schema import recipe_from_dict

runner = CliRunner()


def random_examples(vocab: int, lengths, seed: int = 0) -> list[dict]:
    """Token rows with a few masked (prompt) tokens in front, and one whose first token is trained
    (plain text with no BOS): its packed predecessor must not learn to predict it."""
    rng = random.Random(seed)
    features = []
    for k, n in enumerate(lengths):
        ids = [rng.randrange(4, vocab) for _ in range(n)]
        masked = 0 if k % 3 == 0 else rng.randrange(0, n // 2)
        features.append({"input_ids": ids, "labels": [IGNORE] * masked + ids[masked:]})
    return features


def loss_alone(model, feature: dict) -> tuple[float, int]:
    """(summed token loss, tokens scored) of one example in a row of its own."""
    ids = torch.tensor([feature["input_ids"]])
    labels = torch.tensor([feature["labels"]])
    logits = model(input_ids=ids, use_cache=False).logits[0, :-1].double()
    targets = labels[0, 1:]
    keep = targets != IGNORE
    total = torch.nn.functional.cross_entropy(logits[keep], targets[keep], reduction="sum")
    return float(total), int(keep.sum())


def packed_loss(model, features: list[dict], max_length: int) -> tuple[float, dict]:
    rows = pack(features, max_length)
    batch = Collator(pad_token_id=0)(rows)
    return float(model(**model_inputs(batch)).loss), batch


@pytest.mark.parametrize(
    "alias,attention",
    [
        ("tiny-llama", "sdpa"),
        ("tiny-llama", "eager"),
        ("tiny-qwen2", "sdpa"),
        ("tiny-gpt2", "sdpa"),
        ("tiny-gpt2", "eager"),
    ],
)
def test_a_packed_batch_has_the_loss_of_its_examples_each_alone(alias, attention):
    model = build_tiny_model(alias)
    model.set_attn_implementation(attention)
    model.eval()
    vocab = model.get_input_embeddings().weight.shape[0]
    features = random_examples(vocab, [9, 3, 17, 6, 12, 5, 30, 2, 8, 11])
    with torch.no_grad():
        loss, batch = packed_loss(model, features, max_length=32)
        alone = [loss_alone(model, f) for f in features]
    assert batch["input_ids"].shape[0] < len(features)  # several examples per row, padding in some
    expected = sum(total for total, _ in alone) / sum(n for _, n in alone)
    assert abs(loss - expected) <= 1e-5 * max(1.0, abs(expected)), (loss, expected)


def test_examples_that_see_each_other_change_the_loss_and_are_refused(monkeypatch, tmp_path):
    """The seeded bug: transformers' packed-sequence detection off, so every example attends to the
    ones before it in its row (and the padding's position restart is ignored too)."""
    model = build_tiny_model("tiny-llama")
    model.eval()
    features = random_examples(model.get_input_embeddings().weight.shape[0], [9, 3, 17, 6, 12, 5, 30, 2])
    with torch.no_grad():
        alone = [loss_alone(model, f) for f in features]
        expected = sum(total for total, _ in alone) / sum(n for _, n in alone)
        monkeypatch.setattr(masking_utils, "find_packed_sequence_indices", lambda position_ids: None)
        leaked, _ = packed_loss(model, features, max_length=32)
    assert abs(leaked - expected) > 1e-4
    with pytest.raises(
        Exception, match=r"^data.packing: this model \(llama\) in transformers .* set data.packing: false"
    ):
        check_packed_examples_stay_apart(model)
    recipe = tiny_recipe(tmp_path, data={"packing": True})
    (tmp_path / "r.yaml").write_text(json.dumps(recipe))
    result = runner.invoke(app, ["train", str(tmp_path / "r.yaml")])
    assert result.exit_code == 2, result.output
    (line,) = [x for x in result.stderr.splitlines() if x.startswith("error:")]
    assert line.startswith("error: data.packing: this model (llama)") and "Traceback" not in result.stderr
    assert not (tmp_path / recipe["output"]["dir"]).exists() or not any(
        (tmp_path / recipe["output"]["dir"]).glob("adapter*")
    )


def test_the_collator_restarts_positions_at_each_example_and_at_the_padding():
    rows = [
        {"input_ids": [5] * 3 + [6] * 2, "labels": [IGNORE, 5, 5, IGNORE, 6], "lengths": [3, 2]},
        {"input_ids": [7] * 4, "labels": [IGNORE, 7, 7, 7], "lengths": [4]},
    ]
    batch = Collator(pad_token_id=0)(rows)
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]
    assert batch["input_ids"].tolist()[1] == [7, 7, 7, 7, 0] and batch["labels"].tolist()[1][-1] == IGNORE
    assert "attention_mask" not in batch and int(real_tokens(batch)) == 9
    inputs = model_inputs(batch)
    assert "num_tokens" not in inputs and inputs["use_cache"] is False
    plain = Collator(pad_token_id=0)(
        [{"input_ids": [5, 5], "labels": [5, 5]}, {"input_ids": [6], "labels": [6]}]
    )
    assert int(real_tokens(plain)) == 3 and model_inputs(plain).keys() == plain.keys()


def test_packing_fills_rows_on_a_skewed_length_mix():
    rng = random.Random(0)
    lengths = [min(256, max(2, int(rng.lognormvariate(3.5, 0.9)))) for _ in range(2000)]
    features = [{"input_ids": [1] * n, "labels": [1] * n} for n in lengths]
    rows = pack(features, 256)
    assert sorted(n for r in rows for n in r["lengths"]) == sorted(lengths)  # each example once, whole
    assert all(len(r["input_ids"]) <= 256 for r in rows)
    fill = sum(lengths) / (256 * len(rows))
    assert fill > 0.97, fill  # best-fit decreasing leaves almost no room


def test_a_packed_run_trains_counts_real_tokens_and_resumes_exactly(tmp_path):
    """Packing through the whole loop: the loss falls, tokens/s counts real tokens, and a resumed run
    continues exactly (the rows are a pure function of the data)."""
    sections = {
        "data": {"packing": True, "max_length": 64},
        "train": {"max_steps": 12, "save_every": 6, "batch_size": 4},
        "logging": {"every": 1},
    }
    again, final = resumed_and_uninterrupted(
        lambda where: recipe_from_dict(tiny_recipe(where, **sections)), tmp_path, checkpoint=6
    )
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [x["loss"] for x in lines if "loss" in x]
    assert len(losses) == 12 and sum(losses[-3:]) < sum(losses[:3])
    assert all(x["tokens_per_s"] > 0 for x in lines if "tokens_per_s" in x)
    assert again.keys() == final.keys()
    for key in final:
        assert torch.equal(again[key], final[key]), key
