"""Command-line flags: the dataclasses, the parser and the checks that run before any model loads."""
