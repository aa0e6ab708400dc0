"""What a person sees: tables, progress, plots, and the CSV written beside results.json."""
