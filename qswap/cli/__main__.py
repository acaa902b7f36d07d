import sys

from qswap.cli import main

sys.exit(main())
