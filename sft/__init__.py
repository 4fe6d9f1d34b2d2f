"""Supervised fine-tuning: one run, the technique is a parameter."""
