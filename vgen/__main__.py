import sys

from vgen.cli import main

sys.exit(main())
