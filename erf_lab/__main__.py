"""``python -m erf_lab`` (also what ``torchrun -m erf_lab`` runs)."""
from erf_lab.cli.main import run

if __name__ == "__main__":
    run()
