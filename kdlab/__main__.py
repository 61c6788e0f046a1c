"""``python -m kdlab ...`` (and ``torchrun --nproc_per_node=W -m kdlab train ...``): see :mod:`kdlab.cli`."""

import sys

from kdlab.cli import main

if __name__ == "__main__":
    sys.exit(main())
