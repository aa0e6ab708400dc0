"""The fused training step, and the continual-learning strategies inside it."""
