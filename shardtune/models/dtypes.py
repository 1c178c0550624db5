"""Recipe dtype names (``fp32``, ``bf16``, ``fp16`` and the long torch names) as torch dtypes."""

from __future__ import annotations

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPES.update({"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16})  # synonyms
