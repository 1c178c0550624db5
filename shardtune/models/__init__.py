"""Base models: where they come from and how they are held.

* ``loading`` — model resolution (builtin aliases, local directories, hub ids) and loading;
* ``hub`` — hub downloads, cache, revisions, offline mode, one-line hub errors (imports no torch);
* ``quant`` — a base quantized by bitsandbytes, quantized layers detected and dequantized, memory;
* ``dtypes`` — recipe dtype names as torch dtypes;
* ``dtensor`` — tensors that FSDP2 may have sharded, read whole and written back.

May import: ``shardtune.core``.
"""
