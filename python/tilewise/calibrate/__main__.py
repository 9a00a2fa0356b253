"""python -m tilewise.calibrate ...: the same as `tilewise calibrate ...`."""
import sys

from tilewise.calibrate.cli import main

sys.exit(main())
