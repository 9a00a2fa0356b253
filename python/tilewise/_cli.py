"""Entry point of the installed `tilewise` command: runs the CLI binary shipped inside the package."""
import os
import sys
from pathlib import Path


def main() -> None:
    binary = Path(__file__).resolve().parent / "bin" / "tilewise"
    if not binary.exists():
        sys.exit(f"tilewise: the CLI binary is missing at {binary}; reinstall the package (pip install .)")
    os.execv(binary, [str(binary), *sys.argv[1:]])
