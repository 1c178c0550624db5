"""Routing inspection: which stores and shards each adapted layer's A and B are built from.

Works on any method through :meth:`LayerAdapter.routing`: MoS shows its routed pool shards (public
and private), other methods show their simpler sharing (own matrices, FOSSIL's replicated shard).
"""

from __future__ import annotations

from collections import Counter
from itertools import combinations
from pathlib import Path

from torch import nn

from shardtune.adapters.model import adapted_layers
from shardtune.core.errors import BadInput
from shardtune.core.fileio import check_plot_path, save_figure


def routing_of(
    target: Path,
    overrides: list[str] | None = None,
    plot_to: Path | None = None,
    base_model: str | None = None,
) -> dict:
    """:func:`routing_report` of a run or checkpoint directory (``base_model``: another copy of its base),
    or of a recipe's adapter before training; with ``plot_to``, also the overlap heatmaps there
    (:func:`plot`)."""
    from shardtune.recipe.shipped import recipe_path

    target = recipe_path(target)  # a shipped recipe's name reads that recipe
    if plot_to is not None:
        check_plot_path(plot_to, "--plot", inputs=[target if target.is_dir() else None])
    from shardtune.adapters.model import inject_adapter
    from shardtune.artifacts.checkpoint import load_adapted_model
    from shardtune.models.loading import load_model
    from shardtune.recipe.schema import load_recipe

    if not target.exists():
        raise BadInput(f"{target}: no such run directory or recipe file (nor a shipped recipe's name)")
    if target.is_dir():
        if overrides:
            raise BadInput(
                f"--set {overrides[0]}: {target} is a trained run, whose adapter is fixed; --set applies to a recipe"
            )
        model, _, _ = load_adapted_model(target, base_model=base_model)
    else:
        if base_model is not None:
            raise BadInput(
                f"--base-model: {target} is a recipe, whose model.name is the base (--set model.name=...)"
            )
        recipe = load_recipe(target, overrides)
        model, _ = load_model(
            recipe.model.name, recipe.model.dtype, recipe.model.trust_remote_code, recipe.model.revision
        )
        inject_adapter(model, recipe.adapter)
    report = routing_report(model)
    if plot_to is not None:
        plot(report, plot_to)
    return report


def routing_report(model: nn.Module) -> dict:
    """Per layer and matrix: pool and shards; per pool: reuse counts; per type: pairwise layer overlap."""
    layers = []
    reuse: dict[str, Counter] = {}
    for name, layer in adapted_layers(model).items():
        entry = {"layer": name, "type": _kind(model, name), "matrices": {}}
        for matrix, info in layer.adapter.routing().items():
            pool = f"{name}:{matrix}" if info["pool"] == "own" else info["pool"]
            entry["matrices"][matrix] = {**info, "pool": pool}
            if info["pool"] != "fixed":
                reuse.setdefault(pool, Counter()).update(set(info["shards"]))
        layers.append(entry)

    pools = {}
    for pool, counts in reuse.items():
        size = _pool_size(model, pool, counts)
        used = Counter(counts.values())
        pools[pool] = {
            "shards": size,
            "used_by_layers": {str(k): v for k, v in sorted(used.items())},
            "unused": size - len(counts),
            "max_reuse": max(counts.values(), default=0),
        }

    overlap: dict[str, dict[str, list[list[int]]]] = {}
    by_type: dict[str, list[dict]] = {}
    for entry in layers:
        by_type.setdefault(entry["type"], []).append(entry)
    for kind, group in by_type.items():
        overlap[kind] = {}
        for matrix in ("A", "B"):
            sets = [
                (e["matrices"][matrix]["pool"], set(e["matrices"][matrix]["shards"]))
                for e in group
                if matrix in e["matrices"]
            ]
            n = len(sets)
            grid = [[0] * n for _ in range(n)]
            for i in range(n):
                grid[i][i] = len(sets[i][1])
            for i, j in combinations(range(n), 2):
                shared = len(sets[i][1] & sets[j][1]) if sets[i][0] == sets[j][0] else 0
                grid[i][j] = grid[j][i] = shared
            overlap[kind][matrix] = grid
    return {"method": model.shardtune_options.method, "layers": layers, "pools": pools, "overlap": overlap}


def _kind(model: nn.Module, name: str) -> str:
    return model.shardtune_target_kinds.get(name, name.rsplit(".", 1)[-1])


def _pool_size(model: nn.Module, pool: str, counts: Counter) -> int:
    stores = getattr(model, "shardtune_stores", None)
    pools = getattr(stores, "pools", None)
    if pools is not None and pool in pools:
        return pools[pool].shape[0]
    return len(counts)


def summary_rows(report: dict) -> list[dict]:
    """One row per projection type: layers, mean public/private vectors, mean pairwise overlap."""
    rows = []
    by_type: dict[str, list[dict]] = {}
    for entry in report["layers"]:
        by_type.setdefault(entry["type"], []).append(entry)
    for kind, group in by_type.items():
        row = {"type": kind, "layers": len(group)}
        for matrix in ("A", "B"):
            infos = [e["matrices"][matrix] for e in group if matrix in e["matrices"]]
            grid = report["overlap"][kind][matrix]
            pairs = [grid[i][j] for i, j in combinations(range(len(grid)), 2)]
            row[f"{matrix}_pool"] = _pool_label(infos[0]["pool"]) if infos else "-"
            row[f"{matrix}_shards"] = len(infos[0]["shards"]) if infos else 0
            row[f"{matrix}_private"] = sum(infos[0]["private"]) if infos else 0
            row[f"{matrix}_mean_overlap"] = sum(pairs) / len(pairs) if pairs else 0.0
            row[f"{matrix}_note"] = infos[0].get("note", "") if infos else ""
        rows.append(row)
    return rows


def _pool_label(pool: str) -> str:
    return "own" if ":" in pool else pool


# The summary table's columns, one per value of summary_rows (the --json view holds the same).
SUMMARY_COLUMNS = (
    "type",
    "layers",
    "A from",
    "A shards",
    "A private",
    "A mean overlap",
    "B from",
    "B shards",
    "B private",
    "B mean overlap",
)


def render(report: dict, console, max_layers: int = 8) -> None:
    from rich.table import Table

    # (titles are printed as lines of their own: a table title wraps to the table's width)
    console.print(
        f"routing summary ({report['method']}): shards per layer, private ones, mean shards shared by a layer pair",
        markup=False,
        soft_wrap=True,
    )
    table = Table()
    for col in SUMMARY_COLUMNS:
        table.add_column(col, justify="left" if col in ("type", "A from", "B from") else "right")
    notes = set()
    for row in summary_rows(report):
        table.add_row(
            row["type"],
            str(row["layers"]),
            row["A_pool"],
            str(row["A_shards"]),
            str(row["A_private"]),
            f"{row['A_mean_overlap']:.2f}",
            row["B_pool"],
            str(row["B_shards"]),
            str(row["B_private"]),
            f"{row['B_mean_overlap']:.2f}",
        )
        notes |= {row["A_note"], row["B_note"]} - {""}
    console.print(table)
    for note in sorted(notes):
        console.print(f"  note: {note}", markup=False)

    pools = Table()
    for col in ("pool", "shards", "unused", "used by 1", "used by 2+", "max reuse"):
        pools.add_column(col, justify="left" if col == "pool" else "right")
    shared = {k: v for k, v in report["pools"].items() if ":" not in k}
    for name, info in shared.items():
        by = info["used_by_layers"]
        many = sum(v for k, v in by.items() if int(k) >= 2)
        pools.add_row(
            name,
            str(info["shards"]),
            str(info["unused"]),
            str(by.get("1", 0)),
            str(many),
            str(info["max_reuse"]),
        )
    if shared:
        console.print("pool reuse (how many layers use each shard)", markup=False, soft_wrap=True)
        console.print(pools)
    else:
        console.print("no store is shared between layers (every layer owns its parameters)")

    total = len(report["layers"])
    shown = (
        f"all {total} layers"
        if max_layers >= total
        else f"first {max_layers} of {total} layers; --layers for more"
    )
    console.print(f"per-layer shards ({shown}; private marked *)", markup=False, soft_wrap=True)
    layers = Table()
    for col in ("layer", "A", "B"):
        layers.add_column(col)
    for entry in report["layers"][:max_layers]:
        cells = []
        for matrix in ("A", "B"):
            info = entry["matrices"].get(matrix)
            if not info or not info["shards"]:
                cells.append(info.get("note", "-") if info else "-")
                continue
            shards = [f"{s}{'*' if p else ''}" for s, p in zip(info["shards"], info["private"], strict=True)]
            text = " ".join(shards[:16]) + (" …" if len(shards) > 16 else "")
            cells.append(f"{_pool_label(info['pool'])}: {text}")
        layers.add_row(entry["layer"], *cells)
    console.print(layers)


def plot(report: dict, path: str | Path) -> None:
    """Heatmaps of the pairwise layer overlap (shared shards) of A and B, one row per projection type."""
    check_plot_path(path, "--plot")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise BadInput("--plot needs matplotlib: pip install matplotlib") from None
    kinds = list(report["overlap"])
    fig, axes = plt.subplots(len(kinds), 2, figsize=(8, 3.2 * len(kinds)), squeeze=False)
    for row, kind in enumerate(kinds):
        for col, matrix in enumerate(("A", "B")):
            ax = axes[row][col]
            grid = report["overlap"][kind][matrix]
            im = ax.imshow(grid, cmap="viridis", vmin=0)
            ticks = range(0, len(grid), max(1, len(grid) // 8))
            ax.set_xticks(ticks)
            ax.set_yticks(ticks)
            ax.set_title(f"{kind} · {matrix}: shards shared by layer pairs", fontsize=9)
            ax.set_xlabel("layer")
            ax.set_ylabel("layer")
            fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle(f"{report['method']} routing overlap")
    fig.tight_layout()
    try:
        save_figure(fig, path)
    finally:
        plt.close(fig)
