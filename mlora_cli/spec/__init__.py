"""The sweep file as typed, validated objects; expansion into adapters and their placement (torch-free)."""
