"""Training data: builtin generated tasks (``tasks``) and examples turned into token rows with loss
masks, collated and packed (``examples``), mixed from several sources; the chat templates shipped
(``templates``); token rows cached and tokenized in parallel (``tokenized``).

May import: ``shardtune.core``, ``shardtune.models``, ``shardtune.recipe``.
"""
