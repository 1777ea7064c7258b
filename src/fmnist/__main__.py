"""``python -m fmnist``: the command line, so that ``torchrun -m fmnist train ...`` runs it in each process."""
import sys

from fmnist.apps.cli import main

sys.exit(main())
