"""Submit a Flower run, stream it, exit non-zero if it failed: see fedapp/tools/submit.py."""

import sys

from fedapp.tools.submit import main

if __name__ == "__main__":
    sys.exit(main())
