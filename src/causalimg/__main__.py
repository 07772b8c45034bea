"""``python -m causalimg``: the same command line as the ``causalimg`` script."""

import sys

from causalimg.cli import main

sys.exit(main())
