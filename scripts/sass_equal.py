#!/usr/bin/env python3
"""Whether two builds of the library carry the same machine code, kernel by kernel: the check behind "the default
build's SASS is identical to the variant that passed on the GPU", which lets a source change (a new switch, off;
a switch's default flipped to the verified value) land without another device run.

    python3 scripts/sass_equal.py A/libtilewise.so B/libtilewise.so [--kernels REGEX] [--cuobjdump PATH]

Compares `cuobjdump -sass` of both after normalising what differs between builds without changing the code: the
constant-bank offsets of kernel parameters (a struct that gained a field moves them) and the addresses in the
listing. Prints one line per kernel that differs or exists in one build only, then a summary; exits 0 when every
selected kernel is identical, 1 otherwise. cuobjdump comes with the CUDA toolkit (also as the pip wheel
nvidia-cuda-cuobjdump); no GPU is needed."""
from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys

FUNCTION = re.compile(r"^\s*Function : (\S+)")
# one instruction: /*0040*/  MOV R1, c[0x0][0x28] ;  ->  "MOV R1, c[0x0][PARAM] ;"
INSTRUCTION = re.compile(r"^\s*/\*[0-9a-f]+\*/\s+(.*;)")
PARAM = re.compile(r"c\[0x0\]\[0x[0-9a-f]+\]")
BRANCH_TARGET = re.compile(r"`\(\.L_x_\d+\)")


def kernels(cuobjdump: str, lib: str) -> dict:
    """{mangled kernel name: [normalised instructions]} of every kernel in lib."""
    text = subprocess.run([cuobjdump, "-sass", lib], check=True, capture_output=True, text=True).stdout
    out, name = {}, None
    for line in text.splitlines():
        m = FUNCTION.match(line)
        if m:
            name = m.group(1)
            out[name] = []
            continue
        m = INSTRUCTION.match(line)
        if m and name is not None:
            out[name].append(BRANCH_TARGET.sub("`(L)", PARAM.sub("c[0x0][PARAM]", m.group(1))))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--kernels", default="", help="only kernels whose mangled name matches this regex")
    ap.add_argument("--cuobjdump", default=shutil.which("cuobjdump") or "/usr/local/cuda/bin/cuobjdump")
    args = ap.parse_args()
    pick = re.compile(args.kernels)
    a, b = (kernels(args.cuobjdump, lib) for lib in (args.a, args.b))
    names = sorted(n for n in set(a) | set(b) if pick.search(n))
    differ = 0
    for n in names:
        if n not in a or n not in b:
            print(f"only in {'B' if n not in a else 'A'}: {n}")
            differ += 1
        elif a[n] != b[n]:
            first = next((i for i, (x, y) in enumerate(zip(a[n], b[n])) if x != y), min(len(a[n]), len(b[n])))
            print(f"differs: {n} ({len(a[n])} vs {len(b[n])} instructions, first at {first})")
            differ += 1
    print(f"{len(names) - differ} of {len(names)} kernels identical")
    return 0 if names and not differ else 1


if __name__ == "__main__":
    sys.exit(main())
