"""Data: loading (hub, local files, the bundled sample), question-answer and conversation formats,
prompts."""
