#!/usr/bin/env python3
"""Where a warp-specialised kernel's machine code and spills are, by role, without a GPU: the check behind v3.20's
finding that the backward's speed followed the consumers' spills (docs/performance.md backward v3.20: the row records
took the D 128 reduce kernel's consumer spills from 41 instructions to 0 and row 1 3.2% faster; two lines that put 13
back into its block loop cost 3-4%).

    python3 scripts/sass_roles.py OBJ_OR_LIB [--kernels REGEX] [--cuda-bin DIR]

OBJ_OR_LIB: a library or object file built with line information (the CMake builds pass -lineinfo to the CUDA
sources; scripts/kernel_variants.py's libraries have it too). Per kernel whose mangled name matches --kernels
(default: the backward kernels), prints:
- instructions and local-memory instructions (LDL/STL: spills) by role, the role being the outermost source file of
  the instruction's inline chain among bwd_consumer / bwd_producer / the kernel (`nvdisasm -gi` prints the chain);
- each consumer loop (a backward branch over mostly consumer code) with at least 8 HGMMA instructions: its static
  instruction count, HGMMAs and spills (the shortest is the block loop, the next the item loop).
Static counts: a branch not taken on a pattern (the attention tile's frame pass on sliding-tile blocks) still counts.
cuobjdump and nvdisasm come with the CUDA toolkit (also as the pip wheels nvidia-cuda-cuobjdump and
nvidia-cuda-nvdisasm); --cuda-bin or PATH finds them."""
from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile

LOCATION = re.compile(r'"([^"]+)", line (\d+)')
INSTRUCTION = re.compile(r"^\s*/\*[0-9a-f]+\*/\s+(.*?)\s*;")
LABEL = re.compile(r"^(\.L_x_\d+):")
BRANCH = re.compile(r"\bBRA\b.*?`\((\.L_x_\d+)\)")
SPILL = re.compile(r"\b(LDL|STL)\b")
# the role of an instruction: the first of these files in its inline chain, outermost first
ROLES = (("bwd_consumer.cuh", "consumer"), ("bwd_producer.cuh", "producer"), ("mma_softmax_consumer.cuh", "consumer"),
         ("mainloop_producer.cuh", "producer"))


def tool(name: str, cuda_bin: str | None) -> str:
    path = os.path.join(cuda_bin, name) if cuda_bin else shutil.which(name)
    if not path or not os.path.exists(path):
        sys.exit(f"sass_roles.py: {name} not found (--cuda-bin DIR, or PATH; pip wheel nvidia-cuda-{name})")
    return path


def functions(obj: str, cuda_bin: str | None) -> dict:
    """{kernel name: listing lines} from `nvdisasm -gi` of every sm_90a cubin in obj."""
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([tool("cuobjdump", cuda_bin), "-xelf", "all", os.path.abspath(obj)], cwd=tmp, check=True,
                       capture_output=True)
        for cubin in sorted(f for f in os.listdir(tmp) if f.endswith(".cubin")):
            text = subprocess.run([tool("nvdisasm", cuda_bin), "-gi", os.path.join(tmp, cubin)], check=True,
                                  capture_output=True, text=True).stdout.splitlines()
            name = None
            for line in text:
                m = re.match(r"^\.text\.(\S+):", line)
                if m:
                    name = m.group(1)
                    out[name] = []
                elif line.strip().startswith(".section"):
                    name = None
                elif name:
                    out[name].append(line)
    return out


def instructions(listing: list) -> tuple[list, dict]:
    """([(instruction, role)], {label: index of the next instruction}). A run of location comments applies to every
    instruction up to the next run."""
    rows, labels, chain, fresh = [], {}, [], False
    for line in listing:
        s = line.strip()
        if s.startswith("//## File"):
            if not fresh:
                chain, fresh = [], True
            chain += LOCATION.findall(s)
            continue
        m = LABEL.match(s)
        if m:
            labels[m.group(1)] = len(rows)
            continue
        m = INSTRUCTION.match(line)
        if m:
            files = [os.path.basename(f) for f, _ in reversed(chain)]  # outermost first
            role = next((r for f in files for suffix, r in ROLES if f == suffix), "kernel")
            rows.append((m.group(1), role))
            fresh = False
    return rows, labels


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("obj")
    ap.add_argument("--kernels", default="backward_kernel", help="regex on the mangled kernel names")
    ap.add_argument("--cuda-bin", default=None, help="directory of cuobjdump and nvdisasm")
    args = ap.parse_args()
    listings = {k: v for k, v in functions(args.obj, args.cuda_bin).items() if re.search(args.kernels, k)}
    if not listings:
        print(f"sass_roles.py: no kernel matches {args.kernels!r} in {args.obj}", file=sys.stderr)
        return 1
    for name, listing in sorted(listings.items()):
        rows, labels = instructions(listing)
        total, spills = collections.Counter(), collections.Counter()
        for ins, role in rows:
            total[role] += 1
            spills[role] += bool(SPILL.search(ins))
        print(name)
        print("  " + ", ".join(f"{r}: {total[r]} instructions, {spills[r]} LDL/STL" for r in sorted(total)))
        for i, (ins, _) in enumerate(rows):
            m = BRANCH.search(ins)
            if m and labels.get(m.group(1), i + 1) <= i:
                body = rows[labels[m.group(1)]:i + 1]
                hgmma = sum("HGMMA" in x for x, _ in body)
                # (a branch back over other roles' code too is not a loop of one role: mostly the consumers')
                if hgmma >= 8 and 2 * sum(r == "consumer" for _, r in body) > len(body):
                    print(f"  loop of {len(body)} instructions: {hgmma} HGMMA, "
                          f"{sum(bool(SPILL.search(x)) for x, _ in body)} LDL/STL")
    return 0


if __name__ == "__main__":
    sys.exit(main())
