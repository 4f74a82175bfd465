"""Samplers (pure functions) and the timestep grids they run on."""
