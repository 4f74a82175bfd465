"""`python -m latentdiff` (also what `torchrun -m latentdiff` runs)."""

from latentdiff.cli.main import main

raise SystemExit(main())
