"""The `shardtune` command line: parses arguments and calls library functions, nothing more.

Every command turns a :class:`shardtune.errors.ShardtuneError` into one line on stderr and its exit
code (docs/cli.md); ``--json`` prints one JSON object on stdout for scripts.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

import shardtune
from shardtune.errors import EXIT_FAILURE, EXIT_INTERRUPTED, BadInput, ShardtuneError

app = typer.Typer(
    name="shardtune",
    help="Fine-tune language models with shard-sharing low-rank adapters (LoRA, FOSSIL/MiSS, MoS, ShareLoRA, LoRS).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
err_console = Console(stderr=True, highlight=False)
out_console = Console(highlight=False)

SetOption = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        "-s",
        metavar="KEY=VALUE",
        help="Override a recipe key, e.g. --set train.lr=2e-4 --set adapter.rank=16 (repeatable).",
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout (for scripts).")]
QuietOption = Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")]


def fail(message: str, code: int, same_on_every_process: bool = False) -> None:
    """Print `error: MESSAGE` and exit with CODE. Of several launched processes, the main one speaks for
    errors every process meets alike (a bad recipe or data file); others name their rank."""
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0 or not same_on_every_process:
        prefix = f"[process {rank}] " if rank else ""
        err_console.print(f"error: {prefix}{message}", markup=False, soft_wrap=True)
    raise typer.Exit(code)


def handle_errors(fn):
    """One line and a stable exit code instead of a traceback (SHARDTUNE_DEBUG=1 shows tracebacks)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ShardtuneError as e:
            fail(str(e), e.exit_code, same_on_every_process=isinstance(e, BadInput))
        except KeyboardInterrupt:
            fail("interrupted", EXIT_INTERRUPTED)
        except typer.Exit:
            raise
        except Exception as e:
            if os.environ.get("SHARDTUNE_DEBUG"):
                raise
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            where = "details in the run's train.log; " if fn.__name__ == "train" else ""
            fail(
                f"internal error: {type(e).__name__}: {first} ({where}SHARDTUNE_DEBUG=1 shows the traceback)",
                EXIT_FAILURE,
            )

    return wrapper


def _version(value: bool) -> None:
    if value:
        out_console.print(f"shardtune {shardtune.__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit.")
    ] = False,
) -> None:
    """Fine-tune language models with shard-sharing low-rank adapters.

    Start with [bold]shardtune train recipes/tiny.yaml[/bold]; see docs/ for recipes and methods.
    """
    from shardtune.models import offline_and_quiet

    offline_and_quiet()


@app.command()
@handle_errors
def train(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML file.", show_default=False)],
    set_: SetOption = None,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume", help="Continue from the run's newest checkpoint (or: --resume CHECKPOINT_DIR)."
        ),
    ] = False,
    resume_from: Annotated[
        Path | None, typer.Option("--resume-from", help="Continue from this checkpoint-N directory.")
    ] = None,
    nproc: Annotated[
        int,
        typer.Option(
            "--nproc", min=1, help="Processes to launch through Accelerate (GPUs, or gloo on CPUs)."
        ),
    ] = 1,
    launch_args: Annotated[
        str | None,
        typer.Option(
            "--launch-args",
            help='Extra `accelerate launch` flags, e.g. "--num_machines 2 --machine_rank 0 --main_process_ip HOST".',
        ),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Validate the recipe, print it resolved, and stop.")
    ] = False,
    json_output: JsonOption = False,
    quiet: QuietOption = False,
) -> None:
    """Train an adapter as the RECIPE says; the run directory gets the adapter, metrics and log.

    Exit codes: 0 done, 1 internal error, 2 bad recipe/data/model, 3 diverged (NaN loss), 130 interrupted,
    143 stopped by SIGTERM (a checkpoint was written; continue with --resume).
    """
    from dataclasses import asdict

    from shardtune.progress import Reporter
    from shardtune.recipe import load_recipe, recipe_to_yaml

    resolved = load_recipe(recipe, set_)
    if dry_run:
        if json_output:
            out_console.print_json(data=resolved.model_dump(mode="json"))
        else:
            out_console.print(recipe_to_yaml(resolved), markup=False, end="")
        return
    if nproc > 1 and "WORLD_SIZE" not in os.environ:
        forwarded = [str(recipe)] + [a for item in set_ or [] for a in ("--set", item)]
        forwarded += ["--resume"] if resume else []
        forwarded += ["--resume-from", str(resume_from)] if resume_from else []
        forwarded += ["--json"] if json_output else []
        forwarded += ["-q"] if quiet else []
        raise typer.Exit(launch(nproc, forwarded, launch_args, cpu=resolved.train.cpu))
    from shardtune.train import train as run_training

    which = str(resume_from) if resume_from else ("latest" if resume else None)
    result = run_training(resolved, Reporter.for_cli(json_output, quiet), resume=which)
    if json_output and os.environ.get("RANK", "0") == "0":  # one summary, from the main process
        sys.stdout.write(json.dumps(asdict(result)) + "\n")


def launch(nproc: int, train_args: list[str], launch_args: str | None, cpu: bool) -> int:
    """Re-run `shardtune train` under `accelerate launch` (through `shardtune.launcher`, which turns a
    failed process into its exit code instead of a traceback) with N processes; return the exit code."""
    import shlex
    import subprocess

    import torch

    env = dict(os.environ)
    command = [sys.executable, "-m", "shardtune.launcher", "--num_processes", str(nproc)]
    command += ["--multi_gpu", "--main_process_port", "0", "--num_machines", "1"]
    command += ["--mixed_precision", "no", "--dynamo_backend", "no"]  # the recipe sets precision itself
    if cpu or not torch.cuda.is_available():
        env["ACCELERATE_USE_CPU"] = "1"  # gloo; `accelerate launch --cpu` would start one process only
    command += shlex.split(launch_args or "")
    command += ["-m", "shardtune", "train", *train_args]
    return subprocess.call(command, env=env)


@app.command()
@handle_errors
def generate(
    prompt: Annotated[
        list[str], typer.Argument(help="Prompt(s); each is answered separately.", show_default=False)
    ],
    adapter: Annotated[
        Path | None, typer.Option("--adapter", "-a", help="Run or checkpoint directory with the adapter.")
    ] = None,
    model: Annotated[
        str | None, typer.Option("--model", "-m", help="Base model (default: the adapter's base model).")
    ] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1)] = 128,
    temperature: Annotated[float, typer.Option(help="0 (default) is greedy decoding.", min=0.0)] = 0.0,
    chat: Annotated[
        bool, typer.Option("--chat/--no-chat", help="Apply the tokenizer's chat template.")
    ] = True,
    trust_remote_code: Annotated[bool, typer.Option("--trust-remote-code", help="Allow model code.")] = False,
    json_output: JsonOption = False,
) -> None:
    """Answer PROMPT with a base model and (optionally) a trained adapter."""
    from shardtune.checkpoint import load_adapted_model
    from shardtune.data import Example, prompt_ids, uses_chat
    from shardtune.evaluate import generate as run_generate
    from shardtune.models import load_model

    if adapter is not None:
        lm, tokenizer, _ = load_adapted_model(adapter, base_model=model, trust_remote_code=trust_remote_code)
    elif model is not None:
        lm, tokenizer = load_model(model, trust_remote_code=trust_remote_code)
    else:
        raise BadInput("generate: give --adapter RUN_DIR, --model MODEL, or both")
    use_chat = chat and uses_chat(tokenizer, "auto")
    ids = [prompt_ids(Example(p, ""), tokenizer, use_chat) for p in prompt]
    answers = run_generate(lm, tokenizer, ids, max_new_tokens, temperature=temperature)
    if json_output:
        sys.stdout.write(
            json.dumps([{"prompt": p, "answer": a} for p, a in zip(prompt, answers, strict=True)]) + "\n"
        )
        return
    for p, a in zip(prompt, answers, strict=True):
        if len(prompt) > 1:
            out_console.print(f"> {p}", style="bold", markup=False)
        out_console.print(a.strip(), markup=False)


@app.command("eval")
@handle_errors
def eval_command(
    run_dir: Annotated[Path, typer.Argument(help="Run or checkpoint directory.", show_default=False)],
    base: Annotated[bool, typer.Option("--base", help="Also evaluate the base model (adapter off).")] = False,
    samples: Annotated[int | None, typer.Option("--samples", min=1, help="Held-out examples to use.")] = None,
    json_output: JsonOption = False,
) -> None:
    """Held-out loss, perplexity and (builtin tasks) exact-match score of a trained adapter."""
    from rich.table import Table

    from shardtune.evaluate import evaluate_run

    result = evaluate_run(run_dir, base=base, samples=samples)
    if json_output:
        sys.stdout.write(json.dumps(result) + "\n")
        return
    table = Table(title=f"{result['run_dir']} ({result['method']}, step {result['step']})")
    for col in ("model", "eval loss", "perplexity", "task score"):
        table.add_column(col, justify="right" if col != "model" else "left")
    for who in ("base", "adapter"):
        if who in result:
            r = result[who]
            score = (
                f"{100 * r['task_score']:.1f}% ({r['task_correct']}/{r['examples']})"
                if "task_score" in r
                else "-"
            )
            table.add_row(who, f"{r['eval_loss']:.4f}", f"{r['perplexity']:.3f}", score)
    out_console.print(table)


@app.command()
@handle_errors
def routing(
    target: Annotated[Path, typer.Argument(help="Run/checkpoint directory, or a recipe (before training).")],
    set_: SetOption = None,
    plot: Annotated[
        Path | None, typer.Option("--plot", help="Write overlap heatmaps to this PNG (needs matplotlib).")
    ] = None,
    layers: Annotated[
        int, typer.Option("--layers", min=1, help="Layers to list in the per-layer table.")
    ] = 8,
    json_output: JsonOption = False,
) -> None:
    """Show which pool shards each layer's A and B use: private ones, reuse counts, layer overlap.

    MoS shows its routed pools; ShareLoRA and FOSSIL their simpler sharing; LoRA owns everything.
    """
    from shardtune import routing as routing_lib
    from shardtune.adapters.model import inject_adapter
    from shardtune.checkpoint import load_adapted_model
    from shardtune.models import load_model
    from shardtune.recipe import load_recipe

    if target.is_dir():
        lm, _, _ = load_adapted_model(target)
    else:
        recipe = load_recipe(target, set_)
        lm, _ = load_model(
            recipe.model.name, recipe.model.dtype, recipe.model.trust_remote_code, recipe.model.revision
        )
        inject_adapter(lm, recipe.adapter)
    report = routing_lib.routing_report(lm)
    if plot is not None:
        routing_lib.plot(report, plot)
    if json_output:
        sys.stdout.write(json.dumps(report) + "\n")
        return
    routing_lib.render(report, out_console, max_layers=layers)
    if plot is not None:
        out_console.print(f"heatmap written to {plot}", markup=False)


@app.command()
@handle_errors
def prune(
    model: Annotated[str, typer.Argument(help="Model: builtin alias, local directory or cached hub id.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output HF model directory.")],
    method: Annotated[str, typer.Option(help="magnitude or wanda.")] = "magnitude",
    sparsity: Annotated[float, typer.Option(help="Unstructured ratio of weights set to zero.")] = 0.5,
    pattern: Annotated[
        str | None, typer.Option(help="N:M semi-structured pattern, e.g. 2:4 (overrides --sparsity).")
    ] = None,
    recipe: Annotated[
        Path | None, typer.Option(help="Recipe whose data gives the calibration samples (wanda).")
    ] = None,
    samples: Annotated[int, typer.Option(min=1, help="Calibration examples (wanda).")] = 128,
    dtype: Annotated[str, typer.Option(help="float32, bfloat16 or float16.")] = "float32",
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace a non-empty --out directory.")
    ] = False,
    json_output: JsonOption = False,
) -> None:
    """Prune a model's linear layers (magnitude or Wanda; ratio or N:M) into a new model directory for LoRS."""
    from rich.table import Table
    from torch.utils.data import DataLoader

    from shardtune.data import Collator, encode_all, load_examples, uses_chat
    from shardtune.models import load_model
    from shardtune.prune import prune_model, save_model_dir
    from shardtune.recipe import load_recipe

    if dtype not in ("float32", "bfloat16", "float16"):
        raise BadInput(f"--dtype: expected float32, bfloat16 or float16, got {dtype!r}")
    lm, tokenizer = load_model(model, dtype)
    calibration = None
    if recipe is not None:
        data = load_recipe(recipe).data
        examples, _ = load_examples(data)
        features, _ = encode_all(
            examples[:samples], tokenizer, data.max_length, uses_chat(tokenizer, data.chat_template)
        )
        calibration = DataLoader(features, batch_size=8, collate_fn=Collator(tokenizer.pad_token_id))
    report = prune_model(lm, method, sparsity, pattern, calibration)
    save_model_dir(lm, tokenizer, out, overwrite)
    report["out"] = str(out)
    if json_output:
        sys.stdout.write(json.dumps(report) + "\n")
        return
    table = Table(title=f"{method} pruning, {report['pattern']} → {out}")
    for col in ("layer", "zeros", "of", "sparsity"):
        table.add_column(col, justify="left" if col == "layer" else "right")
    for row in report["layers"]:
        table.add_row(row["layer"], f"{row['zeros']:,}", f"{row['total']:,}", f"{100 * row['sparsity']:.1f}%")
    out_console.print(table)
    out_console.print(
        f"overall sparsity of the pruned layers: {100 * report['overall_sparsity']:.2f}%", markup=False
    )


OutOption = Annotated[Path, typer.Option("--out", "-o", help="Output directory (written atomically).")]
OverwriteOption = Annotated[bool, typer.Option("--overwrite", help="Replace a non-empty --out directory.")]


@app.command()
@handle_errors
def merge(
    run_dir: Annotated[Path, typer.Argument(help="Run or checkpoint directory.", show_default=False)],
    out: OutOption,
    dtype: Annotated[str, typer.Option(help="dtype of the written weights: bf16, fp16 or fp32.")] = "bf16",
    overwrite: OverwriteOption = False,
    json_output: JsonOption = False,
) -> None:
    """Merge the adapter into its base model (in fp32) → a plain transformers model directory."""
    from shardtune.export import merge_run

    result = merge_run(run_dir, out, dtype, overwrite)
    if json_output:
        sys.stdout.write(json.dumps(result) + "\n")
    else:
        out_console.print(
            f"merged {result['method']} adapter into {result['base_model']} → {out} ({dtype})", markup=False
        )


@app.command()
@handle_errors
def export(
    run_dir: Annotated[Path, typer.Argument(help="Run or checkpoint directory.", show_default=False)],
    out: OutOption,
    format: Annotated[
        str, typer.Option("--format", "-f", help="peft (a standard LoRA adapter) or shardtune.")
    ] = "peft",
    overwrite: OverwriteOption = False,
    json_output: JsonOption = False,
) -> None:
    """Write the adapter in another format: `peft` (PEFT/vLLM/transformers-loadable LoRA) or `shardtune`."""
    from shardtune.export import export_native, export_peft

    if format == "peft":
        result = export_peft(run_dir, out, overwrite)
    elif format == "shardtune":
        result = export_native(run_dir, out, overwrite)
    else:
        raise BadInput(f"--format: unknown format {format!r}; available: peft, shardtune")
    if json_output:
        sys.stdout.write(json.dumps(result) + "\n")
    elif format == "peft":
        out_console.print(
            f"{result['method']} adapter written as a PEFT LoRA (r={result['r']}, {result['layers']} layers) to {out}; "
            f"serve with e.g. vLLM --enable-lora --max-lora-rank {max(8, 1 << (result['r'] - 1).bit_length())}",
            markup=False,
        )
    else:
        out_console.print(f"adapter copied to {out}", markup=False)


@app.command()
@handle_errors
def params(
    model: Annotated[
        str, typer.Option("--model", "-m", help="Builtin alias, model directory/config.json, cached hub id.")
    ],
    method: Annotated[str, typer.Option("--method", help="Adapter method.")] = "lora",
    rank: Annotated[int | None, typer.Option("--rank", "-r", min=1, help="adapter.rank.")] = None,
    targets: Annotated[str | None, typer.Option(help="Comma-separated module names, or all-linear.")] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set", "-s", metavar="KEY=VALUE", help="Other adapter options, e.g. --set equivalent_rank=2."
        ),
    ] = None,
    compare: Annotated[
        bool, typer.Option("--compare", help="Every method side by side, with the ratio to LoRA.")
    ] = False,
    trust_remote_code: Annotated[bool, typer.Option("--trust-remote-code")] = False,
    json_output: JsonOption = False,
) -> None:
    """Trainable parameters of a method on a model, from its config alone (meta device; no weights loaded)."""
    import yaml
    from rich.table import Table

    from shardtune.adapters import METHODS
    from shardtune.errors import ShardtuneError
    from shardtune.export import count_trainable, method_options
    from shardtune.models import load_config

    config = load_config(model, trust_remote_code)
    options: dict = {}
    if rank is not None:
        options["rank"] = rank
    if targets is not None:
        options["targets"] = targets if targets == "all-linear" else targets.split(",")
    for item in set_ or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise BadInput(f"--set {item}: expected KEY=VALUE")
        options[key.removeprefix("adapter.")] = yaml.safe_load(value)
    rows = []
    for name in METHODS if compare else [method]:
        method_opts = (
            {k: v for k, v in options.items() if k in METHODS[name].Options.model_fields}
            if compare
            else options
        )
        try:
            trainable, base = count_trainable(config, method_options(name, **method_opts))
            rows.append({"method": name, "trainable": trainable, "base": base})
        except ShardtuneError as e:
            if not compare:
                raise
            rows.append({"method": name, "trainable": None, "base": None, "error": str(e)})
    lora = next((r["trainable"] for r in rows if r["method"] == "lora"), None)
    for r in rows:
        r["vs_lora"] = r["trainable"] / lora if lora and r["trainable"] is not None else None
        r["percent_of_base"] = 100 * r["trainable"] / r["base"] if r["trainable"] is not None else None
    if json_output:
        sys.stdout.write(json.dumps({"model": model, "options": options, "methods": rows}) + "\n")
        return
    table = Table(title=f"trainable parameters on {model}" + (f" ({options})" if options else ""))
    for col in ("method", "trainable", "% of base", "× LoRA"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for r in rows:
        if r["trainable"] is None:
            table.add_row(r["method"], "n/a", "", r.get("error", "")[:60])
            continue
        table.add_row(
            r["method"],
            f"{r['trainable']:,}",
            f"{r['percent_of_base']:.3f}%",
            f"{r['vs_lora']:.3f}" if r["vs_lora"] else "-",
        )
    out_console.print(table)


@app.command("compare")
@handle_errors
def compare_command(
    recipe: Annotated[
        Path, typer.Argument(help="Recipe YAML file (its adapter keys are shared where they apply).")
    ],
    methods: Annotated[str, typer.Option(help="Comma-separated methods.")] = "lora,fossil,mos,sharelora",
    set_: SetOption = None,
    plot: Annotated[Path | None, typer.Option("--plot", help="Loss curves PNG (needs matplotlib).")] = None,
    json_output: JsonOption = False,
    quiet: QuietOption = False,
) -> None:
    """Train the recipe with each method on the same data and steps; compare eval loss, task score, size, speed."""
    from rich.table import Table

    from shardtune.compare import compare
    from shardtune.progress import Reporter
    from shardtune.recipe import load_recipe

    report = compare(
        load_recipe(recipe, set_),
        [m.strip() for m in methods.split(",") if m.strip()],
        Reporter.for_cli(json_output, quiet),
        plot,
    )
    if json_output:
        sys.stdout.write(json.dumps(report["rows"]) + "\n")
        return
    table = Table(title=f"compare on {report['recipe_model']}")
    for col in ("method", "eval loss", "task score", "trainable", "s/step"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for r in report["rows"]:
        score = f"{100 * r['task_score']:.1f}%" if r["task_score"] is not None else "-"
        eval_loss = f"{r['eval_loss']:.4f}" if r["eval_loss"] is not None else "-"
        table.add_row(
            r["method"], eval_loss, score, f"{r['trainable_parameters']:,}", f"{r['seconds_per_step']:.3f}"
        )
    out_console.print(table)


@app.command()
@handle_errors
def models(json_output: JsonOption = False) -> None:
    """List the builtin model aliases usable as model.name."""
    from shardtune.models import builtin_models

    found = builtin_models()
    if json_output:
        sys.stdout.write(json.dumps(found) + "\n")
        return
    for name, desc in found.items():
        out_console.print(f"{name:24} {desc}", markup=False)


@app.command()
@handle_errors
def tasks(json_output: JsonOption = False) -> None:
    """List the builtin generated tasks usable as data.task."""
    from shardtune.tasks import TASKS

    if json_output:
        sys.stdout.write(json.dumps({n: t.description for n, t in TASKS.items()}) + "\n")
        return
    for name, task in TASKS.items():
        out_console.print(f"{name:24} {task.description}", markup=False)


@app.command()
@handle_errors
def methods(json_output: JsonOption = False) -> None:
    """List the adapter methods usable as adapter.method."""
    from shardtune.adapters import METHODS

    if json_output:
        sys.stdout.write(json.dumps({n: m.summary for n, m in METHODS.items()}) + "\n")
        return
    for name, method in METHODS.items():
        out_console.print(f"{name:12} {method.summary}", markup=False)


def main() -> None:
    # `--resume CHECKPOINT_DIR` is accepted as a spelling of `--resume-from CHECKPOINT_DIR`.
    argv = sys.argv[1:]
    for i, arg in enumerate(argv[:-1]):
        if arg == "--resume" and Path(argv[i + 1]).is_dir():
            argv[i] = "--resume-from"
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        app(args=argv, prog_name="shardtune")
        return
    # One of several launched processes: once the command is done, leave without the interpreter's
    # exit-time teardown. There, the collective backend's threads (gloo) are destroyed in an order
    # that now and then aborts a finished process ("terminate called without an active exception"),
    # turning a successful run into a failed launch. Everything is written and flushed by then.
    code = 0
    try:
        app(args=argv, prog_name="shardtune")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if isinstance(e.code, str):
            sys.stderr.write(e.code + "\n")
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
    os._exit(code)


if __name__ == "__main__":
    main()
