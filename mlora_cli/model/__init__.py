"""The multi-adapter model: base loading, the fused LoRA layer, slots and the per-slot optimizer."""
