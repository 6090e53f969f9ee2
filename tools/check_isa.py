"""Check that AVX2/AVX-512 instructions occur only in the dispatched kernels.

Disassembles a built fastattn extension (objdump) and lists every function
that uses VEX/EVEX-encoded instructions (mnemonics starting with 'v', or
ymm/zmm/k registers).  Those must be the instruction-set specific kernels:
functions whose names carry their path (_avx2, _avx512) or a helper of
theirs (..._ps256, _pd256, _ps512, _pd512).  Anything else would run on
every CPU and crash on one without AVX.

    python tools/check_isa.py [path/to/_core*.so]
"""
import glob
import os
import re
import subprocess
import sys

ALLOWED = re.compile(r"(_avx2|_avx512|_ps256|_pd256|_ps512|_pd512)")
VEX = re.compile(r"^\s*[0-9a-f]+:\s+(?:[0-9a-f]{2} )+\s*(v[a-z0-9]+)\b|%[yz]mm\d+|%k[1-7]\b")


def extension_path():
    if len(sys.argv) > 1:
        return sys.argv[1]
    import fastattn._core as core

    return core.__file__


def vector_functions(path):
    """Map function name -> set of VEX/EVEX mnemonics it uses."""
    asm = subprocess.run(["objdump", "-d", "--no-show-raw-insn", path], capture_output=True, text=True,
                         check=True).stdout
    found, current = {}, None
    for line in asm.splitlines():
        head = re.match(r"^[0-9a-f]+ <(.+)>:$", line)
        if head:
            current = head.group(1)
            continue
        if current is None:
            continue
        ins = re.match(r"^\s*[0-9a-f]+:\s+(\S+)", line)
        if not ins:
            continue
        mnemonic = ins.group(1)
        if mnemonic.startswith("v") or re.search(r"%[yz]mm\d+|%k[1-7]\b", line):
            found.setdefault(current, set()).add(mnemonic)
    return found


def main():
    path = extension_path()
    uses = vector_functions(path)
    offenders = {f: m for f, m in uses.items() if not ALLOWED.search(f)}
    kernels = [f for f in uses if ALLOWED.search(f)]
    print(f"{os.path.basename(path)}: {len(kernels)} functions use AVX instructions, all in dispatched kernels"
          if not offenders else f"{os.path.basename(path)}: AVX instructions outside the dispatched kernels:")
    for f, m in sorted(offenders.items()):
        print(f"  {f}: {', '.join(sorted(m)[:8])}")
    if not kernels:
        print("  (no AVX kernels found: a build for another architecture?)")
    return 1 if offenders else 0


if __name__ == "__main__":
    sys.exit(main())
