"""Commands that look at models and runs without training: generate, eval, routing, params, and the listings."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from shardtune.cli.common import (
    JsonOption,
    SetOption,
    TrustRemoteCodeOption,
    err_console,
    out_console,
    print_json,
    print_table,
)
from shardtune.core.limits import MAX_GENERATED, MAX_NEW_TOKENS


def generate(
    prompt: Annotated[
        list[str], typer.Argument(help="Prompt(s); each is answered separately.", show_default=False)
    ],
    adapter: Annotated[
        Path | None, typer.Option("--adapter", "-a", help="Run or checkpoint directory with the adapter.")
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            "-m",
            "--base-model",
            help="Base model (with -a: instead of the one the adapter records).",
        ),
    ] = None,
    max_new_tokens: Annotated[
        int,
        typer.Option(
            "--max-new-tokens", min=1, max=MAX_NEW_TOKENS, help="Stop each answer after this many tokens."
        ),
    ] = 128,
    temperature: Annotated[float, typer.Option(help="0 (default) is greedy decoding.", min=0.0)] = 0.0,
    chat: Annotated[
        bool, typer.Option("--chat/--no-chat", help="Apply the tokenizer's chat template.")
    ] = True,
    trust_remote_code: TrustRemoteCodeOption = False,
    json_output: JsonOption = False,
) -> None:
    """Answer PROMPT with a base model and (optionally) a trained adapter."""
    from shardtune.inspection.evaluate import answer_prompts

    answers = answer_prompts(prompt, adapter, model, chat, max_new_tokens, temperature, trust_remote_code)
    if json_output:
        print_json(answers)
        return
    for row in answers:
        if len(answers) > 1:
            out_console.print(f"> {row['prompt']}", style="bold", markup=False)
        out_console.print(row["answer"].strip(), markup=False)


def eval_command(
    run_dir: Annotated[
        Path | None,
        typer.Argument(help="Run or checkpoint directory, or a PEFT LoRA adapter.", show_default=False),
    ] = None,
    model: Annotated[
        str | None, typer.Option("--model", "-m", help="Evaluate a plain or merged model instead of a run.")
    ] = None,
    base_model: Annotated[
        str | None, typer.Option("--base-model", help="The run's base model, moved or re-downloaded.")
    ] = None,
    data: Annotated[
        Path | None,
        typer.Option(
            "--data", help="Examples to evaluate on (.jsonl/.json/.csv/...); default: the run's held-out set."
        ),
    ] = None,
    data_format: Annotated[
        str,
        typer.Option(
            "--format", help="auto, text, prompt_completion, alpaca, messages or sharegpt (--data)."
        ),
    ] = "auto",
    metric: Annotated[
        str, typer.Option("--metric", help="exact (first line equals the completion) or contains.")
    ] = "exact",
    base: Annotated[bool, typer.Option("--base", help="Also evaluate the base model (adapter off).")] = False,
    samples: Annotated[
        int | None,
        typer.Option("--samples", min=1, max=MAX_GENERATED, help="Held-out examples to use."),
    ] = None,
    json_output: JsonOption = False,
) -> None:
    """Held-out loss, perplexity and answer score of a run, a PEFT adapter or a plain model.

    The run's held-out examples by default (builtin tasks score exact match); --data FILE scores your own
    prompt/completion, alpaca or messages records (--metric exact or contains).
    """
    from rich.table import Table

    from shardtune.inspection.evaluate import evaluate

    result = evaluate(run_dir, model, base_model, data, data_format, metric, samples, base)
    if result.get("note"):
        err_console.print(f"note: {result['note']}", markup=False, soft_wrap=True)
    if json_output:
        print_json(result)
        return
    step = f" at step {result['step']}" if result.get("step") is not None else ""
    title = f"{result['run_dir']}: {result['method']} adapter{step}" if run_dir else result["model"]
    title = f"{title}; data: {result['data']}"
    table = Table()
    for col in ("model", "eval loss", "perplexity", "score"):
        table.add_column(col, justify="right" if col != "model" else "left")
    for who, label in (("base", "base"), ("adapter", "adapter"), ("model_scores", "model")):
        if who in result:
            r = result[who]
            score = (
                f"{100 * r['task_score']:.1f}% ({r['task_correct']}/{r['scored']}, {result['metric']})"
                if "task_score" in r
                else "-"
            )
            table.add_row(label, f"{r['eval_loss']:.4f}", f"{r['perplexity']:.3f}", score)
    print_table(title, table)


def routing(
    target: Annotated[Path, typer.Argument(help="Run/checkpoint directory, or a recipe (before training).")],
    set_: SetOption = None,
    plot: Annotated[
        Path | None, typer.Option("--plot", help="Write overlap heatmaps to this PNG (needs matplotlib).")
    ] = None,
    layers: Annotated[
        int, typer.Option("--layers", min=1, help="Layers to list in the per-layer table.")
    ] = 8,
    base_model: Annotated[
        str | None, typer.Option("--base-model", help="A run's base model, moved or re-downloaded.")
    ] = None,
    json_output: JsonOption = False,
) -> None:
    """Show which pool shards each layer's A and B use: private ones, reuse counts, layer overlap.

    MoS shows its routed pools; ShareLoRA and FOSSIL their simpler sharing; LoRA owns everything.
    """
    from shardtune.inspection import routing as routing_lib

    report = routing_lib.routing_of(target, set_, plot_to=plot, base_model=base_model)
    if json_output:
        print_json(report)
        return
    routing_lib.render(report, out_console, max_layers=layers)
    if plot is not None:
        out_console.print(f"heatmap written to {plot}", markup=False)


def params(
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            "-m",
            help="Builtin alias, model directory/config.json or hub id (default: the recipe's, "
            "else the embedded smollm2-135m-instruct).",
        ),
    ] = None,
    method: Annotated[
        str | None, typer.Option("--method", help="Adapter method (default: the recipe's, else lora).")
    ] = None,
    rank: Annotated[int | None, typer.Option("--rank", "-r", min=1, help="adapter.rank.")] = None,
    targets: Annotated[str | None, typer.Option(help="Comma-separated module names, or all-linear.")] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set", "-s", metavar="KEY=VALUE", help="Other adapter options, e.g. --set equivalent_rank=2."
        ),
    ] = None,
    recipe: Annotated[
        Path | None,
        typer.Option("--recipe", help="Count the model and adapter of this recipe (options override)."),
    ] = None,
    compare: Annotated[
        bool, typer.Option("--compare", help="Every method side by side, with the ratio to LoRA.")
    ] = False,
    quantize: Annotated[
        str | None, typer.Option(help="Base weight memory quantized as model.quantize: nf4, fp4 or int8.")
    ] = None,
    double_quant: Annotated[
        bool,
        typer.Option(
            "--double-quant/--no-double-quant",
            help="With --quantize nf4/fp4: count the quantization constants quantized again (model.double_quant).",
        ),
    ] = True,
    trust_remote_code: TrustRemoteCodeOption = False,
    json_output: JsonOption = False,
) -> None:
    """Trainable parameters of a method on a model, and the base's weight memory, from its config alone
    (meta device; no weights loaded)."""
    from rich.table import Table

    from shardtune.inspection.params import parameter_options, parameter_report

    model_key = "model.name" if model is None and recipe is not None else "--model"
    model, method, options, quantize = parameter_options(model, method, rank, targets, set_, recipe, quantize)
    report = parameter_report(
        model, method, options, compare, trust_remote_code, quantize, double_quant, model_key
    )
    if report.get("note"):
        err_console.print(report["note"], markup=False, soft_wrap=True)
    if json_output:
        print_json(report)
        return
    settings = ", ".join(f"{key} {value}" for key, value in options.items()) if options else ""
    title = f"trainable parameters on {report['model']}" + (f" ({settings})" if settings else "")
    table = Table()
    columns = ["method", "trainable", "% of base", "× LoRA"]
    errors = any(r["trainable"] is None for r in report["methods"])
    for col in columns + (["why not"] if errors else []):
        table.add_column(col, justify="left" if col in ("method", "why not") else "right")
    for r in report["methods"]:
        if r["trainable"] is None:
            table.add_row(r["method"], "n/a", "", "", r.get("error", ""))
            continue
        cells = [
            f"{r['trainable']:,}",
            f"{r['percent_of_base']:.3f}%",
            f"{r['vs_lora']:.3f}" if r["vs_lora"] else "-",
        ]
        table.add_row(r["method"], *cells, *([""] if errors else []))
    print_table(title, table)
    out_console.print(report["base_memory"]["summary"], markup=False, soft_wrap=True)


def models(json_output: JsonOption = False) -> None:
    """List the builtin model aliases usable as model.name."""
    from shardtune.core.catalog import builtin_models

    found = builtin_models()
    if json_output:
        print_json(found)
        return
    for name, desc in found.items():
        out_console.print(f"{name:24} {desc}", markup=False)


def tasks(json_output: JsonOption = False) -> None:
    """List the builtin generated tasks usable as data.task."""
    from shardtune.data.tasks import TASKS

    if json_output:
        print_json({n: t.description for n, t in TASKS.items()})
        return
    for name, task in TASKS.items():
        out_console.print(f"{name:24} {task.description}", markup=False)


def methods(json_output: JsonOption = False) -> None:
    """List the adapter methods usable as adapter.method."""
    from shardtune.core.catalog import METHODS

    if json_output:
        print_json(METHODS)
        return
    for name, summary in METHODS.items():
        out_console.print(f"{name:12} {summary}", markup=False)
