"""What a run writes and what is made from it.

* ``checkpoint`` — adapter files (safetensors + JSON), checkpoints and training state, loading a run;
* ``peftio`` — PEFT LoRA adapter directories read as shardtune LoRA;
* ``export`` — merge into a plain model, export as a PEFT LoRA;
* ``prune`` — a pruned (sparse) base model for LoRS.

May import: ``shardtune.core``, ``models``, ``adapters``, ``recipe``, ``data``.
"""
