"""mlora: co-train a sweep of LoRA adapters over one shared frozen base model."""

__version__ = "0.1.0"
