"""Model loading, precision, quantization, adapters and the LoRA/loss replacements."""
