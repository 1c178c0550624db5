"""shardtune: fine-tune language models with shard-sharing low-rank adapters."""

__version__ = "0.1.0"
