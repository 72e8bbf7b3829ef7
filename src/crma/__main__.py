"""`python -m crma` (also what `accelerate launch -m crma ...` runs)."""

import sys

from crma.cli import main

sys.exit(main())
