"""Packaging: one version number everywhere, and a wheel that is py3-none-<platform> with the library, the CLI,
the C headers, py.typed and the license; the installed wheel's C ABI is usable from C, its Python package from
Python. The wheel is built with scikit-build-core from requirements.txt (no build isolation, nothing downloaded),
CUDA off, in build-wheel/ (incremental after the first run)."""
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

import tilewise
from tilewise import _capi

ROOT = Path(__file__).resolve().parents[2]
VERSION = (ROOT / "VERSION").read_text().strip()


def clean_env(**extra):
    """The environment without the test run's TILEWISE_LIBRARY/PYTHONPATH, so an installed copy finds its own."""
    env = {k: v for k, v in os.environ.items() if k not in ("TILEWISE_LIBRARY", "PYTHONPATH")}
    env.update(extra)
    return env


def test_one_version_everywhere():
    assert VERSION.count(".") == 2 and all(x.isdigit() for x in VERSION.split("."))
    assert tilewise.__version__ == VERSION
    assert _capi.lib().tw_version().decode() == VERSION
    cli = Path(os.environ.get("TILEWISE_LIBRARY", ROOT / "build" / "libtilewise.so")).parent / "tilewise"
    if cli.exists():
        out = subprocess.run([str(cli), "--version"], capture_output=True, text=True, check=True).stdout
        assert out == f"tilewise {VERSION}\n"
    from tilewise.calibrate import cli as calibrate_cli

    with pytest.raises(SystemExit) as info:
        calibrate_cli.build_parser().parse_args(["--version"])
    assert info.value.code == 0
    # the other readers of VERSION: CMake and pyproject.toml (no version of their own)
    cmake = (ROOT / "CMakeLists.txt").read_text()
    assert 'file(STRINGS "${CMAKE_CURRENT_SOURCE_DIR}/VERSION"' in cmake and f"VERSION {VERSION}" not in cmake
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'dynamic = ["version"]' in pyproject and 'input = "VERSION"' in pyproject


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    pytest.importorskip("scikit_build_core", reason="scikit-build-core is not installed (requirements.txt)")
    if shutil.which("cmake") is None:
        pytest.skip("cmake is not on PATH")
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-build-isolation", "--no-deps",
                    "--no-cache-dir", "-w", str(out), str(ROOT), f"-Cbuild-dir={ROOT / 'build-wheel'}",
                    "-Ccmake.define.TILEWISE_CUDA=OFF"], check=True, env=clean_env())
    (path,) = out.glob("*.whl")
    return path


def test_wheel_is_py3_none_platform_and_ships_library_cli_headers_and_license(wheel):
    platform = sysconfig.get_platform().replace("-", "_").replace(".", "_")
    assert wheel.name == f"tilewise-{VERSION}-py3-none-{platform}.whl"
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        meta = z.read(f"tilewise-{VERSION}.dist-info/METADATA").decode()
        tags = z.read(f"tilewise-{VERSION}.dist-info/WHEEL").decode()
    headers = {f"tilewise/include/tilewise/{p.name}" for p in (ROOT / "include" / "tilewise").iterdir()}
    assert headers and headers <= names
    for name in ("tilewise/libtilewise.so", "tilewise/bin/tilewise", "tilewise/py.typed", "tilewise/VERSION",
                 "tilewise/_version.py", "tilewise/calibrate/cli.py", f"tilewise-{VERSION}.dist-info/licenses/LICENSE"):
        assert name in names, name
    assert f"Tag: py3-none-{platform}" in tags and "Root-Is-Purelib: false" in tags
    assert f"Version: {VERSION}\n" in meta and "License-Expression: Apache-2.0" in meta
    assert "Provides-Extra: calibrate" in meta


def test_installed_wheel_works_from_python_and_from_c(wheel, tmp_path):
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", "--target",
                    str(site), str(wheel)], check=True, env=clean_env())
    env = clean_env(PYTHONPATH=str(site))
    # Python: the bundled library (no TILEWISE_LIBRARY), the version and the CLI entry point
    code = ("import numpy as np, tilewise, tilewise._capi as c\n"
            "rng = np.random.default_rng()\n"
            "q = rng.standard_normal((1, 2 * 4 * 4, 2, 8)).astype(np.float32)\n"
            "o = tilewise.sliding_tile_attention(q, q, q, latent=(2, 4, 4), tile=(1, 2, 2), window=(1, 1, 1))\n"
            "assert np.isfinite(o).all() and o.shape == q.shape\n"
            "print(tilewise.__version__, c._find_library())")
    # faulthandler: on the H200 this run died of SIGSEGV with nothing on stderr (2026-11-30); cause not yet known
    out = subprocess.run([sys.executable, "-X", "faulthandler", "-c", code], capture_output=True, text=True, env=env,
                         cwd=tmp_path)
    assert out.returncode == 0, f"exit status {out.returncode}, stdout {out.stdout!r}, stderr {out.stderr!r}"
    version, library = out.stdout.split()
    assert version == VERSION and Path(library).resolve() == (site / "tilewise" / "libtilewise.so").resolve()
    out = subprocess.run([sys.executable, "-c", "import sys; sys.argv = ['tilewise', '--version']; "
                          "from tilewise._cli import main; main()"], capture_output=True, text=True, env=env,
                         cwd=tmp_path)
    assert out.returncode == 0 and out.stdout == f"tilewise {VERSION}\n", out.stderr
    # C: compile against the installed headers, link the installed library, plan a problem through the C ABI
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler: the C ABI of the installed wheel is untested here")
    program = tmp_path / "use_tilewise.c"
    program.write_text(r'''
#include <stdio.h>
#include <tilewise/tilewise.h>
int main(void) {
  tw_problem p;
  tw_problem_init(&p);
  p.q_heads = p.kv_heads = 2; p.head_dim = 8; p.dtype = TW_DTYPE_F32;
  p.latent[0] = 2; p.latent[1] = 4; p.latent[2] = 4;
  p.tile[0] = 1;   p.tile[1] = 2;   p.tile[2] = 2;
  const int64_t window[3] = {1, 1, 1};
  tw_pattern pattern;
  tw_pattern_init(&pattern);
  pattern.kind = TW_PATTERN_SLIDING_TILE;
  pattern.windows = window;
  tw_plan* plan = NULL;
  if (tw_plan_create(&p, &pattern, TW_DEVICE_CPU, &plan) != TW_OK) { fprintf(stderr, "%s\n", tw_last_error()); return 1; }
  double density = 0;
  tw_plan_density(plan, &density);
  printf("%s %.4f\n", tw_version(), density);
  tw_plan_destroy(plan);
  return 0;
}
''')
    package = site / "tilewise"
    binary = tmp_path / "use_tilewise"
    subprocess.run([cc, str(program), f"-I{package / 'include'}", f"-L{package}", "-ltilewise",
                    f"-Wl,-rpath,{package}", "-o", str(binary)], check=True)
    out = subprocess.run([str(binary)], capture_output=True, text=True, env=clean_env())
    assert out.returncode == 0, out.stderr
    version, density = out.stdout.split()
    # window 1x1x1 on a 2x2x2 tile grid: each query tile sees its own tile only, 1/8 of the pairs
    assert version == VERSION and float(density) == pytest.approx(1 / 8)


def test_library_exports_no_gnu_unique_symbols():
    """Two copies of the library in one process must not share state: GCC's STB_GNU_UNIQUE symbols (the statics of
    inline and template functions) are unified across libraries even with -Bsymbolic, which once made a second copy's
    backward launches fail (CMakeLists.txt: -fno-gnu-unique)."""
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("no nm (binutils) on this machine")
    path = _capi._find_library()
    out = subprocess.run([nm, "-D", "--defined-only", path], capture_output=True, text=True, check=True).stdout
    unique = [line for line in out.splitlines() if line.split()[1:2] == ["u"]]
    assert not unique, f"{path} exports {len(unique)} GNU-unique symbols, e.g. {unique[:3]}"
