"""`python -m dynrefer_hf.convert ...`: the same as `dynrefer convert ...`."""

import sys

from dynrefer_hf.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
