import sys

from relprop.cli import main

sys.exit(main())
