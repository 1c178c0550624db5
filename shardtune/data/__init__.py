"""Training data: builtin generated tasks (``tasks``) and examples turned into token rows with loss
masks, collated and packed (``examples``).

May import: ``shardtune.core``, ``shardtune.models``, ``shardtune.recipe``.
"""
