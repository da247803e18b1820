"""LoRA injection with peft, adapter state extract/load, and its transport form."""
