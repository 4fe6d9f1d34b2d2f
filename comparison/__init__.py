"""compare.py: several techniques on the same model, data and budget, in one table."""
