import sys

from lipkern.cli import main

sys.exit(main())
