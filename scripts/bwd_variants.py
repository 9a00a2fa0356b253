#!/usr/bin/env python3
"""Backward kernel variants for one device call: recompiles only backward.cu with extra macros (schedules,
ablations: src/backends/cuda/hopper/bwd/bwd_params.cuh) and relinks the library beside the others, in parallel.

    python3 scripts/bwd_variants.py BUILD OUTDIR name=-DMACRO=1,-DOTHER=2 ...

BUILD is a configured and built CMake build (CMAKE_EXPORT_COMPILE_COMMANDS=ON); each variant lands in
OUTDIR/name/libtilewise.so. Prints one line per variant (compile seconds or the error's tail)."""
import json
import os
import shlex
import subprocess
import sys
import time


def main() -> None:
    build, outdir, specs = os.path.abspath(sys.argv[1]), os.path.abspath(sys.argv[2]), sys.argv[3:]
    commands = json.load(open(os.path.join(build, "compile_commands.json")))
    entry = next(c for c in commands if c["file"].endswith("hopper/bwd/backward.cu"))
    compile_args = shlex.split(entry["command"])
    obj = compile_args[compile_args.index("-o") + 1]
    link = open(os.path.join(build, "CMakeFiles", "tilewise_lib.dir", "link.txt")).read().split()
    jobs = {}
    for spec in specs:
        name, _, flags = spec.partition("=")
        os.makedirs(os.path.join(outdir, name), exist_ok=True)
        vobj = os.path.join(outdir, name, "backward.cu.o")
        args = list(compile_args)
        args[args.index("-o") + 1] = vobj
        args[1:1] = [f for f in flags.split(",") if f]
        jobs[name] = (subprocess.Popen(args, cwd=entry["directory"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                       text=True), vobj, time.time())
    for name, (proc, vobj, t0) in jobs.items():
        out, _ = proc.communicate()
        if proc.returncode:
            print(f"{name}: compile failed\n{out[-2000:]}")
            continue
        args = [vobj if a == obj else a for a in link]
        args[args.index("-o") + 1] = os.path.join(outdir, name, "libtilewise.so")
        res = subprocess.run(args, cwd=build, capture_output=True, text=True)
        status = f"built in {time.time() - t0:.0f} s" if res.returncode == 0 else "link failed\n" + res.stderr[-1500:]
        spills = sorted({l.split(":")[-1].strip() for l in out.splitlines() if "spill stores" in l})
        print(f"{name}: {status}; spills: {'; '.join(spills[-2:])}")


if __name__ == "__main__":
    main()
