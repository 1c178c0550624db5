"""shardtune: fine-tune language models with shard-sharing low-rank adapters."""

__version__ = "0.1.0"

import logging as _logging

# A library logs to its own handlers only (the run's train.log); never to stderr by Python's fallback.
_logging.getLogger("shardtune").addHandler(_logging.NullHandler())
