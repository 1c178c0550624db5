"""`shardtune merge`, `export` and `prune`: commands that write a model or adapter directory."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from shardtune.cli.common import JsonOption, out_console, print_json, print_table
from shardtune.core.errors import BadInput

# A string, not a Path: `--out ""` must reach the check as empty, not as "." (the current directory).
OutOption = Annotated[str, typer.Option("--out", "-o", help="Output directory (written atomically).")]
OverwriteOption = Annotated[bool, typer.Option("--overwrite", help="Replace a non-empty --out directory.")]
RunArgument = Annotated[
    Path, typer.Argument(help="Run or checkpoint directory, or a PEFT LoRA adapter.", show_default=False)
]
BaseModelOption = Annotated[
    str | None,
    typer.Option("--base-model", help="The run's base model, moved or re-downloaded (name or directory)."),
]


def merge(
    run_dir: RunArgument,
    out: OutOption,
    dtype: Annotated[
        str, typer.Option(help="dtype of the written weights: bf16, fp16 or fp32 (long names also read).")
    ] = "bf16",
    base_weights: Annotated[
        str,
        typer.Option(
            help="A run on a quantized base: merge into the original unquantized weights (original), into "
            "the quantized base dequantized (dequantized: exactly what was trained), or auto (original when "
            "the base has them)."
        ),
    ] = "auto",
    overwrite: OverwriteOption = False,
    base_model: BaseModelOption = None,
    json_output: JsonOption = False,
) -> None:
    """Merge the adapter into its base model (in fp32) → a plain transformers model directory."""
    from shardtune.artifacts.export import merge_run

    result = merge_run(run_dir, out, dtype, overwrite, base_model, base_weights)
    if json_output:
        print_json(result)
        return
    base = result["base_model"]
    if result["quantize"]:
        which = "original unquantized" if result["base_weights"] == "original" else "dequantized"
        base += f" ({which} weights; trained on {result['quantize']})"
    out_console.print(
        f"merged {result['method']} adapter into {base} → {out} ({dtype})", markup=False, soft_wrap=True
    )


def export(
    run_dir: RunArgument,
    out: OutOption,
    format: Annotated[
        str,
        typer.Option(
            "--format",
            "-f",
            metavar="peft|peft-lora|shardtune",
            help="peft (PEFT's own type: VERA and VBLORA for VeRA and VB-LoRA, LORA for the rest), peft-lora "
            "(a standard LoRA for every low-rank method, for servers that take LoRA only) or shardtune.",
        ),
    ] = "peft",
    overwrite: OverwriteOption = False,
    base_model: BaseModelOption = None,
    json_output: JsonOption = False,
) -> None:
    """Write the adapter in another format: `peft` (loaded by PEFT and transformers; LoRA ones by vLLM too),
    `peft-lora` (a dense LoRA of any low-rank method) or `shardtune`."""
    from shardtune.artifacts.export import export_native, export_peft

    if format in ("peft", "peft-lora"):
        result = export_peft(run_dir, out, overwrite, base_model, dense=format == "peft-lora")
    elif format == "shardtune":
        result = export_native(run_dir, out, overwrite, base_model)
    else:
        raise BadInput(f"--format: unknown format {format!r}; available: peft, peft-lora, shardtune")
    if json_output:
        print_json(result)
    elif format != "shardtune":
        out_console.print(
            f"{result['method']} adapter written as a PEFT {result['peft_type']} adapter (r={result['r']}, "
            f"{result['layers']} layers, {result['stored_parameters']:,} numbers) to {out}; "
            f"base: {result['base_model_name_or_path']}",
            markup=False,
            soft_wrap=True,
        )
        if result["serve"]:
            out_console.print(f"serve with: {result['serve']}", markup=False, soft_wrap=True)
        else:
            out_console.print(f"not served by vLLM: {result['serve_note']}", markup=False, soft_wrap=True)
    else:
        out_console.print(f"adapter copied to {out}", markup=False)


def prune(
    model: Annotated[str, typer.Argument(help="Model: builtin alias, local directory or cached hub id.")],
    out: Annotated[str, typer.Option("--out", "-o", help="Output HF model directory.")],
    method: Annotated[str, typer.Option(help="magnitude, wanda or sparsegpt.")] = "magnitude",
    sparsity: Annotated[float, typer.Option(help="Unstructured ratio of weights set to zero.")] = 0.5,
    pattern: Annotated[
        str | None, typer.Option(help="N:M semi-structured pattern, e.g. 2:4 (overrides --sparsity).")
    ] = None,
    recipe: Annotated[
        Path | None, typer.Option(help="Recipe whose data gives the calibration samples (wanda, sparsegpt).")
    ] = None,
    samples: Annotated[int, typer.Option(min=1, help="Calibration examples (wanda, sparsegpt).")] = 128,
    dtype: Annotated[
        str, typer.Option(help="fp32, bf16 or fp16 (float32, bfloat16, float16 also read).")
    ] = "fp32",
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace a non-empty --out directory.")
    ] = False,
    json_output: JsonOption = False,
) -> None:
    """Prune a model's linear layers (magnitude, Wanda or SparseGPT; ratio or N:M) into a new model directory for LoRS."""
    from rich.table import Table

    from shardtune.artifacts.prune import prune_to_directory

    report = prune_to_directory(model, out, method, sparsity, pattern, recipe, samples, dtype, overwrite)
    if json_output:
        print_json(report)
        return
    title = f"{method} pruning, {report['pattern']} → {out}"
    table = Table()
    for col in ("layer", "zeros", "of", "sparsity"):
        table.add_column(col, justify="left" if col == "layer" else "right")
    for row in report["layers"]:
        table.add_row(row["layer"], f"{row['zeros']:,}", f"{row['total']:,}", f"{100 * row['sparsity']:.1f}%")
    print_table(title, table)
    out_console.print(
        f"overall sparsity of the pruned layers: {100 * report['overall_sparsity']:.2f}%", markup=False
    )
