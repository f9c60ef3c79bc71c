import sys

from hsam.cli import main

sys.exit(main())
