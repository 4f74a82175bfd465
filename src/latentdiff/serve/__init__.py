"""The HTTP API, job queue, worker and web UI of `latentdiff serve` (extra `serve`): see docs/serve.md."""
