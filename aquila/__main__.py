import sys

from aquila.cli import main

sys.exit(main())
