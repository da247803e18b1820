"""Base models and tokenizers: embedded offline defaults, tiny random models, the hub."""
