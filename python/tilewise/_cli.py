"""Entry point of the installed `tilewise` command: `tilewise calibrate ...` runs the Python calibration
(tilewise.calibrate.cli), `tilewise train ...` the training recipes (tilewise.train.cli); every other command runs
the CLI binary shipped inside the package."""
import os
import sys
from pathlib import Path


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "calibrate":
        from tilewise.calibrate.cli import main as calibrate

        sys.exit(calibrate(sys.argv[2:]))
    if len(sys.argv) > 1 and sys.argv[1] == "train":
        from tilewise.train.cli import main as train

        sys.exit(train(sys.argv[2:]))
    binary = Path(__file__).resolve().parent / "bin" / "tilewise"
    if not binary.exists():
        sys.exit(f"tilewise: the CLI binary is missing at {binary}; reinstall the package (pip install .)")
    os.execv(binary, [str(binary), *sys.argv[1:]])
