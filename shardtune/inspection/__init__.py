"""Looking at models and runs without training them.

* ``evaluate`` — greedy generation, exact-match scores, held-out loss, ``eval`` of a run;
* ``routing`` — which shards each layer uses;
* ``params`` and ``layout`` — trainable-parameter counts and base memory on a model's layout.

May import: ``shardtune.core``, ``models``, ``adapters``, ``recipe``, ``data``, ``artifacts``.
"""
