"""The Hugging Face Hub: when the network may be used, and uploads of finished runs."""
