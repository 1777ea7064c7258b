import sys

from fmnist.apps.cli import main

sys.exit(main())
