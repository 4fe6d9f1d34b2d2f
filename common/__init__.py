"""The shared layer of the scripts, one package per concern: flags (flags and their errors), data
(loading and prompt formats), model (loading, precision, adapters), recipe (the training recipe,
its callbacks, resume and outputs), evaluation (generation and scores) and hub (uploads, network)."""
