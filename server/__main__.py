import sys

from antidistill.server.cli import main

sys.exit(main())
