"""The training recipe and what surrounds the trainer: callbacks, stop signals, resume, outputs,
reporting, the run summary and the command-line wrapper."""
