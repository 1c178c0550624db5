"""Training: the loop and what runs around it.

* ``loop`` — the training loop, top to bottom, as named phases;
* ``launcher`` — ``--nproc`` / several machines through ``accelerate launch``;
* ``peers`` — processes watching each other (a lost peer ends the run, not a hang);
* ``fsdp`` — ``train.strategy: fsdp`` (FSDP2 units, the root with the shared stores);
* ``deepspeed`` — ``train.strategy: deepspeed`` (DeepSpeed ZeRO through Accelerate's plugin);
* ``rundir`` — a run directory's life (claimed, locked, started, finished);
* ``tracking`` — experiment trackers;
* ``selection`` — judging evaluations during training: the best one (``best/``), early stopping;
* ``compare`` — several methods (or budgets) trained side by side.

May import: every layer below it (``core``, ``models``, ``adapters``, ``recipe``, ``data``,
``artifacts``, ``inspection``); only ``shardtune.cli`` imports it.
"""
