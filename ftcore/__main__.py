import sys

from ftcore.cli import main

sys.exit(main())
