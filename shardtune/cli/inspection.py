"""Commands that look at models and runs without training: generate, eval, routing, params, and the listings."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from shardtune.cli.common import JsonOption, SetOption, out_console, print_json
from shardtune.errors import BadInput


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
    from shardtune.evaluate import answer_prompts

    answers = answer_prompts(prompt, adapter, model, chat, max_new_tokens, temperature, trust_remote_code)
    if json_output:
        print_json(answers)
        return
    for row in answers:
        if len(answers) > 1:
            out_console.print(f"> {row['prompt']}", style="bold", markup=False)
        out_console.print(row["answer"].strip(), markup=False)


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
        print_json(result)
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

    report = routing_lib.routing_of(target, set_, plot_to=plot)
    if json_output:
        print_json(report)
        return
    routing_lib.render(report, out_console, max_layers=layers)
    if plot is not None:
        out_console.print(f"heatmap written to {plot}", markup=False)


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
    quantize: Annotated[
        str | None, typer.Option(help="Base weight memory quantized as model.quantize: nf4, fp4 or int8.")
    ] = None,
    double_quant: Annotated[bool, typer.Option("--double-quant/--no-double-quant")] = True,
    trust_remote_code: Annotated[bool, typer.Option("--trust-remote-code")] = False,
    json_output: JsonOption = False,
) -> None:
    """Trainable parameters of a method on a model, and the base's weight memory, from its config alone
    (meta device; no weights loaded)."""
    import yaml
    from rich.table import Table

    from shardtune.export import parameter_report

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
    report = parameter_report(model, method, options, compare, trust_remote_code, quantize, double_quant)
    if json_output:
        print_json(report)
        return
    table = Table(title=f"trainable parameters on {model}" + (f" ({options})" if options else ""))
    for col in ("method", "trainable", "% of base", "× LoRA"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for r in report["methods"]:
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
    out_console.print(report["base_memory"]["summary"], markup=False, soft_wrap=True)


def models(json_output: JsonOption = False) -> None:
    """List the builtin model aliases usable as model.name."""
    from shardtune.models import builtin_models

    found = builtin_models()
    if json_output:
        print_json(found)
        return
    for name, desc in found.items():
        out_console.print(f"{name:24} {desc}", markup=False)


def tasks(json_output: JsonOption = False) -> None:
    """List the builtin generated tasks usable as data.task."""
    from shardtune.tasks import TASKS

    if json_output:
        print_json({n: t.description for n, t in TASKS.items()})
        return
    for name, task in TASKS.items():
        out_console.print(f"{name:24} {task.description}", markup=False)


def methods(json_output: JsonOption = False) -> None:
    """List the adapter methods usable as adapter.method."""
    from shardtune.adapters import METHODS

    if json_output:
        print_json({n: m.summary for n, m in METHODS.items()})
        return
    for name, method in METHODS.items():
        out_console.print(f"{name:12} {method.summary}", markup=False)
