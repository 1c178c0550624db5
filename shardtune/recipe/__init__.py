"""The recipe: its schema (pydantic sections), YAML reading, ``--set`` overrides and one-line errors.

May import: ``shardtune.core``, ``shardtune.models``, ``shardtune.adapters``.
"""
