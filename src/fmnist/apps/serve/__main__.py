"""``python -m fmnist.apps.serve RUN [options]``: same as ``fmnist serve``."""
import sys

from fmnist.apps.cli.serve import main

sys.exit(main())
