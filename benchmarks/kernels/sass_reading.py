"""Reading what Mosaic GPU's compile prints: ptxas' ``-v`` report, the host code's kernel launch,
and nvdisasm's SASS, down to the instructions of the kernel's main loop counted by class.

*The main loop* is the kernel's pipeline loop: of the outermost loops of the SASS (back edges,
branches to a block that dominates them, not inside another such loop) those that issue HGMMA (or
``mma.sync``'s HMMA), and of several (the MoE kernel's two pipelines, with its scales folded and not) the shortest,
which a call whose scales fold (all of gpt-oss's) runs; the widest loop of a kernel without
HGMMA. Its instructions are those between the loop's head and its back edge, each counted once
(one warp, one iteration); code placed out of line, such as the retries of a barrier wait, is
not counted.
"""

from __future__ import annotations

import collections
import dataclasses
import re
from collections.abc import Sequence


class CompileError(RuntimeError):
    """A case that did not lower or compile, or whose output could not be read."""


# Opcodes (the mnemonic before its first '.') by class; "uniform" is the rest of the U* opcodes
# (the scalar datapath), "other" everything else (moves, branches, shuffles, TMA, stores).
INSTRUCTION_CLASSES: dict[str, frozenset[str]] = {
    "int": frozenset({"IMAD", "IADD3", "IADD", "IADD32I", "LEA", "SHF", "SHL", "SHR", "ISETP", "IMNMX",
                      "VIMNMX", "VIADD", "VIADDMNMX", "IABS", "IMUL", "IDP", "FLO", "POPC", "BMSK",
                      "BREV", "I2I", "SGXT"}),
    "perm/logic": frozenset({"PRMT", "LOP3", "LOP", "LOP32I", "SEL", "PLOP3"}),
    "half2": frozenset({"HMUL2", "HFMA2", "HADD2", "HMNMX2", "HSETP2", "HSET2"}),
    "fp32": frozenset({"FFMA", "FMUL", "FADD", "FMNMX", "FSEL", "FSETP", "FSET", "MUFU", "FCHK",
                       "FSWZADD", "FRND"}),
    "convert": frozenset({"F2F", "F2FP", "I2F", "F2I", "I2FP", "F2IP"}),
    "ld.global": frozenset({"LDG", "LD", "LDGSTS"}),  # LDGSTS: cp.async, global to shared
    "ld.shared": frozenset({"LDS", "LDSM"}),
    "hgmma": frozenset({"HGMMA"}),
    "hmma": frozenset({"HMMA"}),  # mma.sync
    "barrier": frozenset({"BAR", "SYNCS", "WARPGROUP", "MEMBAR", "FENCE", "DEPBAR", "ERRBAR", "WARPSYNC"}),
}
UNIFORM, OTHER = "uniform", "other"
CLASS_NAMES = (*INSTRUCTION_CLASSES, UNIFORM, OTHER)
_CLASS_OF = {opcode: name for name, opcodes in INSTRUCTION_CLASSES.items() for opcode in opcodes}


@dataclasses.dataclass(frozen=True)
class Launch:
    grid: tuple[int, int, int]
    threads: int
    dynamic_smem: int


@dataclasses.dataclass(frozen=True)
class PtxasReport:
    registers: int
    spill_stores: int
    spill_loads: int
    stack_frame: int
    barriers: int
    static_smem: int
    warnings: tuple[str, ...]  # ptxas warnings and performance advisories, verbatim


def parse_ptxas(log: str) -> PtxasReport:
    """ptxas' ``-v`` report for one entry function."""

    def number(pattern: str) -> int:
        match = re.search(pattern, log)
        if match is None:
            raise CompileError(f"no {pattern!r} in ptxas' report:\n{log}")
        return int(match.group(1))

    warnings = tuple(line.strip() for line in log.splitlines()
                     if re.match(r"ptxas (warning|error)", line) or "Performance Loss" in line)
    return PtxasReport(
        registers=number(r"Used (\d+) registers"),
        spill_stores=number(r"(\d+) bytes spill stores"),
        spill_loads=number(r"(\d+) bytes spill loads"),
        stack_frame=number(r"(\d+) bytes stack frame"),
        barriers=int(m.group(1)) if (m := re.search(r"used (\d+) barriers", log)) else 0,
        static_smem=int(m.group(1)) if (m := re.search(r"(\d+) bytes smem", log)) else 0,
        warnings=warnings,
    )


def parse_launch(host_llvm: str) -> Launch:
    """The grid, threads and dynamic shared memory of the host code's ``mosaic_gpu_launch_kernel``."""
    numbers = r",\s*i32 (\d+)" * 10
    match = re.search(r"call i32 @mosaic_gpu_launch_kernel\(ptr %\w+" + numbers, host_llvm)
    if match is None:
        raise CompileError("no mosaic_gpu_launch_kernel call with constant sizes in the host code")
    grid_x, grid_y, grid_z, _, _, _, block_x, block_y, block_z, smem = map(int, match.groups())
    return Launch((grid_x, grid_y, grid_z), block_x * block_y * block_z, smem)


_SASS_LINE = re.compile(r"^\s*(?:\.(L_x_\d+):|/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;)")
_TARGET = re.compile(r"`\(\.(L_x_\d+)\)")


def sass_instructions(sass: str) -> tuple[list[tuple[int, str]], dict[str, int]]:
    """``[(address, instruction)]`` and ``{label: address}`` of nvdisasm's listing."""
    instructions, labels, pending = [], {}, []
    for line in sass.splitlines():
        match = _SASS_LINE.match(line)
        if match is None:
            continue
        label, address, text = match.groups()
        if label:
            pending.append(label)
            continue
        address = int(address, 16)
        for name in pending:
            labels[name] = address
        pending = []
        instructions.append((address, text))
    return instructions, labels


def mnemonic(instruction: str) -> str:
    """The mnemonic with its modifiers, without predicate and operands: ``@!P2 HGMMA.64x64x16.F32
    R24, gdesc[UR4], R24`` -> ``HGMMA.64x64x16.F32``, all that classes and costs read of it."""
    words = instruction.split()
    if words and words[0].startswith("@"):
        words = words[1:]
    return words[0] if words else ""


def opcode(instruction: str) -> str:
    """The mnemonic without predicate and modifiers: ``@!P2 HGMMA.64x64x16.F32 ...`` -> ``HGMMA``."""
    return mnemonic(instruction).split(".")[0]


def main_loop_mnemonics(sass: str) -> dict[str, int]:
    """How many of each :func:`mnemonic` the main loop holds, by mnemonic, sorted."""
    return dict(sorted(collections.Counter(mnemonic(text) for text in main_loop(sass)).items()))


def instruction_class(op: str) -> str:
    if op in _CLASS_OF:
        return _CLASS_OF[op]
    return UNIFORM if op.startswith("U") else OTHER


def main_loop(sass: str) -> list[str]:
    """The instructions of the main loop (the module docstring says which): head to back edge, in
    address order."""
    instructions, labels = sass_instructions(sass)
    if not instructions:
        raise CompileError("no SASS instructions")
    loops = _outermost_loops(instructions, labels)
    if not loops:
        raise CompileError("the SASS has no loop")
    bodies = [[text for _, text in instructions[first : last + 1]] for first, last in loops]
    pipelines = [body for body in bodies if any(opcode(text) in ("HGMMA", "HMMA") for text in body)]
    if pipelines:
        return min(pipelines, key=len)
    return max(bodies, key=len)


def _outermost_loops(instructions: list[tuple[int, str]], labels: dict[str, int]) -> list[tuple[int, int]]:
    """(first, last) instruction index of every loop not inside another: a back edge is a branch
    to a block that dominates it (so a wait's out-of-line retry code jumping back into a loop is
    not one)."""
    index = {address: i for i, (address, _) in enumerate(instructions)}
    starts = {0} | {index[a] for a in labels.values() if a in index}
    for i, (_, text) in enumerate(instructions):
        if opcode(text) in ("BRA", "EXIT", "RET", "BRX") and i + 1 < len(instructions):
            starts.add(i + 1)
    starts = sorted(starts)
    block_of = {}
    for b, start in enumerate(starts):
        end = starts[b + 1] if b + 1 < len(starts) else len(instructions)
        for i in range(start, end):
            block_of[i] = b
    successors: list[set[int]] = []
    for b, start in enumerate(starts):
        last = (starts[b + 1] if b + 1 < len(starts) else len(instructions)) - 1
        text = instructions[last][1]
        op, predicated = opcode(text), text.startswith("@")
        following = {b + 1} if b + 1 < len(starts) else set()
        if op == "BRA":
            target = _TARGET.search(text)
            jump = {block_of[index[labels[target.group(1)]]]} if target else set()
            successors.append(jump | (following if predicated else set()))
        elif op in ("EXIT", "RET", "BRX"):
            successors.append(following if predicated else set())
        else:
            successors.append(following)
    dominators = _dominators(successors)
    spans = {(starts[head], (starts[b + 1] if b + 1 < len(starts) else len(instructions)) - 1)
             for b, targets in enumerate(successors) for head in targets if head <= b and head in dominators[b]}
    return sorted(span for span in spans
                  if not any(other != span and other[0] <= span[0] and span[1] <= other[1] for other in spans))


def _dominators(successors: list[set[int]]) -> list[set[int]]:
    """Each block's dominators (block 0 is the entry); unreachable blocks get every block."""
    every = set(range(len(successors)))
    predecessors = [set() for _ in successors]
    for b, targets in enumerate(successors):
        for t in targets:
            predecessors[t].add(b)
    dominators = [{0}] + [set(every) for _ in successors[1:]]
    changed = True
    while changed:
        changed = False
        for b in range(1, len(successors)):
            incoming = [dominators[p] for p in predecessors[b]]
            new = ({b} | set.intersection(*incoming)) if incoming else set(every)
            if new != dominators[b]:
                dominators[b], changed = new, True
    return dominators


def count_classes(instructions: Sequence[str]) -> dict[str, int]:
    counts = collections.Counter(instruction_class(opcode(text)) for text in instructions)
    return {name: counts.get(name, 0) for name in CLASS_NAMES}


def split_dump(output: str) -> tuple[str, str, str]:
    """ptxas' report, the SASS and the host LLVM IR out of one compile's printed dumps (in that order)."""
    sass_start, host_start = output.find("\t.target"), output.find("; ModuleID")
    if not 0 <= sass_start < host_start:
        raise CompileError(f"the compile printed no SASS and host code:\n{output[-3000:]}")
    return output[:sass_start], output[sass_start:host_start].strip() + "\n", output[host_start:]
