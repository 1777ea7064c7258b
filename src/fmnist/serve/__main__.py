"""``python -m fmnist.serve RUN [options]``: same as ``fmnist serve``."""
import sys

from fmnist.serve.cli import main

sys.exit(main())
