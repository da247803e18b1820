"""Base models and tokenizers: embedded offline defaults, tiny random models, the hub; how a base is held
(dtype, quantization, placement, checkpointing), its memory estimate, and the ids its adapters travel with."""
