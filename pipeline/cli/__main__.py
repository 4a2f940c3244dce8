"""``python -m pipeline.cli``: the engine's commands (the console script ``deeplab`` adds ``serve``)."""

import sys

from pipeline.cli.parser import main

sys.exit(main())
