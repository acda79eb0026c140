"""``python -m mmptm`` (and ``torchrun -m mmptm``): the command line."""

import sys

from mmptm.cli import main

sys.exit(main())
