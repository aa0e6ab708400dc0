"""Batched evaluation of all adapters, continual-learning metrics, re-evaluation of saved adapters."""
