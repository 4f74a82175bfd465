"""HTTP API and web UI (the `serve` extra): a job queue over LatentDiffusion, one worker per device."""
