"""``python -m decoct.cli ...`` (what torchrun launches): the same as the ``decoct`` command."""

import sys

from decoct.cli import main

sys.exit(main())
