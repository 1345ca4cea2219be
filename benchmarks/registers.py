"""Registers, spills and shared memory of the kernels for a GPU target, without a GPU.

    python3 benchmarks/registers.py                   # sm_90 (H100/H200), D = 64 and 128, bf16
    python3 benchmarks/registers.py --dims 128 --arch 90 --warps 8 --stages 2

Triton compiles each kernel to PTX for the target on any machine; ptxas (shipped inside the
triton wheel) then reports registers per thread and bytes spilled to local memory. Spills are
the cost to watch in these kernels: every chunk of the loop pays them. On the H200 (RESULTS.md,
2026-11-28) the forward went from 0.572 to 0.388 ms at the main shape when its spills went from
188 to 16 bytes. Numbers come from the local triton's code generator, which may differ from the
GPU machine's version, and with how a launch specialises integer arguments (here: unit strides
of the last dim are constants, pointers and the other integers but N and the segment counts
divisible by 16, as for contiguous bf16 inputs of the benchmarked shapes); use it to compare variants of a kernel
under the same settings, then time the winner on the GPU. Each line ends with a digest of the
kernel's PTX: equal digests in two checkouts mean the same GPU code (used on 2026-12-02 to show
that a kernel switched off compiles as before).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import subprocess
import sys
import tempfile

# compiling for a GPU target needs the real JIT, not the interpreter (which tests switch on)
os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402

from lightning_op.kernels.launch import _dot_types_of  # noqa: E402
from lightning_op.kernels.backward import _key_value_grad_kernel  # noqa: E402
from lightning_op.kernels.chunked import _chunk_output_kernel, _segment_state_kernel  # noqa: E402
from lightning_op.kernels.decay_grad import _decay_moment_kernel  # noqa: E402
from lightning_op.kernels.launch import MOMENT_TILE, MOMENT_WARPS  # noqa: E402

FLOAT_ARGS = ("out_scale", "value_scale", "scale")
#: integer arguments a launch does not mark as divisible by 16
UNALIGNED_ARGS = ("N", "num_segments", "num_slots", "split")


def ptxas() -> str:
    """The newest ptxas inside the triton wheel (it must know the PTX version triton emits)."""
    folder = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    for name in ("ptxas-blackwell", "ptxas"):
        path = os.path.join(folder, name)
        if os.path.exists(path):
            return path
    raise SystemExit(f"no ptxas in {folder}")


def loop_profile(cubin: bytes) -> str:
    """The kernel's first long loop in SASS (``nvdisasm`` from the triton wheel): its instructions per
    iteration and, of those, local-memory loads and stores (spills paid on every chunk). Counted
    per warp; three of three variants with fewer loop instructions and no more spills also ran
    faster on the H200 (benchmarks/NOTES.md, "Kernel forms chosen by their SASS")."""
    nvdisasm = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
    if not os.path.exists(nvdisasm):
        return "loop ? (no nvdisasm)"
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        sass = subprocess.run([nvdisasm, "-c", f.name], capture_output=True, text=True).stdout.splitlines()
    finally:
        os.unlink(f.name)
    labels = {line.strip()[:-1]: i for i, line in enumerate(sass) if re.match(r"^\.L_x_\d+:", line)}
    loops = []  # (first line, last line) of each backward branch's body, outermost ones kept
    for i, line in enumerate(sass):
        target = re.search(r"BRA `\((\.L_x_\d+)\)", line)
        if target and labels.get(target.group(1), i) < i:
            loops.append((labels[target.group(1)], i))
    loops = [a for a in loops if not any(b != a and b[0] <= a[0] and a[1] <= b[1] for b in loops)]
    if not loops:
        return "no loop"

    def profile(loop):
        ops = [m.group(1) for line in sass[loop[0]:loop[1] + 1]
               if (m := re.match(r"\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", line))]
        return len(ops), sum(op.startswith(("LDL", "STL")) for op in ops)

    # the first long loop is the walk every program runs; a kernel with an exact walk (the output
    # kernels, ``stages``: non-finite inputs) runs its second one only after a NaN or inf
    profiles = [profile(loop) for loop in sorted(loops)]
    profiles = [p for p in profiles if p[0] >= 100] or profiles
    text = f"loop {profiles[0][0]} instructions ({profiles[0][1]} local)"
    if len(profiles) > 1:
        text += ", then " + ", ".join(f"{n} ({local} local)" for n, local in profiles[1:])
    return text


def report(kernel, constexprs: dict, pointers: dict, arch: int, warps: int, stages: int) -> str:
    # as a launch on contiguous tensors specialises them: unit strides of the last dim become
    # constants, other integers are 32-bit
    # the options a kernel does not have are dropped; every one it has must be given, or it would
    # compile as a runtime integer
    constexprs = {name: value for name, value in constexprs.items() if name in kernel.arg_names}
    missing = [param.name for param in kernel.params if param.is_constexpr and param.name not in constexprs]
    if missing:
        raise SystemExit(f"registers.py: {kernel.__name__} needs its options {missing}")
    # the pooled steps' arguments (the only keywords defaulting to None) are left out of a dense
    # launch: None, a constant (as integers they would add parameters to the PTX and change its digest)
    for param in kernel.params:
        if param.default is None and param.name not in pointers:
            constexprs.setdefault(param.name, None)
    for name in kernel.arg_names:
        if name.startswith("stride_") and name[-1] in "dv" and name not in ("stride_vb", "stride_vh", "stride_vn"):
            constexprs.setdefault(name, 1)
    # nor an integer the kernel does not specialise
    unaligned = set(UNALIGNED_ARGS) | {name for name in kernel.arg_names if name in (kernel.do_not_specialize or ())}
    signature, attrs = {}, {}
    for index, name in enumerate(kernel.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointers:
            signature[name] = pointers[name]
        else:
            signature[name] = "fp32" if name in FLOAT_ARGS else "i32"
        # A launch marks pointers and integers divisible by 16 (every tensor base, stride and head
        # dim of the benchmarked shapes) as such: without the hint the loads compile to scalar
        # 16-bit loads with no cp.async pipelining, and the counts below describe another kernel.
        # Sequence-dependent sizes carry no hint (N is never specialised).
        if signature[name].startswith("*") or (signature[name] == "i32" and name not in unaligned):
            attrs[(index,)] = [["tt.divisibility", 16]]
    compiled = triton.compile(
        ASTSource(kernel, signature, constexprs=constexprs, attrs=attrs), target=GPUTarget("cuda", arch, 32),
        options={"num_warps": warps, "num_stages": stages},
    )
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(compiled.asm["ptx"])
    try:
        result = subprocess.run([ptxas(), f"-arch=sm_{arch}a", "-v", f.name, "-o", os.devnull],
                                capture_output=True, text=True)
    finally:
        os.unlink(f.name)
    lines = (result.stdout + result.stderr).splitlines()
    regs = next((line.split("Used ")[1].split(" registers")[0] for line in lines if "Used " in line), "?")
    spills = next((line.strip() for line in lines if "spill stores" in line), "?")
    # asynchronous global-to-shared copies: the software pipelining of the loads (none without
    # the alignment hints above)
    async_copies = len(re.findall(r"^\s*cp\.async\.c[ag]", compiled.asm["ptx"], re.MULTILINE))
    return (f"{regs:>3} registers, {spills}, shared memory {compiled.metadata.shared} B, "
            f"{async_copies} cp.async, {loop_profile(compiled.asm['cubin'])}, ptx {ptx_digest(compiled.asm['ptx'])}")


def ptx_digest(ptx: str) -> str:
    """A digest of the PTX's code: debug sections, line records, debug labels and the names of the
    kernel and of its non-inlined functions (mangled names that encode the signature, constexpr
    values included) left out, so two checkouts whose kernels compile to the same instructions
    print the same digest: a refactor shown to be a no-op for the GPU without one."""
    code = ptx.split(".section\t.debug")[0].split(".section .debug")[0]
    # $L__tmp labels only mark source positions for the debug sections (inlined helpers add some)
    kept = [line for line in code.splitlines()
            if not line.lstrip().startswith((".loc", ".file", "//"))
            and not re.fullmatch(r"\$L__tmp\d+:", line.strip())]
    text = "\n".join(kept)
    # each function the PTX defines, numbered by its order of appearance; its parameters and
    # labels carry its name as a prefix (longer names first: one may begin with another)
    names = re.findall(r"^\s*(?:\.visible\s+|\.weak\s+)?(?:\.entry|\.func(?:\s*\([^)]*\))?)\s+([A-Za-z_$][\w$]*)\s*\(",
                       text, re.MULTILINE)
    numbered = {name: f"function{number}" for number, name in enumerate(dict.fromkeys(names))}
    for name in sorted(numbered, key=len, reverse=True):
        text = text.replace(name, numbered[name])
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dims", default="64,128", help="head dims (Dk = Dv), comma-separated")
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 (Hopper)")
    parser.add_argument("--warps", type=int, default=None, help="default: 4 up to D = 64, else 8 (as choose_config)")
    parser.add_argument("--stages", type=int, default=None, help="default: as choose_config")
    parser.add_argument("--block-v", type=int, default=None, help="value columns per program (default: D)")
    parser.add_argument("--chunk", type=int, default=64, help="rows per chunk (default 64)")
    parser.add_argument("--accumulate", type=int, choices=(0, 1), default=None,
                        help="the kernels' ACCUMULATE form (default: as choose_config, on up to D = 64)")
    parser.add_argument("--update-accumulate", type=int, choices=(0, 1), default=None,
                        help="the forward output pass's state update alone accumulating (UPDATE_ACCUMULATE; "
                             "default: as choose_config)")
    parser.add_argument("--transposed", action="store_true",
                        help="the forward output pass in its TRANSPOSED form (config transposed=1)")
    parser.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16", help="the inputs' 16-bit type")
    parser.add_argument("--moment-block-v", type=int, default=None,
                        help="value columns per program of the moment pass (default: as its launcher)")
    parser.add_argument("--moment-warps", type=int, default=None,
                        help="warps of the moment pass (default: as its launcher)")
    parser.add_argument("--moment-split", type=int, choices=(0, 1), default=1,
                        help="the moment pass's weighted operands as two 16-bit terms (SPLIT, default on)")
    args = parser.parse_args()
    bf16, f32 = f"*{args.dtype}", "*fp32"  # bf16: the inputs' type, whichever was asked
    # the launcher's dot types (float16's products with the state in tf32), tf32 off
    dots = dict(_dot_types_of(torch.bfloat16 if args.dtype == "bf16" else torch.float16, False))
    print(f"triton {triton.__version__}, sm_{args.arch}, {args.dtype}, with decay")
    for d in (int(x) for x in args.dims.split(",")):
        warps = args.warps or (4 if d <= 64 else 8)
        accumulate = args.accumulate if args.accumulate is not None else d <= 64  # as choose_config
        # update_accumulate as choose_config: on at D = 65-128 (bf16) unless given
        update = args.update_accumulate if args.update_accumulate is not None else 64 < d <= 128
        common = dict(CHUNK=args.chunk, BLOCK_K=d, BLOCK_V=args.block_v or d, DOT_DTYPE=dots["DOT_DTYPE"], PRECISION=dots["PRECISION"],
                      ACCUMULATE=bool(accumulate), UPDATE_ACCUMULATE=bool(update),
                      KEY_PARTS=d // min(d, 64), PART=min(d, 64),
                      # equal head counts and no packed sequences: group divisors of 1 and no
                      # segment tables (None), which a launch makes constants
                      q_group=1, k_group=1, v_group=1, do_group=1, o_group=1, init_group=1, VARLEN=False,
                      SEGMENTS=None, PIECES=None, POOLED=False, TRANSPOSED=args.transposed)
        state_dots = dict(STATE_DOT_DTYPE=dots["STATE_DOT_DTYPE"], STATE_PRECISION=dots["STATE_PRECISION"])
        cases = [
            ("forward output", _chunk_output_kernel, args.stages or 3,
             dict(common, HAS_DECAY=True, HAS_INIT=False, INIT_SHIFT=1, REVERSE=False, STORE_FINAL=True, **state_dots),
             dict(Q=bf16, K=bf16, V=bf16, O=bf16, DECAY=f32, INIT=bf16, SEG_STATES=f32, FINAL=f32)),
            ("fused dk/dv", _key_value_grad_kernel, args.stages or (2 if d >= 128 else 1),
             dict(common, HAS_DECAY=True, HAS_INIT=False, STORE_FINAL=False, **state_dots),
             dict(Q=bf16, K=bf16, V=bf16, DO=bf16, DK=bf16, DV=bf16, DECAY=f32, INIT=f32, SEG_STATES=f32,
                  FINAL=f32)),
            ("segment state", _segment_state_kernel, args.stages or 3,
             # accumulating at every head dim, as choose_config's state_accumulate
             dict(common, HAS_DECAY=True, REVERSE=False, ACCUMULATE=True),
             dict(K=bf16, V=bf16, DECAY=f32, SEG_STATES=f32)),
        ]
        moment_v = args.moment_block_v or min(64, d, MOMENT_TILE // d)  # as launch.decay_gradient
        moment_warps = args.moment_warps or MOMENT_WARPS
        cases.append(
            ("moment", _decay_moment_kernel, 2,
             dict(common, BLOCK_V=moment_v, HAS_INIT=False, HAS_GRAD_FINAL=False, SEGMENTS=1, STATES_ONLY=False,
                  HAS_STARTS=False, SPLIT=bool(args.moment_split), CU_SEQLENS=None),
             dict(Q=bf16, K=bf16, V=bf16, DO=bf16, DECAY=f32, INIT=f32, GRAD_FINAL=f32, STARTS=f32, PARTIALS=f32)))
        for label, kernel, stages, constexprs, pointers in cases:
            if kernel is _decay_moment_kernel:
                warps = moment_warps
            line = report(kernel, constexprs, pointers, args.arch, warps, stages)
            if args.block_v and kernel is _key_value_grad_kernel:
                continue  # the fused pass always takes the whole value width
            form = "transposed" if constexprs.get("TRANSPOSED") else f"accumulate {int(constexprs['ACCUMULATE'])}"
            if "UPDATE_ACCUMULATE" in kernel.arg_names and not constexprs.get("TRANSPOSED"):
                form += f", update {int(update)}"
            print(f"D={d:<4} {label:<15} {warps} warps, {stages} stages, {form}: {line}", flush=True)


if __name__ == "__main__":
    main()
