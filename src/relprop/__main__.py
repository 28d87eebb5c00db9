import sys

from relprop.cli.main import main

sys.exit(main())
