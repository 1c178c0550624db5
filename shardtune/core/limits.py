"""Upper bounds on sizes a user gives (recipe keys and command-line options): beyond them a value is a
typo or hours of work, refused in one line before anything starts. A light module (no torch), so that
the command line can state them in its options."""

MAX_GENERATED = 1_000_000  # examples a builtin task generates (or holds out), and eval --samples
MAX_NEW_TOKENS = 1 << 16  # tokens of one generated answer (eval.max_new_tokens, --max-new-tokens)
MAX_STEPS = 10**9  # optimizer steps of one run (train.max_steps, or what train.epochs comes to)
