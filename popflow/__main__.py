import sys

from popflow.cli import main

sys.exit(main())
