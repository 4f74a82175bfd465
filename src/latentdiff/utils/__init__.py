"""Files, state files, images, progress and logging: what every layer may use."""
