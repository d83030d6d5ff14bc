"""The server side of a run: the round loop (`loop`), checkpoints, held-out evaluation and
export (`evaluate`, `accuracy`), and the run directory's metrics and plots (`report`)."""
