#!/usr/bin/env python3
"""Kernel variants for one device call: recompiles one CUDA source of the library with extra macros (the switches
and ablations of src/backends/cuda/hopper/kernel_traits.cuh and bwd/bwd_params.cuh) and relinks the library beside
the others, all variants in parallel, so a sweep costs one compile of that file instead of a build each.

    python3 scripts/kernel_variants.py [--source hopper/forward.cu ...] BUILD OUTDIR name=-DMACRO=1,-DOTHER=2 ...

--source: a file to recompile (a suffix of its path; repeatable, e.g. a kernel and its host planning for a switch
both read; default the backward's hopper/bwd/backward.cu and backward_d*.cu). BUILD is a
configured and built CMake build (CMAKE_EXPORT_COMPILE_COMMANDS=ON); each variant lands in OUTDIR/name/libtilewise.so.
Prints one line per variant (compile seconds and its spills, or the error's tail)."""
import json
import os
import re
import shlex
import subprocess
import sys
import time


def main() -> None:
    args = sys.argv[1:]
    sources = []
    while args[:1] == ["--source"]:
        sources, args = sources + [args[1]], args[2:]
    build, outdir, specs = os.path.abspath(args[0]), os.path.abspath(args[1]), args[2:]
    commands = json.load(open(os.path.join(build, "compile_commands.json")))
    # the library's own compile of each source (CMakeLists.txt also compiles some sources for its measurement builds);
    # by default the backward's translation units, backward.cu and backward_d*.cu (the switches are read by all)
    library = [c for c in commands if "tilewise_lib.dir" in c["command"]]
    if sources:
        entries = [next(c for c in library if c["file"].endswith(source)) for source in sources]
    else:
        entries = [c for c in library if re.search(r"hopper/bwd/backward(_d\d+)?\.cu$", c["file"])]
    link = open(os.path.join(build, "CMakeFiles", "tilewise_lib.dir", "link.txt")).read().split()
    jobs = {}
    for spec in specs:
        name, _, flags = spec.partition("=")
        os.makedirs(os.path.join(outdir, name), exist_ok=True)
        procs, objs = [], {}
        for entry in entries:
            compile_args = shlex.split(entry["command"])
            vobj = os.path.join(outdir, name, os.path.basename(entry["file"]) + ".o")
            objs[compile_args[compile_args.index("-o") + 1]] = vobj
            compile_args[compile_args.index("-o") + 1] = vobj
            compile_args[1:1] = [f for f in flags.split(",") if f]
            procs.append(subprocess.Popen(compile_args, cwd=entry["directory"], stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True))
        jobs[name] = (procs, objs, time.time())
    for name, (procs, objs, t0) in jobs.items():
        outs = [proc.communicate()[0] for proc in procs]
        out = "".join(outs)
        if any(proc.returncode for proc in procs):
            print(f"{name}: compile failed\n{out[-2000:]}")
            continue
        args = [objs.get(a, a) for a in link]
        args[args.index("-o") + 1] = os.path.join(outdir, name, "libtilewise.so")
        res = subprocess.run(args, cwd=build, capture_output=True, text=True)
        status = f"built in {time.time() - t0:.0f} s" if res.returncode == 0 else "link failed\n" + res.stderr[-1500:]
        spills = sorted({l.split(":")[-1].strip() for l in out.splitlines() if "spill stores" in l})
        # ptxas serialises every wgmma of a kernel whose fragments do not fit (C7510-C7520): a silent 2x slowdown
        serial = sorted({l.strip()[-160:] for l in out.splitlines() if "are serialized" in l})
        print(f"{name}: {status}; spills: {'; '.join(spills[-2:])}" + "".join(f"\n  WARNING: {l}" for l in serial))


if __name__ == "__main__":
    main()
