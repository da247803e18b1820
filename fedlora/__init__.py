"""fedlora: federated LoRA fine-tuning of Hugging Face transformers with Flower."""

__version__ = "0.1.0"
