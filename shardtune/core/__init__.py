"""The bottom layer: what every other layer may use, importing nothing else of shardtune.

* ``errors`` — the exception types and the exit codes they end in;
* ``fileio`` — atomic writes, output checks and ownership markers (never over what shardtune did not
  write), locks;
* ``catalog`` — the names a recipe can use (methods, builtin models, tasks, dtypes) as plain data, so
  that cheap commands answer without importing torch;
* ``progress`` — progress and notes on stderr.

May import: nothing from shardtune outside this package.
"""
