import sys

from smartrun.cli import main

sys.exit(main())
