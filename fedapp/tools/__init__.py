"""Command-line tools around the app: `submit` (flwr run wrapper), `sweep` and
`sweep_report` (Hydra multirun comparisons), `late_merge`, `deploy` (credentials and
processes) and `loopback` (a local deployment for tests and benchmarks)."""
