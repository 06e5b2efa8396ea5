import sys

from vigla.cli import main

sys.exit(main())
