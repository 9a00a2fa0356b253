import sys

from tilewise.train.cli import main

sys.exit(main())
