"""`python -m latentdiff` (also what `torchrun -m latentdiff` runs)."""

from .cli import main

raise SystemExit(main())
