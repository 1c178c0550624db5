"""Adapter methods, one file each, and the registry that maps a recipe's `adapter.method` to them.

May import: ``shardtune.core``, ``shardtune.models``.
"""

from __future__ import annotations

from shardtune.adapters.base import AdaptedLinear, AdapterMethod, AdapterOptions, LayerAdapter, Target
from shardtune.adapters.fossil import Fossil
from shardtune.adapters.lora import Lora
from shardtune.adapters.lors import Lors
from shardtune.adapters.mos import Mos
from shardtune.adapters.prolora import ProLora
from shardtune.adapters.sharelora import ShareLora
from shardtune.adapters.tiedlora import TiedLora
from shardtune.adapters.vblora import Vblora
from shardtune.adapters.vera import Vera
from shardtune.core.catalog import METHODS as SUMMARIES

METHODS: dict[str, AdapterMethod] = {
    m.name: m for m in (Lora(), Fossil(), Mos(), ShareLora(), Lors(), Vera(), Vblora(), TiedLora(), ProLora())
}
for _name, _method in METHODS.items():
    _method.summary = SUMMARIES[_name]  # one source: the catalog, which lists them without torch


def get_method(name: str) -> AdapterMethod:
    from shardtune.core.errors import RecipeError

    try:
        return METHODS[name]
    except KeyError:
        raise RecipeError(
            "adapter.method", f"unknown method {name!r}; available: {', '.join(METHODS)}"
        ) from None


__all__ = [
    "METHODS",
    "AdaptedLinear",
    "AdapterMethod",
    "AdapterOptions",
    "LayerAdapter",
    "Target",
    "get_method",
]
