"""Task sources -> examples -> tokenized rows and padded batches."""
