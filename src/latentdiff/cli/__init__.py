"""The `latentdiff` command line (the top layer)."""
