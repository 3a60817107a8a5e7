"""``python -m lit_xf.bench COMMAND``: the same as ``lit-xf bench COMMAND``."""

import sys

from lit_xf.bench.cli import main

sys.exit(main())
