"""Shared layer: flags, data, model loading, PEFT configs, training plumbing."""
