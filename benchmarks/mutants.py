"""Seeded bugs: apply plausible one-line bugs to shardtune, one at a time, and check the tests catch them.

Each mutant names a file, an exact snippet of it (unique in that file), its replacement and the test
selection that should catch it. The script copies the repository into a temporary directory per worker
(never touching the working tree), applies one mutant there, runs its tests with ``-x`` and a timeout,
restores the file and records the outcome:

* ``caught``   — the tests failed (or ran past the timeout) with the bug in place;
* ``survived`` — they passed: a bug users could hit goes unnoticed;
* ``stale``    — the snippet is no longer found exactly once in the file (the code moved on): the mutant
  is not counted and should be updated;
* ``invalid``  — its tests fail or collect nothing without the bug (baseline), so the run says nothing.

Usage (from the repository root; ``make mutants`` runs the first line)::

    .venv/bin/python benchmarks/mutants.py                  # all mutants, 2 workers
    .venv/bin/python benchmarks/mutants.py -k mos -k lors   # only ids containing one of these
    .venv/bin/python benchmarks/mutants.py --list           # the mutants and whether they still apply
    .venv/bin/python benchmarks/mutants.py --no-baseline    # skip the un-mutated check of each selection

Results: a table on stdout and ``benchmarks/results/mutants.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "mutants.json"
IGNORED = (".venv", ".git", "__pycache__", ".pytest_cache", ".ruff_cache", "runs", "*.egg-info", "results")

A = "shardtune/adapters/"
GRID = "tests/test_option_grids.py"
STATES = "tests/test_state_machines.py"
BATCHES = "tests/test_training_batches.py"
FILES = "tests/test_adapter_files.py"
EQUIV = "tests/test_equivalences.py"
INITS = "tests/test_inits.py"
SAFETY = "tests/test_safety.py"
QUANT = "tests/test_quant.py"


@dataclass(frozen=True)
class Mutant:
    """One seeded bug: in ``file`` replace ``original`` (unique there) by ``replacement``; ``tests`` are
    the pytest arguments (files, ``-k`` expressions) expected to catch it."""

    id: str
    file: str
    original: str
    replacement: str
    tests: tuple[str, ...]
    why: str = ""


def m(id, file, original, replacement, *tests, why=""):
    return Mutant(id, file, original, replacement, tuple(tests), why)


# One mutant per entry, laid out as a table (the formatter would spread each over ten lines).
# fmt: off
MUTANTS: list[Mutant] = [
    # --- the spine (adapters/base.py) -----------------------------------------------------------------
    m("base-disable-ignored-by-replacing-layers", A + "base.py",
      "if self.enabled and self.adapter.replaces_base:", "if self.adapter.replaces_base:",
      STATES, "-k", "lors", why="a disabled LoRS layer still runs its masked merged weight"),
    m("base-disabled-merged-adds-delta", A + "base.py",
      "out = out - F.linear(x.float(), self.adapter.delta_weight().float()).to(out.dtype)",
      "out = out + F.linear(x.float(), self.adapter.delta_weight().float()).to(out.dtype)",
      STATES, "-k", "disabled", why="disabled while merged: ΔW added twice instead of taken out"),
    m("base-disabled-merged-keeps-delta", A + "base.py",
      "            if not self.enabled:\n                # ΔW is folded",
      "            if False:\n                # ΔW is folded",
      STATES, "-k", "disabled", why="the pre-fix behaviour: a merged layer ignores disable"),
    m("base-input-gradient-detached", A + "base.py",
      "out = self.adapter.add_delta(out, x)", "out = self.adapter.add_delta(out, x.detach())",
      GRID, "-k", "lora", why="no gradient to the input through the adapter path"),
    m("base-merge-not-idempotent", A + "base.py",
      "if not self.merged:\n            self._add_delta(+1.0)", "if True:\n            self._add_delta(+1.0)",
      STATES, "-k", "merge_twice", why="merging twice adds ΔW twice"),
    m("base-unmerge-adds", A + "base.py",
      "self._add_delta(-1.0)", "self._add_delta(+1.0)",
      STATES, "-k", "merge_twice", why="unmerge adds ΔW again"),
    m("base-conv1d-merge-untransposed", A + "base.py",
      "w = weight.float().T if self.fan_in_fan_out else weight.float()", "w = weight.float()",
      STATES, "-k", "gpt2", why="GPT-2 Conv1D weight (in, out) merged in the (out, in) orientation"),
    m("base-enable-ignored", A + "base.py",
      "        layer.enabled = enabled", "        layer.enabled = True",
      "tests/test_adapters.py", "-k", "disable_and_merge", why="adapter_disabled does nothing"),
    # --- LoRA ---------------------------------------------------------------------------------------
    m("lora-rslora-ignored", A + "lora.py",
      "return alpha / math.sqrt(rank) if rslora else alpha / rank", "return alpha / rank",
      GRID, "-k", "lora and rslora", why="rsLoRA scale α/√r replaced by α/r"),
    m("lora-dropout-skipped", A + "lora.py",
      "return F.linear(self.dropout(x), self.lora_A) * self.scale",
      "return F.linear(x, self.lora_A) * self.scale",
      GRID, "-k", "lora and dropout", why="dropout never applied"),
    m("lora-factors-unscaled", A + "lora.py",
      "return self.lora_A, self.lora_B * self.scale", "return self.lora_A, self.lora_B",
      STATES, "-k", "lora", why="merge/export forget the scale"),
    m("lora-kaiming-a0", A + "lora.py",
      "nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))", "nn.init.kaiming_uniform_(self.lora_A)",
      INITS, "-k", "lora", why="A init bound √(6/fan_in) instead of 1/√fan_in"),
    m("lora-info-rslora-ignored", A + "lora.py",
      '"scale": lora_scale(options.alpha, options.rank, options.rslora)}',
      '"scale": lora_scale(options.alpha, options.rank, False)}',
      FILES, "-k", "method_info", why="adapter.json scale wrong with rslora"),
    # --- FOSSIL -------------------------------------------------------------------------------------
    m("fossil-pad-left", A + "fused.py",
      "        s[:, : n_in - full] += flat[:, full:]", "        s[:, rank - (n_in - full) :] += flat[:, full:]",
      GRID, "-k", "fossil", why="zero padding on the wrong side when in % r ≠ 0"),
    m("fossil-dropout-skipped", A + "fossil.py",
      "s = self.block_sum(self.dropout(x))", "s = self.block_sum(x)", GRID, "-k", "fossil and dropout",
      why="dropout never applied"),
    m("fossil-mini-interleaved", A + "fossil.py",
      "return y.repeat(*([1] * (y.dim() - 1)), self.out_features // self.mini_r)",
      "return y.repeat_interleave(self.out_features // self.mini_r, dim=-1)",
      GRID, "-k", "fossil and mini", why="mini shard tiled element-wise instead of block-wise"),
    m("fossil-factor-p-interleaved", A + "fossil.py",
      "p = eye.repeat(1, self.n_blocks)[:, : self.in_features]",
      "p = eye.repeat_interleave(self.n_blocks, dim=1)[:, : self.in_features]",
      "tests/test_export.py", "-k", "peft_loads and fossil", why="exported P is not the block-sum matrix"),
    m("fossil-merge-slice-from-end", A + "fossil.py",
      "return self.full_shard().T.repeat(1, self.n_blocks)[:, : self.in_features]",
      "return self.full_shard().T.repeat(1, self.n_blocks)[:, -self.in_features :]",
      "tests/test_adapters.py", "-k", "fossil", why="merged ΔW misaligned when in % r ≠ 0"),
    m("fossil-merge-mini-interleaved", A + "fossil.py",
      "return self.shard.repeat(1, self.out_features // self.mini_r)",
      "return self.shard.repeat_interleave(self.out_features // self.mini_r, dim=1)",
      "tests/test_adapters.py", "-k", "fossil_mini", why="merged mini shard tiled element-wise"),
    m("fossil-blocks-floor", A + "fossil.py",
      "return math.ceil(self.in_features / self.rank)", "return self.in_features // self.rank",
      "tests/test_fused_paths.py", "-k", "fossil", why="the last partial block is dropped (merge, export)"),
    # --- MoS ----------------------------------------------------------------------------------------
    m("mos-scale-options-rank", A + "mos.py",
      "            options.alpha / rank,\n", "            options.alpha / options.rank,\n",
      GRID, "-k", "mos and subset", why="α/r with the option's r, not the layer's rank, without subset selection"),
    m("mos-info-options-rank", A + "mos.py",
      "rank, scale = next(iter(used.values()))", "rank, scale = options.rank, options.alpha / options.rank",
      FILES, "-k", "method_info", why="the pre-fix adapter.json rank/scale"),
    m("mos-pair-dissociation-ignored", A + "mos.py",
      "                    else public_a\n",
      "                    else _draw(n_public, n_routed, options.subset_selection, gen)\n",
      GRID, "-k", "mos and pair", why="pair_dissociation: false still draws B independently"),
    m("mos-private-block-overlap", A + "mos.py",
      "n_public + k * p * per_vec, n_public + (k + 1) * p * per_vec,",
      "n_public + k * p, n_public + k * p + p * per_vec,",
      GRID, "-k", "mos", why="private blocks of neighbouring layers overlap"),
    m("mos-b-assembly-transposed", A + "mos.py",
      ".reshape(self.rank, self.out_features)", ".reshape(self.out_features, self.rank).T",
      GRID, "-k", "mos", why="B's rank columns assembled from the wrong shards"),
    m("mos-init-shard-fan-in", A + "mos.py",
      "bound = 1 / math.sqrt(in_f)", "bound = 1 / math.sqrt(in_f // per_vec)",
      INITS, "-k", "mos", why="A-pool init with the shard's fan-in"),
    m("mos-dropout-skipped", A + "mos.py",
      "return add_low_rank(out, F.linear(self.dropout(x), a) * self.scale, b)",
      "return add_low_rank(out, F.linear(x, a) * self.scale, b)",
      GRID, "-k", "mos and dropout", why="dropout never applied"),
    m("mos-rank-without-private", A + "mos.py",
      "return (options.equivalent_rank - options.private_rank) * n_layers + options.private_rank",
      "return (options.equivalent_rank - options.private_rank) * n_layers",
      GRID, "-k", "mos and subset", why="without subset selection some public shards are never used"),
    # --- ShareLoRA ----------------------------------------------------------------------------------
    m("sharelora-rslora-ignored", A + "sharelora.py",
      "self.scale = lora_scale(options.alpha, options.rank, options.rslora)",
      "self.scale = options.alpha / options.rank",
      GRID, "-k", "sharelora and rslora", why="rsLoRA scale ignored"),
    m("sharelora-dropout-dropped", A + "sharelora.py",
      "super().__init__(target.in_features, target.out_features, options.dropout)",
      "super().__init__(target.in_features, target.out_features)",
      GRID, "-k", "sharelora and dropout", why="dropout option never reaches the layer"),
    m("sharelora-init-option-ignored", A + "sharelora.py",
      "nn.Parameter(_init_a(options.rank, t.in_features, options.init))",
      'nn.Parameter(_init_a(options.rank, t.in_features, "kaiming"))',
      INITS, "-k", "sharelora", why="init: normal ignored"),
    m("sharelora-normal-std", A + "sharelora.py",
      "return nn.init.normal_(a, std=1 / rank)", "return nn.init.normal_(a, std=1 / math.sqrt(rank))",
      INITS, "-k", "sharelora", why="N(0, 1/r) drawn with σ = 1/√r"),
    m("sharelora-factors-unscaled", A + "sharelora.py",
      'return self._factor("A"), self._factor("B") * self.scale', 'return self._factor("A"), self._factor("B")',
      STATES, "-k", "sharelora", why="merge/export forget the scale"),
    m("sharelora-shape-scope-in-size", A + "sharelora.py",
      'size = target.in_features if matrix == "A" else target.out_features', "size = target.in_features",
      GRID, "-k", "sharelora and shape", why="scope: shape groups B by the input size"),
    # --- LoRS ---------------------------------------------------------------------------------------
    m("lors-rslora-ignored", A + "lors.py",
      "return options.alpha / (math.sqrt(options.rank) if options.rslora else options.rank)",
      "return options.alpha / math.sqrt(options.rank)",
      GRID, "-k", "lors", why="rslora: false still scales by α/√r"),
    m("lors-info-scale", A + "lors.py",
      '"scale": lors_scale(options), "masked": True', '"scale": options.alpha / math.sqrt(options.rank), "masked": True',
      FILES, "-k", "method_info", why="the pre-fix adapter.json scale"),
    m("lors-db-unscaled", A + "lors.py",
      "d_b = g * (dy2.T @ (x2 @ lora_a.T))", "d_b = dy2.T @ (x2 @ lora_a.T)",
      GRID, "-k", "lors", why="the rearranged gradient of B misses s"),
    m("lors-exact-unmasked", A + "lors.py",
      "g *= weight[rows] != 0", "g = g", GRID, "-k", "lors and exact", why="exact gradient ignores the mask"),
    m("lors-exact-chunks-overwrite", A + "lors.py",
      "d_a += s * (lora_b[rows].T @ g)", "d_a = s * (lora_b[rows].T @ g)",
      GRID, "-k", "lors and exact", why="dA keeps only the last chunk"),
    m("lors-dx-ignores-adapter", A + "lors.py",
      "dx = (dy.to(weight.dtype) @ merged).to(x.dtype)", "dx = (dy.to(weight.dtype) @ weight).to(x.dtype)",
      GRID, "-k", "lors", why="input gradient through W only"),
    m("lors-merge-unmasked", A + "lors.py",
      "return (self.lora_B @ self.lora_A * self.scale) * self.mask()",
      "return self.lora_B @ self.lora_A * self.scale",
      STATES, "-k", "lors", why="merge fills the pruned zeros"),
    m("lors-init-gamma-multiplies", A + "lors.py",
      "top = v[:, : options.rank].T / options.init_gamma", "top = v[:, : options.rank].T * options.init_gamma",
      INITS, "-k", "lors", why="A = γ·Vᵀ instead of Vᵀ/γ"),
    m("lors-init-left-vectors", A + "lors.py",
      "_, _, v = torch.svd_lowrank(grad, q=q, niter=4)", "v, _, _ = torch.svd_lowrank(grad, q=q, niter=4)",
      INITS, "-k", "lors", why="left singular vectors"),
    m("lors-forward-unmasked", A + "lors.py",
      "return torch.where(weight != 0, weight + delta, torch.zeros((), dtype=weight.dtype, device=weight.device))",
      "return weight + delta",
      GRID, "-k", "lors", why="the forward is a dense LoRA"),
    # --- data.py ------------------------------------------------------------------------------------
    m("data-pad-labels-pad-id", "shardtune/data/examples.py",
      "labels = torch.full((len(features), width), IGNORE, dtype=torch.long)",
      "labels = torch.full((len(features), width), self.pad_token_id, dtype=torch.long)",
      BATCHES, why="the loss is taken on padding"),
    m("data-mask-covers-padding", "shardtune/data/examples.py",
      "mask[row, :n] = 1", "mask[row, :] = 1", BATCHES, why="attention to pad tokens"),
    m("data-prompt-trained", "shardtune/data/examples.py",
      "labels += piece if trainable else [IGNORE] * len(piece)", "labels += piece",
      BATCHES, why="no prompt masking"),
    m("data-eos-untrained", "shardtune/data/examples.py",
      "labels.append(tokenizer.eos_token_id)", "labels.append(IGNORE)", BATCHES,
      why="the model never learns to stop"),
    m("data-bos-trained", "shardtune/data/examples.py",
      "[IGNORE] * len(_bos(tokenizer)))", "_bos(tokenizer))", BATCHES, "-k", "bos", why="loss on BOS"),
    m("data-bos-never", "shardtune/data/examples.py",
      "return [tokenizer.bos_token_id] if ids and ids[0] == tokenizer.bos_token_id else []", "return []",
      BATCHES, "-k", "bos", why="BOS dropped for tokenizers that add it"),
    m("data-bos-in-chat", "shardtune/data/examples.py",
      "ids, labels = ([], []) if is_chat else", "ids, labels = ([], []) if False else",
      BATCHES, "-k", "bos", why="a second BOS in front of the chat template's"),
    m("data-prompt-ids-no-bos", "shardtune/data/examples.py",
      "return _bos(tokenizer) + tokenizer(example.prompt, add_special_tokens=False).input_ids",
      "return tokenizer(example.prompt, add_special_tokens=False).input_ids",
      BATCHES, "-k", "bos", why="generation prompts lack the BOS training had"),
    m("data-pack-labels-from-ids", "shardtune/data/examples.py",
      'labels += [IGNORE] + list(features[i]["labels"][1:])', 'labels += [IGNORE] + list(features[i]["input_ids"][1:])',
      "tests/test_packing.py", "-k", "loss_of_its_examples", why="packing loses the prompt masks"),
    m("data-truncate-left", "shardtune/data/examples.py",
      'return {"input_ids": ids[:max_length], "labels": labels[:max_length]}, truncated',
      'return {"input_ids": ids[-max_length:], "labels": labels[-max_length:]}, truncated',
      BATCHES, "-k", "truncation", why="truncation from the left"),
    m("data-chat-user-trained", "shardtune/data/examples.py",
      "                (before[len(done) :], False),", "                (before[len(done) :], True),",
      BATCHES, "-k", "chat", why="loss on user turns"),
    m("data-heldout-leak", "shardtune/data/examples.py",
      "return examples[n_eval:], examples[:n_eval]", "return examples, examples[:n_eval]",
      BATCHES, "-k", "heldout or loader", why="held-out examples are trained on"),
    m("data-heldout-uncapped", "shardtune/data/examples.py",
      "DEFAULT_EVAL_SAMPLES if count is None else min(DEFAULT_EVAL_SAMPLES, count // 5)",
      "DEFAULT_EVAL_SAMPLES",
      BATCHES, "-k", "heldout", why="by default a small data file is mostly held out"),
    m("data-keep-first-token-only-rows", "shardtune/data/examples.py",
      'if any(label != IGNORE for label in feat["labels"][1:]):', 'if any(label != IGNORE for label in feat["labels"]):',
      BATCHES, "-k", "truncation", why="rows whose only target is unpredictable are kept"),
    m("data-split-seed-ignored", "shardtune/data/examples.py",
      "random.Random(data.seed).shuffle(examples)", "random.Random(0).shuffle(examples)",
      BATCHES, "-k", "heldout", why="data.seed does not change the split"),
    # --- export.py ----------------------------------------------------------------------------------
    m("export-short-names-always", "shardtune/artifacts/export.py",
      "return sorted(short) if selected == set(names) else sorted(names)", "return sorted(short)",
      EQUIV, "-k", "full_paths", why="PEFT adapts layers the run never trained"),
    m("export-alpha-not-r", "shardtune/artifacts/export.py",
      '"lora_alpha": rank,', '"lora_alpha": 16,', EQUIV, "-k", "export", why="PEFT rescales the folded B"),
    m("export-fan-in-fan-out-false", "shardtune/artifacts/export.py",
      '"fan_in_fan_out": next(iter(fifo.values())),', '"fan_in_fan_out": False,',
      EQUIV, "-k", "gpt2", why="GPT-2 export loads transposed"),
    m("export-merge-skipped", "shardtune/artifacts/export.py",
      "    merge_adapter(model)\n    unwrap_merged(model)", "    unwrap_merged(model)",
      STATES, "-k", "merge_run", why="`shardtune merge` writes the base model"),
    # --- checkpoint.py + train.py (resume) ----------------------------------------------------------
    m("resume-rng-not-restored", "shardtune/artifacts/checkpoint.py",
      'torch.set_rng_state(rng["torch_cpu"])', "pass", FILES, "-k", "resume",
      why="dropout masks differ after resume"),
    m("resume-optimizer-moments-dropped", "shardtune/artifacts/checkpoint.py",
      'optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})',
      'optimizer.load_state_dict({"state": {}, "param_groups": meta["param_groups"]})',
      FILES, "-k", "resume", why="AdamW restarts from zero moments"),
    m("resume-checkpoints-keep-oldest", "shardtune/artifacts/checkpoint.py",
      "for old in list_checkpoints(run_dir)[:-keep]:", "for old in list_checkpoints(run_dir)[keep:]:",
      "tests/test_train.py", "-k", "keep_last", why="the newest checkpoints are deleted"),
    m("resume-scheduler-not-advanced", "shardtune/training/loop.py",
      "lr_factor(self.position.step, warmup", "lr_factor(self.position.step % 4, warmup",
      FILES, "-k", "resume", why="the learning-rate schedule restarts at each checkpoint interval"),
    m("resume-data-position-lost", "shardtune/training/loop.py",
      'Position(counters["step"], counters["epoch"], counters["batch_in_epoch"])',
      'Position(counters["step"], counters["epoch"], 0)', FILES, "-k", "resume",
      why="a resumed run sees the epoch's first batches again"),
    m("resume-epoch-lost", "shardtune/training/loop.py",
      'Position(counters["step"], counters["epoch"], counters["batch_in_epoch"])',
      'Position(counters["step"], 0, counters["batch_in_epoch"])', FILES, "-k", "resume",
      why="a resumed run replays epoch 0's order"),
    m("resume-batch-counter-off-by-one", "shardtune/training/loop.py",
      '"batch_in_epoch": batch_in_epoch,', '"batch_in_epoch": batch_in_epoch - 1,',
      FILES, "-k", "resume", why="one batch trained twice after resume"),
    m("resume-adapter-not-loaded", "shardtune/training/loop.py",
      "            attach_weights(self.model, self.resume_from)", "            pass",
      FILES, "-k", "resume", why="a resumed run starts from a fresh adapter"),
    m("train-grad-accum-ignored", "shardtune/training/loop.py",
      "gradient_accumulation_steps=cfg.grad_accum,", "gradient_accumulation_steps=1,",
      EQUIV, "-k", "grad_accumulation", why="every micro-batch steps the optimizer"),
    m("train-epoch-order-repeats", "shardtune/training/loop.py",
      "gen = torch.Generator().manual_seed(self.seed + self.epoch)", "gen = torch.Generator().manual_seed(self.seed)",
      BATCHES, "-k", "epoch_sampler", why="every epoch sees the same order"),
    m("sigterm-after-an-error-kills-before-the-line", "shardtune/training/loop.py",
      "and not (error_type is not None and self.several_processes):", ":",
      "tests/test_reliability.py", "-k", "stays_caught", why="a late SIGTERM kills a process before it says why"),
    m("ctrl-c-says-nothing-of-the-checkpoint", "shardtune/training/loop.py",
      "        except KeyboardInterrupt:\n", "        except ZeroDivisionError:\n",
      "tests/test_reliability.py", "-k", "ctrl_c_before", why="Ctrl-C: 'interrupted', no checkpoint, no command"),
    m("ctrl-c-torch-talk-on-stderr", "shardtune/training/launcher.py",
      "            logging.getLogger(name).setLevel(logging.CRITICAL)\n", "            pass\n",
      "tests/test_reliability.py", "-k", "ctrl_c_exits and 2",
      why="Ctrl-C under --nproc prints torch's 'Received 2 death signal' line"),
    m("launcher-stops-the-others-at-once", "shardtune/training/launcher.py",
      "FINISH_GRACE_S = 5.0", "FINISH_GRACE_S = 0.0",
      "tests/test_reliability.py", "-k", "silent_process",
      why="the first process of a machine is SIGTERMed before its error line (CI stop 26)"),
    m("launcher-leaves-its-log-dirs", "shardtune/training/launcher.py",
      "            _remove_empty_dirs(args.log_dir)\n", "            pass\n",
      "tests/test_multinode.py", "-k", "two_machines_train_what and lora-ddp",
      why="every --nproc run leaves an empty torchelastic_* tree in /tmp"),
    # --- evaluation and what the data looks like to the model ---------------------------------------
    m("eval-heldout-mean-of-batch-means", "shardtune/inspection/evaluate.py",
      "total += torch.stack([model(**batch).loss.float() * n_tokens, n_tokens.float()])",
      "total += torch.stack([model(**batch).loss.float(), torch.ones((), device=device)])",
      EQUIV, "-k", "heldout", why="held-out loss weighs short batches like long ones"),
    m("eval-generate-attends-padding", "shardtune/inspection/evaluate.py",
      "mask[row, width - len(p) :] = 1", "mask[row, :] = 1",
      EQUIV, "-k", "generation", why="batched answers depend on the other prompts' lengths"),
    m("checkpoints-sorted-by-name", "shardtune/artifacts/checkpoint.py",
      "return [p for _, p in sorted(found)]", "return [p for _, p in sorted(found, key=lambda f: f[1].name)]",
      FILES, "-k", "ordered", why="--resume picks checkpoint-9 over checkpoint-10"),
    m("data-text-rows-as-chat", "shardtune/data/examples.py",
      "is_chat = bool(example.messages) or (chat and bool(example.prompt))",
      "is_chat = bool(example.messages) or chat",
      BATCHES, "-k", "plain_text", why="text rows lose BOS and EOS under a chat template"),
    m("data-collate-pads-with-zero", "shardtune/data/examples.py",
      "ids = torch.full((len(features), width), self.pad_token_id, dtype=torch.long)",
      "ids = torch.full((len(features), width), 0, dtype=torch.long)",
      BATCHES, "-k", "collated", why="padding with token 0 instead of the tokenizer's pad"),
    m("data-task-heldout-same-seed", "shardtune/data/tasks.py",
      "held = self.generate(n_eval, seed + HELDOUT_SEED_OFFSET)\n", "held = self.generate(n_eval, seed)\n",
      "tests/test_data.py", "-k", "tasks", why="held-out task items are the first training items"),
    # --- more of the spine (adapters/model.py), LoRS init, the loop ---------------------------------
    m("model-exclude-ignored", A + "model.py",
      "chosen = [n for n in chosen if not any(_matches(n, p) for p in exclude or [])]", "chosen = list(chosen)",
      "tests/test_adapters.py", "-k", "target_resolution", why="adapter.exclude does nothing"),
    m("model-head-adapted", A + "model.py",
      "if isinstance(module, AdaptedLinear) or module is head:", "if isinstance(module, AdaptedLinear):",
      "tests/test_adapters.py", "-k", "target_resolution", why="all-linear adapts the output head"),
    m("model-base-not-frozen", A + "model.py",
      "        p.requires_grad_(False)", "        pass", "tests/test_adapters.py", "-k", "inject_freezes",
      why="the whole base model trains"),
    m("lors-init-samples-boundary", A + "lors.py",
      "if seen >= options.init_samples:", "if seen > options.init_samples:",
      INITS, "-k", "lors", why="the init uses one batch more than init_samples"),
    m("lors-init-leaves-hooks", A + "lors.py",
      "            handle.remove()", "            pass",
      INITS, "-k", "lors", why="after the init every forward still holds inputs for a dense gradient"),
    m("train-clip-every-micro-batch", "shardtune/training/loop.py",
      "            if accelerator.sync_gradients:\n                if self.cfg.max_grad_norm > 0:",
      "            if self.cfg.max_grad_norm > 0:\n                if True:",
      EQUIV, "-k", "grad_accumulation", why="partial accumulated gradients are clipped"),
    m("train-epochs-ignore-accumulation", "shardtune/training/loop.py",
      "len(self.data.loader) // self.accelerator.num_processes // cfg.grad_accum)",
      "len(self.data.loader) // self.accelerator.num_processes)",
      EQUIV, "-k", "epochs", why="train.epochs runs grad_accum times too many steps"),
    m("train-skip-kept-next-epoch", "shardtune/training/loop.py",
      "position.epoch, position.skip = position.epoch + 1, 0", "position.epoch = position.epoch + 1",
      FILES, "-k", "resume", why="after a resume every epoch skips its first batches"),
    m("resume-latest-is-oldest", "shardtune/artifacts/checkpoint.py",
      "        return found[-1] if found else None", "        return found[0] if found else None",
      FILES, "-k", "ordered", why="--resume continues from the oldest checkpoint"),
    m("export-merge-keeps-stores", "shardtune/artifacts/export.py",
      "        delattr(model, STORES_ATTR)", "        pass",
      STATES, "-k", "merge_run", why="the merged model directory carries the MoS pools"),
    m("mos-no-dissociation-without-subsets", A + "mos.py",
      'public_b = public_b[torch.randperm(n_public, generator=gen, device="cpu")]', "pass",
      GRID, "-k", "mos and subset", why="without subset selection A and B stay paired"),
    m("data-truncation-counted-at-max-length", "shardtune/data/examples.py",
      "truncated = len(ids) > max_length", "truncated = len(ids) >= max_length",
      BATCHES, "-k", "truncation", why="rows of exactly max_length reported as truncated"),
    m("data-pack-drops-a-full-last-row", "shardtune/data/examples.py",
      "    return packed\n\n\nclass Collator", "    return packed[:-1] or packed\n\n\nclass Collator",
      "tests/test_packing.py", "-k", "fills_rows", why="packing drops the last row (the examples in it are never trained on)"),
    # Precision-only changes, kept to show what tolerance-based tests cannot see (expected to survive):
    m("base-merge-in-base-dtype", A + "base.py",
      "delta = self.delta_weight().float()", "delta = self.delta_weight().bfloat16().float()",
      STATES, why="a bf16 base merged in bf16 (ΔW rounded before the add): one extra rounding"),
    m("lors-forward-under-autocast", A + "lors.py",
      "with torch.autocast(device_type=x.device.type, enabled=False):",
      "with torch.autocast(device_type=x.device.type, enabled=torch.is_autocast_enabled(x.device.type)):",
      EQUIV, "-k", "lors", why="under bf16 autocast the masked merged weight is applied in bf16"),
    m("export-full-rank-as-lora", "shardtune/artifacts/export.py",
      "    if reason:  # e.g. FOSSIL mode bat", "    if False:",
      "tests/test_export.py", "-k", "refuses_fossil_bat", why="a full-rank FOSSIL bat update exported as a LoRA"),
    # --- safety at the edges (issue 14): where shardtune writes, strict recipes, resume ------------
    m("safety-cwd-allowed", "shardtune/core/fileio.py",
      "if where == cwd or where in cwd.parents:", "if False:",
      SAFETY, "-k", "current or parent", why="export --out . wipes the working directory"),
    m("safety-foreign-entries-replaced", "shardtune/core/fileio.py",
      "    if foreign:\n", "    if False:\n",
      SAFETY, "-k", "users_file", why="a user's file inside an earlier output is deleted by --overwrite"),
    m("safety-owned-directories-unread", "shardtune/core/fileio.py",
      "            inner = foreign_entries(path, below, kinds)\n", "            inner = []\n",
      SAFETY, "-k", "any_depth", why="--overwrite deletes a user's file inside checkpoint-2/ or logs/"),
    m("safety-any-dotted-name-temporary", "shardtune/core/fileio.py",
      'TEMPORARY_FORMS = (rf"{_RANDOM}\\.tmp", f"new-{_RANDOM}", f"old-{_RANDOM}")', 'TEMPORARY_FORMS = (".*",)',
      SAFETY, "-k", "any_depth", why="--overwrite deletes a user's .train.log.bak as a temporary file"),
    m("safety-any-kind-replaced", "shardtune/core/fileio.py",
      "    if marker is not None and kinds is not None and marker.get(\"kind\") not in kinds:",
      "    if False:",
      SAFETY, "-k", "kind_of_command or model_cache", why="merge --overwrite replaces an export, a run, the model cache"),
    m("safety-rotation-deletes-users-files", "shardtune/artifacts/checkpoint.py",
      "        remove_checkpoint(old)\n", "        __import__('shutil').rmtree(old)\n",
      SAFETY, "-k", "rotating", why="a user's file in an old checkpoint is deleted by rotation"),
    m("library-logs-on-stderr", "shardtune/cli/common.py",
      "        root.addHandler(_LibraryRecordsToLog())\n", "        pass\n",
      QUANT, "-k", "logged_warnings", why="bitsandbytes prints 14-112 cast warnings on stderr under -q"),
    m("safety-rotation-follows-links", "shardtune/artifacts/checkpoint.py",
      "    if directory.is_symlink() or not directory.is_dir():", "    if not directory.is_dir():",
      SAFETY, "-k", "rotating", why="rotation deletes the files of a user's directory a link points to"),
    m("errors-name-the-recipe-key", "shardtune/core/errors.py",
      "                raise (BadInput(renamed) if isinstance(e, BadInput) else type(e)(renamed)) from None",
      "                raise",
      "tests/test_bad_input.py", "-k", "missing or moved", why="generate -m /gone says model.name: (no such key)"),
    m("errors-moved-base-no-hint", "shardtune/artifacts/checkpoint.py",
      'raise BadInput(f"{e} (give the base model with {option})") from None', "raise",
      "tests/test_bad_input.py", "-k", "moved", why="a run whose base moved does not say how to give it"),
    m("recipe-ignores-inapplicable-keys", "shardtune/recipe/schema.py",
      "        if self.num_samples != defaults[\"num_samples\"].default and self.task is None:",
      "        if False:",
      "tests/test_bad_input.py", "-k", "num_samples", why="data.num_samples with a file is silently ignored"),
    m("replacing-run-hides-earlier", "shardtune/training/rundir.py",
      "        if self.aside is None:\n            return \"\"", "        if True:\n            return \"\"",
      "tests/test_reliability.py", "-k", "replacing_run_that_fails",
      why="a failed replacing run does not say where the earlier run is"),
    m("generate-past-context", "shardtune/inspection/evaluate.py",
      "    if not isinstance(context, int):\n        return", "    if True:\n        return",
      "tests/test_bad_input.py", "-k", "past", why="generate crashes (IndexError) past GPT-2's context"),
    m("yaml-leading-zero-octal", "shardtune/recipe/schema.py",
      "        return sign * int(digits, 10)", "        return sign * int(digits, 8 if digits[:1] == '0' else 10)",
      "tests/test_recipe.py", "-k", "yaml_1_2", why="rank: 010 is read as 8"),
    m("set-replaces-a-section", "shardtune/recipe/schema.py",
      "        if dropped:  # a whole section replaced", "        if False:  # a whole section replaced",
      "tests/test_recipe.py", "-k", "whole_section", why="--set train={lr: 3} drops max_steps silently"),
    m("safety-out-directory-mode-lost", "shardtune/core/fileio.py",
      "        keep_directory_settings(final, tmp)\n", "",
      SAFETY, "-k", "keeps_its_mode", why="a setgid or read-only --out directory becomes 0755"),
    m("resume-checked-after-writing", "shardtune/training/loop.py",
      "        self._check_resume_fits()\n        self.directory.start(self.resumed_step)",
      "        self.directory.start(self.resumed_step)\n        self._check_resume_fits()",
      "tests/test_reliability.py", "-k", "refused_for_its_checkpoint",
      why="a refused resume has already cut metrics.jsonl and rewritten recipe.yaml"),
    m("resume-another-run", "shardtune/training/loop.py",
      "            check_same_run(self.resume_from, self.recipe, self.accelerator.num_processes)\n", "",
      "tests/test_reliability.py", "-k", "continue_another_run",
      why="--resume with another base model or data continues silently"),
    m("data-eval-split-is-split", "shardtune/data/examples.py",
      'raise RecipeError("data.eval_split", f"is data.split ({data.split!r}); held-out data must differ")',
      "pass",
      "tests/test_data.py", "-k", "never_overlap", why="held-out examples are the training examples"),
    m("data-bom-refused", "shardtune/data/examples.py",
      '        return path.read_text(encoding="utf-8-sig")', '        return path.read_text(encoding="utf-8")',
      "tests/test_data.py", "-k", "byte_order_mark", why="a JSONL file saved by Windows tools is refused"),
    m("safety-checkpoint-number-any-suffix", "shardtune/core/fileio.py",
      '    entry = "[0-9]+".join(', '    entry = "[0-9]+.*".join(',
      SAFETY, "-k", "checkpoint-N", why="--overwrite deletes a user's checkpoint-2-best copy"),
    m("safety-loose-temporary-names", "shardtune/core/fileio.py",
      '_RANDOM = "[a-z0-9_]{8}"', '_RANDOM = ".*"',
      SAFETY, "-k", "NAME", why="--overwrite deletes a user's .train.log.old-mine"),
    m("safety-input-allowed", "shardtune/core/fileio.py",
      "if where == src or src in where.parents:", "if False:",
      SAFETY, "-k", "input and export", why="export --out RUN replaces the run it reads"),
    m("safety-umask-ignored", "shardtune/core/fileio.py",
      "        os.chmod(tmp, 0o666 & ~umask())", "        pass",
      SAFETY, "-k", "umask", why="adapters are written 0600: a cluster group cannot read them"),
    m("safety-metrics-not-trimmed", "shardtune/training/rundir.py",
      "    return [line for line, at in metrics_lines(metrics) if at <= step]",
      "    return [line for line, _ in metrics_lines(metrics)]",
      SAFETY, "-k", "metrics_once", why="after a resume the metrics hold steps twice"),
    m("safety-lax-recipes", "shardtune/recipe/schema.py",
      'model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)',
      'model_config = ConfigDict(extra="forbid")',
      SAFETY, "-k", "strict", why="rank: true trains rank 1; lr: .inf diverges"),
    m("safety-duplicate-keys-allowed", "shardtune/recipe/schema.py",
      "                raise DuplicateKey(key, line, seen[key])", "                pass",
      SAFETY, "-k", "twice", why="the later of two keys silently wins"),
    m("safety-rank-unbounded", A + "model.py",
      "if isinstance(rank, int) and rank > fits:", "if False:",
      SAFETY, "-k", "largest", why="FOSSIL rank 100000 trains 970× the base's parameters"),
    m("safety-warmup-starts-at-zero", "shardtune/training/loop.py",
      "return (done + 1) / warmup", "return done / warmup",
      SAFETY, "-k", "first_optimizer_step", why="the first optimizer step is wasted at lr 0"),
    m("safety-resume-checkpoint-unchecked", "shardtune/training/loop.py",
      "self.resumed_step = check_checkpoint(self.resume_from, self.recipe.adapter, option)",
      "self.resumed_step = check_checkpoint(self.resume_from, None, option)",
      SAFETY, "-k", "another_adapter", why="a resume with another rank or alpha than the checkpoint's"),
    # --- a quantized base (shardtune/models/quant.py and its call sites) ------------------------------------
    m("quant-cpu-fast-path-left-on", "shardtune/models/quant.py",
      "module.support_avx512bf16_for_cpu = False", "module.support_avx512bf16_for_cpu = True",
      QUANT, "-k", "logits_and_gradients and lora", why="bitsandbytes' CPU fast path: bf16, repacked, fails on 176"),
    m("quant-double-quant-ignored", "shardtune/models/quant.py",
      "bnb_4bit_use_double_quant=quantization.double_quant,", "bnb_4bit_use_double_quant=True,",
      QUANT, "-k", "double_quant or base_bytes", why="double_quant: false still double-quantizes"),
    m("quant-compute-dtype-ignored", "shardtune/models/quant.py",
      "        bnb_4bit_compute_dtype=quantization.compute_dtype,\n", "",
      QUANT, "-k", "compute_dtype", why="model.compute_dtype never reaches the layers"),
    m("quant-double-quant-formula", "shardtune/models/quant.py",
      "return codes + blocks + 4 * math.ceil(blocks / DOUBLE_QUANT_BLOCK) + 256 * 4 + 4",
      "return codes + blocks + 256 * 4 + 4",
      QUANT, "-k", "base_bytes", why="params reports less memory than the base holds"),
    m("quant-bat-shard-gradient-drops-identity", A + "fossil.py",
      "adapter.blocks(w), g_blocks) + g_blocks.sum(2)", "adapter.blocks(w), g_blocks)",
      QUANT, "-k", "logits_and_gradients and bat", why="dD_b = Σ_c W_bcᵀ·G_bc without the I of (W + I)"),
    m("quant-bat-input-gradient-without-w", A + "fossil.py",
      "weight = adapter.bat_delta(w, shard) + (w if ctx.include_base else 0)",
      "weight = adapter.bat_delta(w, shard)",
      QUANT, "-k", "logits_and_gradients and bat", why="dx = dy·ΔW, the base's W·x left out of backward"),
    m("quant-lors-backward-without-w", A + "lors.py",
      "            weight = dense_weight(ctx.quantized)  # recomputed", "            pass  # recomputed",
      QUANT, "-k", "logits_and_gradients and lors", why="LoRS backward over NF4 has no W to recompute from"),
    m("quant-lors-init-one-batch", A + "lors.py",
      "grads[name] = grads[name] + g if name in grads else g", "grads[name] = g",
      INITS, "-k", "lors_gradient_init", why="LoRS init from the last batch's gradient only"),
    m("quant-loaded-unquantized", "shardtune/artifacts/checkpoint.py",
      "quantization=quantization_of(section),", "quantization=None,",
      QUANT, "-k", "save_load", why="eval/generate of an NF4 run on the unquantized base"),
    m("quant-merge-always-dequantized", "shardtune/artifacts/export.py",
      'source = "dequantized" if base_weights == "dequantized" or stored_quantized else "original"',
      'source = "dequantized"',
      QUANT, "-k", "which_base_weights and lora", why="merge --base-weights auto ignores the original weights"),
    # --- docs that cannot drift (issue 21) ---------------------------------------------------------
    m("data-held-out-trained", "shardtune/data/examples.py",
      "    return examples[n_eval:], examples[:n_eval]", "    return examples, examples[:n_eval]",
      "tests/test_user_paths.py", "-k", "no_held_out and share", why="the held-out records are trained on too"),
    m("data-eval-split-is-the-training-file", "shardtune/data/examples.py",
      "    held_source = _held_out_source(data)\n", "    held_source = data\n",
      "tests/test_user_paths.py", "-k", "no_held_out and eval_split", why="eval_split ignored: held out = training data"),
    m("data-left-out-examples-unsaid", "shardtune/training/loop.py",
      "        if len(rows) < len(examples_of_a_kind):", "        if False:",
      "tests/test_user_paths.py", "-k", "without_a_token", why="examples with nothing to learn from vanish silently"),
    m("data-unscorable-held-out-accepted", "shardtune/training/loop.py",
      "    if eval_examples and not eval_rows:", "    if False:",
      "tests/test_user_paths.py", "-k", "without_a_token", why="eval_loss measured on no held-out token"),
    m("fused-sharelora-unscaled", A + "sharelora.py",
      '        h = F.linear(self.dropout(x), self._factor("A")) * self.scale\n',
      '        h = F.linear(self.dropout(x), self._factor("A"))\n',
      "tests/test_fused_paths.py", "-k", "sharelora", why="the fused path forgets the scale α/r"),
    m("fused-add-low-rank-transposed", A + "base.py",
      "flat = torch.addmm(out.reshape(-1, out.shape[-1]), h.reshape(-1, h.shape[-1]), b.t())",
      "flat = torch.addmm(out.reshape(-1, out.shape[-1]), h.reshape(-1, h.shape[-1]), b.t().flip(0))",
      "tests/test_fused_paths.py", why="the general update path uses B's rank vectors in the wrong order"),
    m("fused-layer-input-gradient-without-the-update", A + "fused.py",
      "                dx = torch.mm(dy, weight).addmm_(g, a, alpha=ctx.scale)", "                dx = torch.mm(dy, weight)",
      "tests/test_fused_paths.py", "-k", "plain_formula and lora", why="the fused layer's dx drops s·g·A"),
    m("fused-layer-input-gradient-unscaled", A + "fused.py",
      "dx = torch.mm(dy, weight).addmm_(g, a, alpha=ctx.scale)", "dx = torch.mm(dy, weight).addmm_(g, a)",
      "tests/test_fused_paths.py", "-k", "plain_formula and lora", why="the fused layer's dx forgets α/r"),
    m("fused-layer-a-gradient-unscaled", A + "fused.py",
      "da = _gradient_product(g.t(), flat, ctx.a_dtype, ctx.scale)", "da = _gradient_product(g.t(), flat, ctx.a_dtype)",
      "tests/test_fused_paths.py", "-k", "plain_formula and lora", why="the fused layer's dA forgets α/r"),
    m("fused-layer-b-gradient-unscaled", A + "fused.py",
      "            h = _scaled_product(flat, a.t(), scale)", "            h = _scaled_product(flat, a.t())",
      "tests/test_fused_paths.py", "-k", "plain_formula and lora", why="the fused layer forgets the scale α/r"),
    m("fused-wider-gradient-unscaled", A + "fused.py",
      "    return out if alpha == 1.0 else out.mul_(alpha)", "    return out",
      "tests/test_fused_paths.py", "-k", "autocast and lora", why="under autocast A's gradient loses α/r"),
    m("fused-layer-leaves-autocast-off", A + "fused.py",
      "        finally:\n            torch.set_autocast_enabled(device_type, True)\n", "        finally:\n            pass\n",
      "tests/test_fused_paths.py", "-k", "autocast", why="after an adapted layer the rest of the model runs in fp32"),
    m("fused-layer-never-taken", A + "base.py",
      "            if fused is not None:\n                return fused\n", "",
      "tests/test_fused_paths.py", "-k", "bias", why="training never takes the fused layer (speed lost)"),
    m("fused-layer-skipped-under-autocast", A + "fused.py",
      "        torch.set_autocast_enabled(device_type, False)\n",
      "        return None\n",
      "tests/test_fused_paths.py", "-k", "autocast", why="bf16 training never takes the fused layer"),
    m("fused-layer-unscaled-under-autocast", A + "fused.py",
      "        try:\n            return _LowRankLinear.apply(x, weight, bias, a, b, scale, block_rank)",
      "        try:\n            return _LowRankLinear.apply(x, weight, bias, a, b, 1.0, block_rank)",
      "tests/test_fused_paths.py", "-k", "autocast", why="under autocast the update loses α/r"),
    m("fused-block-sum-padding-gradient-dropped", A + "fused.py",
      "        dx[:, full:] += ds[:, : n_in - full]", "        dx[:, full:] += 0",
      "tests/test_fused_paths.py", "-k", "plain_formula and fossil", why="FOSSIL's padded last block gets no dx"),
    m("fused-fossil-input-gradient-without-the-update", A + "fused.py",
      "                _add_block_sum_transposed(dx, torch.mm(dy, b.t()))", "                pass",
      "tests/test_fused_paths.py", "-k", "bias and fossil", why="FOSSIL's fused dx drops (dy·Dᵀ)·P"),
    m("fused-fossil-keeps-its-input", A + "fused.py",
      "        keep_x = a is not None or weight.requires_grad", "        keep_x = True",
      "tests/test_fused_paths.py", "-k", "keeps", why="FOSSIL holds every layer's input until backward (memory)"),
    m("cast-cache-ignores-the-version", A + "fused.py",
      "key = (t.data_ptr(), t.shape, t._version, dtype, t.device)", "key = (t.data_ptr(), t.shape, dtype, t.device)",
      "tests/test_fused_paths.py", "-k", "shared_matrix", why="after an optimizer step the old bf16 copy is used"),
    m("cast-cache-per-layer", A + "fused.py",
      "        copy = _CASTS[key] = t.to(dtype)\n", "        return t.to(dtype)\n",
      "tests/test_fused_paths.py", "-k", "shared_matrix", why="ShareLoRA's A cast once per layer (peak memory)"),
    m("mos-assembly-never-used", A + "mos.py",
      "        if step is not None and (\n", "        if False and (\n",
      "tests/test_mos.py", "-k", "gathers_each_pool", why="every layer gathers again (2·L gathers per type)"),
    m("mos-assembly-layers-shifted", A + "mos.py",
      "for layer, a, b_t in zip(layers, a_all, b_all, strict=True):",
      "for layer, a, b_t in zip(layers, a_all[1:] + a_all[:1], b_all, strict=True):",
      "tests/test_mos.py", "-k", "gathers_each_pool", why="layer k trains with layer k+1's A"),
    m("mos-assembly-used-after-the-pools-changed", A + "mos.py",
      "return self._versions is not None and self._versions[kind] == self._pool_versions(kind)",
      "return self._versions is not None",
      "tests/test_mos.py", "-k", "unchanged", why="a layer called after an optimizer step uses old factors"),
    m("mos-assembly-kept-after-the-forward", "shardtune/adapters/model.py",
      "        stores.release(keep=recomputes)", "        stores.release(keep=True)",
      "tests/test_mos.py", "-k", "freed", why="fp32 factors held through backward (peak memory)"),
    m("mos-assembly-dropped-before-the-recompute", "shardtune/adapters/model.py",
      "        stores.release(keep=recomputes)", "        stores.release(keep=False)",
      "tests/test_mos.py", "-k", "gathers_each_pool", why="gradient checkpointing recomputes with per-layer gathers"),
    m("step-time-unfused-ablation-is-fused", "benchmarks/step_time.py",
      "            layer.adapter.low_rank_factors = layer.adapter.block_sum_shard = lambda: None", "            pass",
      "tests/test_benchmark_scripts.py", "-k", "ablation", why="the 'lora (unfused)' row measures the fused layer"),
    m("layout-skeleton-drops-the-rest-of-the-base", "shardtune/inspection/layout.py",
      "root.base_rest = nn.Parameter(torch.empty(rest, dtype=dtype), requires_grad=False)",
      "root.base_rest = nn.Parameter(torch.empty(0, dtype=dtype), requires_grad=False)",
      "tests/test_param_counts.py", "-k", "instantiated", why="params: % of base over the linear layers only"),
    m("layout-cache-ignores-the-config-text", "shardtune/inspection/layout.py",
      'text = f"{LAYOUT_VERSION}\\n{version(\'transformers\')}\\n{fingerprint}"',
      'text = f"{LAYOUT_VERSION}\\n{version(\'transformers\')}\\n{fingerprint[:20]}"',
      "tests/test_param_counts.py", "-k", "edited", why="an edited config.json counted from the old layout"),
    m("layout-cache-never-read", "shardtune/inspection/layout.py",
      "            return ModelLayout.from_json(path.read_text())\n",
      "            raise OSError\n",
      "tests/test_param_counts.py", "-k", "cached", why="params imports transformers every time (start-up 2.9 s)"),
    m("compile-leaves-the-blocks-eager", "shardtune/training/loop.py",
      "            module.compile()\n", "            pass\n",
      "tests/test_compile.py", "-k", "every_decoder_block", why="train.compile: true compiles nothing"),
    m("compile-time-unreported", "shardtune/training/loop.py",
      "            compile_seconds=self.compile_seconds,\n", "",
      "tests/test_compile.py", "-k", "same_adapter and lora", why="result.json lacks the compile time"),
    m("floor-leaves-out-a-product", "benchmarks/step_time.py",
      "        \"dA = dhᵀ·x\": lambda: torch.mm(dh.t(), x),\n", "",
      "tests/test_benchmark_scripts.py", "-k", "floor_times", why="the computed floor misses dA: too low"),
    m("local-base-weights-unchecked", "shardtune/models/loading.py",
      "            check_safetensors_weights(Path(source), name)\n", "",
      "tests/test_safety.py", "-k", "local_base_model", why="a pickled base loads; a truncated one is exit 1"),
    m("cold-floor-keeps-the-caches", "benchmarks/step_time.py",
      "            evict_caches(device)\n", "",
      "tests/test_benchmark_scripts.py", "-k", "cold_floor", why="'operands from memory' times them in cache"),
    m("no-products-ablation-keeps-the-products", "benchmarks/step_time.py",
      "layer.forward = functools.partial(_forward_without_products, layer)", "pass",
      "tests/test_benchmark_scripts.py", "-k", "each_ablation", why="'lora (no products)' times real LoRA"),
    m("frontier-unswept-budget-takes-the-first-rate", "benchmarks/frontier.py",
      "return min(swept, key=lambda b: (abs(math.log(b / budget)), b))", "return next(iter(swept))",
      "tests/test_frontier.py", "-k", "nearest", why="1/2 trained with the rate chosen at 1/16"),
    m("translate-words-translate-to-themselves", "shardtune/data/tasks.py",
      "LEXICON = dict(zip(_SYLLABLES[:80], _SYLLABLES[80:160], strict=True))",
      "LEXICON = dict(zip(_SYLLABLES[:80], _SYLLABLES[:80], strict=True))",
      "tests/test_frontier.py", "-k", "translate", why="translate asks the model to copy, not translate"),
    m("docs-option-renamed-in-cli", "shardtune/cli/training.py",
      'typer.Option("--dry-run", help=', 'typer.Option("--dryrun", help=',
      "tests/test_docs_commands.py", "-k", "exists", why="the docs show an option the CLI no longer has"),
    m("docs-own-data-example-broken", "examples/own-data/recipe.yaml",
      "  eval_samples: 0 ", "  eval_samples: 3 ",
      "tests/test_docs_commands.py", "-k", "getting", why="the documented own-data example no longer runs"),
    # --- shipped recipes, init, help (issue 33) ------------------------------------------------------
    m("recipe-name-not-resolved", "shardtune/recipe/shipped.py",
      "    return shipped_file(str(arg)) or path", "    return path",
      "tests/test_shipped_recipes.py", "-k", "shipped_name", why="shardtune train quickstart: recipe file not found"),
    m("init-replaces-a-users-file", "shardtune/recipe/shipped.py",
      "            return f.readline().startswith(INIT_MARK)", "            return True",
      "tests/test_shipped_recipes.py", "-k", "only_its_own", why="init --overwrite replaces a file the user wrote"),
    m("init-replaces-without-overwrite", "shardtune/recipe/shipped.py",
      "        if not overwrite:\n", "        if False:\n",
      "tests/test_shipped_recipes.py", "-k", "only_its_own", why="init replaces an earlier copy without --overwrite"),
    m("recipes-not-in-the-wheel", "pyproject.toml",
      '"shardtune.recipe" = ["shipped/*.yaml"]', '"shardtune.recipe" = []',
      "tests/test_install.py", "-k", "carries", why="pip install gives shardtune without its recipes"),
    m("help-cuts-the-command-list", "shardtune/cli/help.py",
      "    return \" \".join(line.strip() for line in paragraph.splitlines())",
      "    return \" \".join(line.strip() for line in paragraph.splitlines())[:45]",
      "tests/test_help.py", "-k", "first_sentence", why="shardtune --help cuts each command's line"),
    m("help-in-boxes", "shardtune/cli/__init__.py",
      "    app.command(_name, cls=PlainCommand)(handle_errors(_command))", "    app.command(_name)(handle_errors(_command))",
      "tests/test_help.py", why="--help draws boxes and shows <int range> in a pipe"),
    m("help-type-names", "shardtune/cli/help.py",
      "    if param.metavar:\n        return param.metavar\n", "    if param.metavar:\n        return param.metavar\n    return '<str>'\n",
      "tests/test_help.py", why="--out <str> instead of --out DIR"),
    # --- pipes and plain tables (issue 34) ----------------------------------------------------------
    m("pipe-rich-exits-1", "shardtune/cli/common.py",
      "    def on_broken_pipe(self) -> None:\n        self.quiet = True", "    def on_broken_pipe_(self) -> None:\n        self.quiet = True",
      "tests/test_pipes.py", "-k", "leaves_at_once", why="shardtune models | head -1 exits 1 under pipefail"),
    m("pipe-help-exits-1", "shardtune/cli/__init__.py",
      '            if e.code != 1 or type(sys.stdout).__name__ != "PacifyFlushWrapper" or not reader_gone():',
      "            if True:",
      "tests/test_pipes.py", "-k", "leaves_at_once", why="shardtune --help | head -1 exits 1"),
    m("tables-boxed-in-pipes", "shardtune/cli/common.py",
      "        if self.is_terminal or not any(isinstance(o, Table) for o in objects):",
      "        if True:",
      "tests/test_pipes.py", "-k", "plain_text", why="box drawing in a pipe"),
    m("params-title-repr", "shardtune/cli/inspection.py",
      '    settings = ", ".join(f"{key} {value}" for key, value in options.items()) if options else ""',
      '    settings = str(options) if options else ""',
      "tests/test_pipes.py", "-k", "plain_text", why="the params title shows a Python dict"),
    m("hub-down-retries-for-minutes", "shardtune/models/hub.py",
      "        _probed[url] = why", "        _probed[url] = None",
      "tests/test_hub.py", "-k", "unreachable", why="a down hub is retried for 80 s, 24 lines on stderr"),
    m("library-bars-in-pipes", "shardtune/cli/__init__.py",
      "    if not sys.stderr.isatty():\n        quiet_libraries()\n", "",
      "tests/test_pipes.py", "-k", "progress_bars", why="the GGUF conversion draws a tqdm bar with \\r into a log file"),
    # --- Slurm (issue 34) ---------------------------------------------------------------------------
    m("sbatch-never-requeues", "examples/slurm/train-one-node.sbatch",
      'if [ "$REQUEUE" = 1 ] && [ "$STATUS" = 143 ]; then scontrol requeue "$SLURM_JOB_ID"; fi', "",
      "tests/test_slurm.py", "-k", "time_limit and one-node",
      why="#SBATCH --requeue alone: at its time limit the job ends TIMEOUT and is never resumed"),
    m("sbatch-srun-gets-the-term", "examples/slurm/train-multi-node.sbatch",
      """trap 'REQUEUE=1; scancel --signal=TERM "$SLURM_JOB_ID"' USR1""",
      """trap 'REQUEUE=1; kill -TERM "$STEP"' USR1""",
      "tests/test_slurm.py", "-k", "time_limit and multi-node",
      why="SIGTERM to srun ends the job step at once: no checkpoint, the job starts over"),
    m("launcher-late-sigterm-traceback", "shardtune/training/launcher.py",
      "    if _finishing:\n        return\n", "",
      "tests/test_reliability.py", "-k", "launcher_passes",
      why="a scheduler's repeated SIGTERM as the launcher ends: a traceback and exit -15"),
    # --- evaluations during training (issue 36) -----------------------------------------------------
    m("eval-only-on-log-steps", "shardtune/training/loop.py",
      "        is_eval_step = bool(every.every) and step % every.every == 0 and len(self.data.eval_rows) > 0",
      "        is_eval_step = bool(every.every) and step % every.every == 0 and len(self.data.eval_rows) > 0 and is_log_step",
      "tests/test_selection.py", "-k", "whatever_logging", why="eval.every=5 with logging.every=2 evaluates at step 10 only"),
    m("best-ties-take-the-last", "shardtune/training/selection.py",
      'if now is not None and better_by(metric, value, now["value"]) <= 0:',
      'if now is not None and better_by(metric, value, now["value"]) < 0:',
      "tests/test_selection.py", "-k", "equations", why="an equal evaluation replaces the best"),
    m("early-stopping-min-delta-ignored", "shardtune/training/selection.py",
      "better_by(metric, value, self.reference) > min_delta", "better_by(metric, value, self.reference) > 0",
      "tests/test_selection.py", "-k", "equations or ends_the_run", why="any improvement resets the patience"),
    m("selection-not-resumed", "shardtune/training/loop.py",
      '            self.selection = Selection.from_json(counters["selection"])\n', "",
      "tests/test_selection.py", "-k", "resumes_exactly", why="a resumed run forgets its best and its patience count"),
    m("best-lost-at-the-end", "shardtune/training/loop.py",
      "        self.judge_the_end()\n", "",
      "tests/test_selection.py", "-k", "keep_best_holds", why="the last step's evaluation never becomes best/"),
    m("lr-floor-ignored", "shardtune/training/loop.py",
      "    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))",
      "    return 0.5 * (1.0 + math.cos(math.pi * progress))",
      "tests/test_train.py", "-k", "min_lr", why="train.min_lr has no effect on the cosine decay"),
    m("lora-plus-ratio-ignored", "shardtune/training/loop.py",
      '        scales["B"] = cfg.lr_ratio_b\n', "",
      "tests/test_param_groups.py", "-k", "lora_plus", why="train.lr_ratio_b: B learns at A's rate"),
    m("group-rate-not-scheduled", "shardtune/training/loop.py",
      '            group["lr"] = self.lr * group.get("lr_scale", 1.0)', '            group["lr"] = self.lr',
      "tests/test_param_groups.py", "-k", "vblora", why="the schedule overwrites every group's own rate"),
    m("eight-bit-is-plain-adamw", "shardtune/training/loop.py",
      '    kind = bnb.optim.PagedAdamW8bit if cfg.optimizer == "paged_adamw_8bit" else bnb.optim.AdamW8bit\n    return kind(',
      '    kind = bnb.optim.PagedAdamW8bit if cfg.optimizer == "paged_adamw_8bit" else bnb.optim.AdamW8bit\n    return torch.optim.AdamW(',
      "tests/test_optimizers.py", "-k", "reference and 8bit", why="adamw_8bit trains with 32-bit AdamW"),
    m("shared-qmap-saved-once", "shardtune/artifacts/checkpoint.py",
      "                if value.data_ptr() in seen:", "                if False:",
      "tests/test_optimizers.py", "-k", "resumes", why="an 8-bit checkpoint cannot be written"),
    m("tracker-run-name-dropped", "shardtune/training/tracking.py",
      '        "wandb": {"name": run_name, "tags": list(logging.tags)},', '        "wandb": {"tags": list(logging.tags)},',
      "tests/test_real_world.py", "-k", "wandb_gets", why="logging.run_name never reaches wandb"),
    m("tracker-project-fixed", "shardtune/training/tracking.py",
      "                tracker = tracker_class(logging.project, **kwargs)", "                tracker = tracker_class(PROJECT, **kwargs)",
      "tests/test_real_world.py", "-k", "wandb_gets", why="every run lands in the wandb project shardtune"),
    m("dry-run-skips-trackers", "shardtune/cli/training.py",
      "    check_trackers(resolved.logging.report_to)  # (a dry run says it too)\n", "",
      "tests/test_real_world.py", "-k", "missing_tracker", why="--dry-run accepts report_to: [wandb] without wandb"),
    m("vera-exported-dense", "shardtune/artifacts/export.py",
      "    native = method in NATIVE_PEFT and not dense", "    native = False",
      "tests/test_export.py", "-k", "loads_in_peft and vera", why="VeRA's savings lost in its PEFT export"),
    m("vblora-topk-weights-unnormalised", "shardtune/artifacts/export.py",
      '                tensors[f"{key}_topk_weights"] = torch.softmax(logits, dim=-1)[:, :, :-1]',
      '                tensors[f"{key}_topk_weights"] = logits[:, :, :-1]',
      "tests/test_export.py", "-k", "loads_in_peft and vblora", why="PEFT rebuilds other mixtures from the top-k file"),
    m("vllm-rank-power-of-two", "shardtune/artifacts/export.py",
      "    return next((allowed for allowed in VLLM_LORA_RANKS if allowed >= rank), None)",
      "    return max(8, 1 << (rank - 1).bit_length())",
      "tests/test_export.py", "-k", "vllm_line", why="--max-lora-rank 1024, which vLLM refuses"),
    m("init-from-export-unscaled", "shardtune/artifacts/checkpoint.py",
      "        if rescale_b is not None and rescale_b != 1.0:", "        if False:",
      "tests/test_export.py", "-k", "own_peft", why="an own export starts the run from another update"),
    m("sharegpt-gpt-as-user", "shardtune/data/examples.py",
      '    "gpt": "assistant",', '    "gpt": "user",',
      "tests/test_data.py", "-k", "sharegpt", why="ShareGPT's answers are read as questions (nothing learned from them)"),
    m("best-overwrites-a-users-file", "shardtune/artifacts/checkpoint.py",
      "    foreign = foreign_entries(final, BEST_FILES) if final.is_dir() and not final.is_symlink() else []",
      "    foreign = []",
      "tests/test_selection.py", "-k", "users_file", why="a file the user put in best/ is deleted with the old best"),
    # --- streaming (data/streaming.py) -----------------------------------------------------------------
    m("stream-resume-restarts-window", "shardtune/data/streaming.py",
      '        self.window, self.done, self.start = state["window"], state["rows_done"], state["sources"]',
      '        self.window, self.done, self.start = state["window"], 0, state["sources"]',
      "tests/test_streaming.py", "-k", "resumed_stream", why="a resumed stream trains again on the rows of its window"),
    m("stream-position-ignored", "shardtune/data/streaming.py",
      '        self.epoch, self.position, self._records = state["epoch"], state["position"], None',
      '        self.epoch, self.position, self._records = state["epoch"], None, None',
      "tests/test_streaming.py", "-k", "resumed_stream", why="a resumed stream starts its file again"),
    m("stream-window-not-shuffled", "shardtune/data/streaming.py",
      "        rng.shuffle(examples)\n", "\n",
      "tests/test_streaming.py", "-k", "window_shuffles", why="batches in file order (a sorted file trains sorted)"),
    m("stream-no-whole-check", "shardtune/data/streaming.py",
      "    whole = not isinstance(reader, HubReader)", "    whole = False",
      "tests/test_streaming.py", "-k", "half_way", why="a bad record half-way is met after the run directory is written"),
    m("stream-trains-on-held-out", "shardtune/data/streaming.py",
      "            if example in self.skip:\n                continue", "            pass",
      "tests/test_streaming.py", "-k", "mixture_draws", why="held-out records of one source trained on from another"),
    # --- DeepSpeed ZeRO (training/deepspeed.py) ----------------------------------------------------------
    m("zero3-layers-not-leaves", "shardtune/training/deepspeed.py",
      "    set_z3_leaf_modules(model, [AdaptedLinear])\n", "\n",
      "tests/test_deepspeed.py", "-k", "fossil-3", why="ZeRO-3: the fused layer reads its base weight and factors ungathered"),
    m("zero3-stores-not-gathered", "shardtune/training/deepspeed.py",
      "        deepspeed.zero.register_external_parameter(model, p)", "        pass",
      "tests/test_deepspeed.py", "-k", "sharelora-3", why="ZeRO-3: a shared store read partitioned by every layer"),
    m("zero-moments-not-restored", "shardtune/training/deepspeed.py",
      "            safe_set_full_optimizer_state(p, state[key].to(torch.float32), key)", "            pass",
      "tests/test_deepspeed.py", "-k", "resume", why="a resumed ZeRO run starts AdamW's moments at zero"),
    m("zero-moments-one-group", "shardtune/training/deepspeed.py",
      "        zero._hp_optimizer_states_linked = False\n", "\n",
      "tests/test_deepspeed.py", "-k", "resume", why="ZeRO-2 maps only the first param group's moments"),
    m("zero-lr-after-the-step", "shardtune/training/loop.py",
      "            if accelerator.sync_gradients:  # (DeepSpeed steps inside backward)\n                self._set_lr()\n"
      "            loss = model(**model_inputs(batch)).loss\n            accelerator.backward(loss)\n",
      "            loss = model(**model_inputs(batch)).loss\n            accelerator.backward(loss)\n"
      "            if accelerator.sync_gradients:\n                self._set_lr()\n",
      "tests/test_deepspeed.py", "-k", "mos-2", why="DeepSpeed steps inside backward: each step took the previous step's rate"),
    m("zero3-scores-on-one-process", "shardtune/training/loop.py",
      "        if self.recipe.eval.score and (main or self.gathers):", "        if self.recipe.eval.score and main:",
      "tests/test_deepspeed.py", "-k", "composes", why="ZeRO-3: the main process generates alone and waits for the others for ever"),
    m("frontier-seed-not-applied", "benchmarks/frontier.py",
      "    raw[\"train\"][\"seed\"] = seed\n", "\n",
      "tests/test_frontier.py", "-k", "seeds", why="the frontier's seed runs all train with seed 42: the spread is of one run repeated"),
    m("frontier-spread-of-the-chosen-run", "benchmarks/frontier.py",
      "    for r in report[\"rows\"] + report.get(\"seeds\", []):", "    for r in report[\"rows\"]:",
      "tests/test_frontier.py", "-k", "seeds", why="the spread ignores the other seeds' runs"),
    m("frontier-reuse-ignores-adapter-options", "benchmarks/frontier.py",
      "(EXTRA if extra is None else extra).items() if k in fields)", "(EXTRA if extra is None else extra).items() if False)",
      "tests/test_frontier.py", "-k", "reuse", why="--reuse takes a VB-LoRA run made with another vector_length"),
    m("zygote-signals-not-relayed", "tests/zygote.py",
      "                        os.kill(pid, struct.unpack(\"!i\", data)[0])", "                        pass",
      "tests/test_zygote.py", "-k", "signals", why="the pre-imported shardtune of the docs tests: a SIGTERM to it never reaches the command"),
    m("zygote-any-environment", "tests/zygote.py",
      "                if comparable(request[\"env\"]) != served or len(fds) != 3:", "                if len(fds) != 3:",
      "tests/test_zygote.py", "-k", "environment", why="the pre-imported shardtune serves a command whose environment its imports did not see"),
]
# fmt: on


@dataclass
class Outcome:
    id: str
    file: str
    why: str
    tests: list[str]
    status: str  # caught | survived | stale | invalid
    seconds: float = 0.0
    detail: str = ""
    extra: dict = field(default_factory=dict)


def copy_repo(dest: Path) -> Path:
    shutil.copytree(ROOT, dest, ignore=shutil.ignore_patterns(*IGNORED))
    return dest


def environment(repo: Path) -> dict[str, str]:
    """Import shardtune from the copy (ahead of the editable install), one thread per worker, offline."""
    env = dict(os.environ)
    env.update(
        PYTHONPATH=str(repo),
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONDONTWRITEBYTECODE="1",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
    )
    return env


def run_tests(repo: Path, tests: tuple[str, ...], timeout: float) -> tuple[str, float, str]:
    """Run ``pytest -x`` on ``tests`` inside ``repo``: ("passed" | "failed" | "timeout" | "empty", seconds, tail)."""
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-o", "addopts="]
    command += ["--basetemp", str(repo / ".pytest-tmp"), *tests]
    started = time.perf_counter()
    proc = subprocess.Popen(
        command,
        cwd=repo,
        env=environment(repo),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return "timeout", time.perf_counter() - started, f"ran past {timeout:.0f} s"
    seconds = time.perf_counter() - started
    lines = [line for line in out.strip().splitlines() if line.strip()]
    tail = lines[-1] if lines else ""
    if proc.returncode == 0:
        return "passed", seconds, tail
    if proc.returncode == 5:
        return "empty", seconds, "no tests collected"
    failed = [line for line in lines if line.startswith(("FAILED", "ERROR"))]
    return "failed", seconds, (failed[0] if failed else tail)[:200]


def baseline_groups(selections: set[tuple[str, ...]]) -> dict[tuple[str, ...], list[tuple[str, ...]]]:
    """One un-mutated run per set of test files: their ``-k`` expressions joined with ``or`` (no ``-k``
    when any selection of those files has none). Maps each run's arguments to the selections it covers."""
    by_files: dict[tuple[str, ...], list[tuple[str, ...]]] = {}
    for tests in sorted(selections):
        files = tuple(t for i, t in enumerate(tests) if t != "-k" and (i == 0 or tests[i - 1] != "-k"))
        by_files.setdefault(files, []).append(tests)
    groups = {}
    for files, members in by_files.items():
        expressions = [t[t.index("-k") + 1] for t in members if "-k" in t]
        union = (
            files
            if len(expressions) < len(members)
            else (*files, "-k", " or ".join(f"({e})" for e in expressions))
        )
        groups[union] = members
    return groups


def applies(mutant: Mutant) -> bool:
    path = ROOT / mutant.file
    return path.is_file() and path.read_text(encoding="utf-8").count(mutant.original) == 1


class Workers:
    """A pool of repository copies, one per worker; each mutant borrows one, edits one file, restores it."""

    def __init__(self, n: int, base: Path):
        self.copies: queue.Queue[Path] = queue.Queue()
        for i in range(n):
            self.copies.put(copy_repo(base / f"worker-{i}"))
        self.lock = threading.Lock()

    def check_imports(self) -> None:
        repo = self.copies.queue[0]
        found = subprocess.run(
            [sys.executable, "-c", "import shardtune; print(shardtune.__file__)"],
            cwd=repo,
            env=environment(repo),
            capture_output=True,
            text=True,
        ).stdout.strip()
        if not found.startswith(str(repo)):
            raise SystemExit(f"the copy's shardtune is not the one imported ({found}); cannot seed bugs")

    def baseline(self, tests: tuple[str, ...], timeout: float) -> tuple[str, float, str]:
        repo = self.copies.get()
        try:
            return run_tests(repo, tests, timeout)
        finally:
            self.copies.put(repo)

    def mutate(self, mutant: Mutant, timeout: float) -> Outcome:
        outcome = Outcome(mutant.id, mutant.file, mutant.why, list(mutant.tests), "stale")
        repo = self.copies.get()
        path = repo / mutant.file
        try:
            source = path.read_text(encoding="utf-8")
            count = source.count(mutant.original)
            if count != 1:
                outcome.detail = f"snippet found {count} times in {mutant.file}"
                return outcome
            path.write_text(source.replace(mutant.original, mutant.replacement), encoding="utf-8")
            result, outcome.seconds, outcome.detail = run_tests(repo, mutant.tests, timeout)
            outcome.status = {"passed": "survived", "empty": "invalid"}.get(result, "caught")
            if result == "timeout":
                outcome.detail = "caught by the timeout: " + outcome.detail
            return outcome
        finally:
            path.write_text(source, encoding="utf-8")
            self.copies.put(repo)


def print_table(outcomes: list[Outcome]) -> None:
    width = max(len(o.id) for o in outcomes)
    print(f"\n{'mutant':<{width}}  {'status':<8}  {'s':>5}  detail")
    for o in outcomes:
        print(f"{o.id:<{width}}  {o.status:<8}  {o.seconds:5.0f}  {o.detail if o.status != 'caught' else ''}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-k", action="append", default=[], help="only mutants whose id contains this")
    parser.add_argument("--workers", type=int, default=2, help="parallel test runs (at most 2 on 2 cores)")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per test run")
    parser.add_argument("--no-baseline", action="store_true", help="skip running each selection un-mutated")
    parser.add_argument("--list", action="store_true", help="list the mutants and whether they still apply")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where to write the JSON results")
    args = parser.parse_args(argv)

    ids = [mu.id for mu in MUTANTS]
    assert len(ids) == len(set(ids)), "mutant ids must be unique"
    chosen = [mu for mu in MUTANTS if not args.k or any(k in mu.id for k in args.k)]
    if args.list:
        for mu in chosen:
            print(f"{mu.id:<40} {'ok   ' if applies(mu) else 'STALE'} {mu.file:<32} {' '.join(mu.tests)}")
        return 0

    started = time.perf_counter()
    outcomes: dict[str, Outcome] = {}
    with tempfile.TemporaryDirectory(prefix="shardtune-mutants-") as tmp:
        workers = Workers(max(1, min(args.workers, 2)), Path(tmp))
        workers.check_imports()
        live = [mu for mu in chosen if applies(mu)]
        for mu in chosen:
            if mu not in live:
                outcomes[mu.id] = Outcome(
                    mu.id, mu.file, mu.why, list(mu.tests), "stale", detail="snippet not found once"
                )
        broken: dict[tuple[str, ...], str] = {}
        with ThreadPoolExecutor(max_workers=workers.copies.qsize()) as pool:
            if not args.no_baseline:
                groups = baseline_groups({mu.tests for mu in live})
                print(f"baseline: {len(groups)} test runs without a bug …", flush=True)
                for (union, members), (result, _, detail) in zip(
                    groups.items(),
                    pool.map(lambda t: workers.baseline(t, args.timeout), list(groups)),
                    strict=True,
                ):
                    if result != "passed":
                        print(f"  {' '.join(union)}: {result} ({detail})", flush=True)
                        for tests in members:
                            broken[tests] = f"baseline {result}: {detail}"
            runnable = [mu for mu in live if mu.tests not in broken]
            for mu in live:
                if mu.tests in broken:
                    outcomes[mu.id] = Outcome(
                        mu.id, mu.file, mu.why, list(mu.tests), "invalid", detail=broken[mu.tests]
                    )
            print(f"mutants: {len(runnable)} to run on {workers.copies.qsize()} workers …", flush=True)
            for outcome in pool.map(lambda mu: workers.mutate(mu, args.timeout), runnable):
                outcomes[outcome.id] = outcome
                print(f"  {outcome.status:<8} {outcome.id} ({outcome.seconds:.0f} s)", flush=True)
    ordered = [outcomes[mu.id] for mu in chosen]
    wall = time.perf_counter() - started
    counted = [o for o in ordered if o.status in ("caught", "survived")]
    caught = sum(o.status == "caught" for o in counted)
    share = caught / len(counted) if counted else 0.0
    print_table(ordered)
    stale = sum(o.status == "stale" for o in ordered)
    invalid = sum(o.status == "invalid" for o in ordered)
    print(
        f"\ncaught {caught}/{len(counted)} = {100 * share:.1f} %  (stale {stale}, invalid {invalid}; "
        f"{wall / 60:.1f} min on {args.workers} workers)"
    )
    for o in ordered:
        if o.status == "survived":
            print(f"  survived: {o.id} — {o.why}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    summary = {
        "caught": caught,
        "counted": len(counted),
        "share_caught": share,
        "stale": stale,
        "invalid": invalid,
        "wall_seconds": round(wall, 1),
        "workers": args.workers,
        "mutants": [asdict(o) for o in ordered],
    }
    args.out.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(f"results written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
