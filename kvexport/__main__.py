"""`python -m kvexport`: the same command line as the `kvexport` script."""

import sys

from kvexport.exporter.cli import main

sys.exit(main())
