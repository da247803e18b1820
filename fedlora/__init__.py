"""fedlora: federated LoRA fine-tuning of Hugging Face transformers with Flower."""

import logging

__version__ = "0.1.0"

# bitsandbytes 0.50 warns at import, on CPUs with AVX512-BF16, that an optional fused 4-bit kernel (the `kernels`
# package, fetched from the hub) is missing; its own fallback then runs. Every process that imports peft would
# print it, so it is held back.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
