"""``python -m erf_lab`` (also what ``torchrun -m erf_lab`` runs)."""
import sys

from erf_lab.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
