"""`python -m dynrefer_hf.cli ...`: the same as `dynrefer ...`."""

import sys

from . import main

sys.exit(main())
