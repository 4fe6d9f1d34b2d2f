"""Preference optimisation and RLHF."""
