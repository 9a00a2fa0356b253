"""tilewise.__version__, read from the VERSION file: the one version number, which CMake (tw_version(), the CLI's
--version) and pyproject.toml (the wheel's metadata) read too. An installed wheel has VERSION next to this file;
a source checkout has it at the repository root."""
from pathlib import Path


def _read() -> str:
    here = Path(__file__).resolve().parent
    for path in (here / "VERSION", here.parents[1] / "VERSION"):
        if path.is_file():
            return path.read_text().strip()
    raise RuntimeError(f"tilewise: no VERSION file next to {here} or at {here.parents[1]}; reinstall the package")


__version__ = _read()
