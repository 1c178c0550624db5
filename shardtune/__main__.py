"""`python -m shardtune ...` (what `accelerate launch -m shardtune` and torchrun use)."""

from shardtune.cli import main

main()
