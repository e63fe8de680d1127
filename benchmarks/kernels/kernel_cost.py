"""A cost model of every Pallas kernel, on the CPU: the time each is bound to by HBM bytes, by
instruction issue, by load/store units and by tensor cores, at gpt-oss's decode and prefill
shapes on an H100 SXM and an H200, which bound binds, and the fraction of the device's HBM peak
(and bf16 tensor-core peak) that predicts; and the ``mma.sync`` expert kernel at gpt-oss-20b's
decode shapes on the GPUs it serves (RTX 4090, L4, A100, RTX 5090: :data:`MMA_DEVICES`), each
from the SASS of its own compute capability. A model, to be calibrated by a GPU: the kernel
benchmarks (``benchmarks/gpu/moe_kernel.py``, ``benchmarks/gpu/attention_kernel.py``, run by
``gpu_session``) print its prediction beside each measured time.

  python -m benchmarks.kernels.kernel_cost [--compile] [--write]

Inputs. The instruction counts, registers, shared memory, CTAs per SM and launched grid are
:mod:`benchmarks.kernels.kernel_sass`'s, never estimates: by default read from its committed output
(its section of ``benchmarks/RESULTS.md`` and each main loop's instructions counted by mnemonic in
``benchmarks/kernels/main_loops.json``), or with ``--compile`` from a
fresh compile (a few minutes). Which CTAs do work and how many main-loop iterations each runs
come from the kernels' own tiling functions (:class:`pallas_kernels.mxfp4_moe.Tasks`,
:func:`pallas_kernels.decode_attention.decode_tiling`,
:func:`pallas_kernels.flash_attention.kv_block_range`). The devices' peaks are
:data:`benchmarks.gpu.gpu_measure.PEAKS`'.

The model. Working CTAs go to SMs in launch order, each to the least loaded one (the hardware
fills SMs as they free up), so the busiest SM's main-loop iterations set every per-SM bound:

* issue: iterations x warps x the loop's warp instructions / (4 schedulers x 1 a cycle);
* load/store: iterations x warps x the loop's L1 wavefronts (:func:`wavefronts`) / 1 a cycle;
* tensor: iterations x warpgroups x the loop's HGMMA FLOPs / the SM's dense bf16 FLOPs a cycle;
* HBM: the call's compulsory bytes (each operand once, outputs once) / the device's bandwidth.

The prediction is the largest (the others overlap with it perfectly: an optimistic model). Only
the main loop is counted: prologues, epilogues, launch latency and the latency a single warp per
scheduler cannot hide are not, so a measured time above the prediction says where to look.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import heapq
import json
import math
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from benchmarks.gpu import gpu_targets
from benchmarks.gpu.gpu_measure import PEAKS, Peaks
from benchmarks.kernels.kernel_cases import (
    Case,
    DecodeCase,
    MmaMoeCase,
    MoeCase,
    PrefillCase,
    gpt_oss_cases,
    mma_cases,
    variant_cases,
)
from benchmarks.kernels.kernel_sass import (
    ISSUE_PER_SM,
    MAIN_LOOPS,
    MMA_SECTION_TITLE,
    RESULTS_MD,
    SECTION_TITLE,
    KernelReport,
    replace_section,
)
from benchmarks.kernels.sass_reading import CompileError, main_loop, mnemonic, opcode

COST_SECTION_TITLE = "## Kernel cost model (predicted, not measured)"


@dataclasses.dataclass(frozen=True)
class Device:
    """One GPU's limits as the model uses them (sources in :data:`ASSUMPTIONS`)."""

    name: str
    peaks: Peaks
    sms: int = 132
    clock_hz: float = 1.83e9
    issue_per_sm_cycle: int = ISSUE_PER_SM
    l1_wavefronts_per_sm_cycle: int = 1

    @property
    def tensor_flops_per_sm_cycle(self) -> float:
        return self.peaks.bf16_flops / (self.sms * self.clock_hz)


def _peaks(kind: str) -> Peaks:
    return dict(PEAKS)[kind]


DEVICES = (Device("H100 SXM", _peaks("H100")), Device("H200", _peaks("H200")))

# The GPUs the mma.sync expert kernel serves, each with the compute capability whose SASS models
# it: their datasheet figures (SMs, boost clock, memory bandwidth, dense bf16 tensor FLOP/s with
# float32 accumulation; GeForce cards run it at half their float16-accumulate rate) are the
# deviceless compiles' (benchmarks.gpu.gpu_targets).
MMA_GPUS = ("RTX 4090", "L4", "A100 40 GB", "A100 80 GB", "RTX 5090")


def _mma_device(name: str) -> tuple[Device, str]:
    target = gpu_targets.gpu_target(name)
    major, minor = target.compute_capability
    peaks = Peaks(target.bf16_flops, target.bandwidth_bytes_per_second)
    return Device(target.name, peaks, sms=target.sms, clock_hz=target.boost_clock_hz), f"{major}.{minor}"


MMA_DEVICES: tuple[tuple[Device, str], ...] = tuple(_mma_device(name) for name in MMA_GPUS)
MMA_SOURCES = (
    ("RTX 4090", "NVIDIA Ada Lovelace architecture whitepaper (AD102, GeForce RTX 4090): 128 SMs, 2.52 GHz boost, "
     "1008 GB/s GDDR6X, 165.2 TFLOP/s FP16/BF16 tensor with FP32 accumulate"),
    ("L4", "NVIDIA L4 datasheet: 300 GB/s GDDR6, 121 TFLOP/s BF16 tensor (dense); 58 SMs (7424 CUDA cores), "
     "2.04 GHz boost (Ada whitepaper)"),
    ("A100 40GB / 80GB", "NVIDIA A100 datasheet: 1555 GB/s (40GB) / 2039 GB/s (80GB SXM) HBM2(e), 312 TFLOP/s BF16 "
     "tensor; 108 SMs, 1.41 GHz boost (Ampere GA100 whitepaper)"),
    ("RTX 5090", "NVIDIA RTX Blackwell GPU architecture whitepaper (GB202, GeForce RTX 5090): 170 SMs, 2.41 GHz "
     "boost, 1792 GB/s GDDR7, 209.5 TFLOP/s FP16/BF16 tensor with FP32 accumulate (dense)"),
)

# One warp's one-byte scale load (the MoE loop's LD.E.U8) reads 8 accumulator rows (4 lanes a row
# in WGMMA's layout, 2 of each 16-row slice's halves per instruction), each row on its own
# 128-byte line: the checkpoint's scale rows are 90 bytes (mlp2) or 180 bytes (mlp1's strided
# gate/linear view) apart. A coalesced global load would be 1 wavefront per 128 bytes.
SCALE_LOAD_WAVEFRONTS = 8
L1_WAVEFRONT_BYTES = 128
ROUTING_SEED = 0

ASSUMPTIONS = (
    ("SMs", "132", "132", "NVIDIA H100 datasheet / whitepaper (GH100 in both: H200 is the same chip)"),
    ("SM clock (GHz)", "1.83", "1.83", "the boost clock the datasheet's tensor peak is quoted at: "
     "989.4 TFLOP/s = 132 SMs x 4096 FLOP/cycle x 1.83 GHz"),
    ("HBM (TB/s)", "3.35", "4.8", "datasheets (H100 SXM HBM3, H200 HBM3e): benchmarks/gpu/gpu_measure.PEAKS"),
    ("dense bf16 (TFLOP/s)", "989", "989", "datasheets: benchmarks/gpu/gpu_measure.PEAKS"),
    ("warp instructions / SM / cycle", "4", "4", "4 schedulers (SM sub-partitions), 1 issue each a cycle"),
    ("L1 wavefronts / SM / cycle", "1", "1", "32 LD/ST lanes, 128 B of L1/shared data a cycle per SM"),
    ("shared load (LDS/LDSM)", "ceil(32 lanes x width / 128 B)", "same", "LDS.U16: 1; LDS.64: 2; LDSM.x4: 4"),
    ("global scale load (LD.E.U8)", "8 wavefronts", "same", "8 rows 90-180 B apart a warp (SCALE_LOAD_WAVEFRONTS)"),
    ("routing", "top-4 distinct experts, uniform", "same", f"one seeded draw (seed {ROUTING_SEED})"),
    ("MoE scales", "all in 1..128: every CTA folds them", "same", "gpt-oss's weights are below 12 "
     "(mxfp4_moe.Config.fold_scales; benchmarks.kernels.sass_reading.main_loop counts the folded pipeline)"),
    ("attention context", "every cache slot visible", "same", "a full cache; sliding layers their window"),
)


@dataclasses.dataclass(frozen=True)
class KernelFigures:
    """What :mod:`benchmarks.kernels.kernel_sass` says about one compiled case."""

    name: str
    grid: tuple[int, int, int]
    threads: int
    registers: int
    smem: int
    ctas_per_sm: int
    loop: tuple[str, ...]  # the main loop's SASS instructions (or their mnemonics), one warp, one iteration

    @property
    def warps(self) -> int:
        return math.ceil(self.threads / 32)

    @classmethod
    def of_report(cls, report: KernelReport) -> KernelFigures:
        return cls(report.case.name, report.launch.grid, report.launch.threads, report.registers, report.smem,
                   report.ctas_per_sm, tuple(main_loop(report.sass)))


@functools.cache
def committed_figures(results_md: Path = RESULTS_MD, main_loops: Path = MAIN_LOOPS) -> dict[str, KernelFigures]:
    """Every case of kernel_sass's committed resources tables (the Hopper kernels' and the
    ``mma.sync`` kernel's), by case name, with its main loop's mnemonics (each as many times as the
    loop holds it; their order is not kept, and no cost needs it)."""
    counts = json.loads(main_loops.read_text())
    text = results_md.read_text()
    return {name: figures for title in (SECTION_TITLE, MMA_SECTION_TITLE)
            for name, figures in _section_figures(text, title, results_md, counts).items()}


def _section_figures(text: str, title: str, results_md: Path, counts: dict[str, dict[str, int]]
                     ) -> dict[str, KernelFigures]:
    start = text.find(title + "\n")
    if start < 0:
        raise CompileError(f"no {title!r} section in {results_md}")
    end = text.find("\n## ", start + len(title))
    lines = text[start : end if end >= 0 else len(text)].splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("| case | grid |"))
    columns = [c.strip() for c in lines[header].strip("|").split("|")]
    figures = {}
    for line in lines[header + 2 :]:
        if not line.startswith("|"):
            break
        row = dict(zip(columns, (c.strip() for c in line.strip("|").split("|")), strict=True))
        loop = counts[row["main loop"].strip("`")]
        figures[row["case"]] = KernelFigures(
            row["case"], tuple(int(g) for g in row["grid"].split("x")), int(row["threads"]), int(row["registers"]),
            int(row["SMEM B"]), int(row["CTAs/SM"]), tuple(m for m, n in loop.items() for _ in range(n)))
    return figures


# ---------------------------------------------------------------------------------------------
# The loop's costs per iteration.

def wavefronts(instruction: str) -> int:
    """L1 wavefronts of one warp's load instruction (0 for anything else)."""
    op = opcode(instruction)
    modifiers = mnemonic(instruction).split(".")[1:]
    if op == "LDSM":  # LDSM.16.M88.4: four 8x8 matrices (ldmatrix .x4), 128 B each
        return int(modifiers[-1]) if modifiers and modifiers[-1].isdigit() else 1
    if op == "LDS":
        bits = next((int(m.lstrip("US")) for m in modifiers if re.fullmatch(r"[US]?\d+", m)), 32)
        return math.ceil(32 * bits // 8 / L1_WAVEFRONT_BYTES)
    if op in ("LDG", "LD"):
        return SCALE_LOAD_WAVEFRONTS
    if op == "LDGSTS":  # cp.async: each lane copies 4, 8 or 16 bytes (its last modifier, in bits)
        bits = int(modifiers[-1]) if modifiers and modifiers[-1].isdigit() else 32
        return math.ceil(32 * bits // 8 / L1_WAVEFRONT_BYTES)
    return 0


def hgmma_flops(instruction: str) -> int:
    """FLOPs of one warpgroup's ``HGMMA.MxNxK`` (0 for anything else)."""
    if opcode(instruction) != "HGMMA":
        return 0
    m, n, k = map(int, re.search(r"HGMMA\.(\d+)x(\d+)x(\d+)", instruction).groups())
    return 2 * m * n * k


def hmma_flops(instruction: str) -> int:
    """FLOPs of one warp's ``HMMA.16816`` (``mma.sync.m16n8k16``; 0 for anything else)."""
    if opcode(instruction) != "HMMA":
        return 0
    shape = instruction.split()[1 if instruction.startswith("@") else 0].split(".")[1]  # 16816: m16 n8 k16
    m, n, k = map(int, re.fullmatch(r"(\d\d)(\d)(\d+)", shape).groups())
    return 2 * m * n * k


# ---------------------------------------------------------------------------------------------
# The work: which CTAs run how many iterations, and the bytes and useful FLOPs of the call.

@dataclasses.dataclass(frozen=True)
class Work:
    launched: int
    iterations: tuple[int, ...]  # main-loop iterations of each working CTA, in launch order
    hbm_bytes: int  # every byte the kernel reads or writes once
    flops: int  # useful (unpadded) matmul FLOPs
    overhead_bytes: int = 0  # of hbm_bytes, those a perfect kernel would not move (partials)


def routed_group_sizes(tokens: int, experts: int, top_k: int, seed: int = ROUTING_SEED) -> np.ndarray:
    """Rows per expert when each token picks ``top_k`` distinct experts uniformly."""
    choices = np.argsort(np.random.default_rng(seed).random((tokens, experts)), axis=1)[:, :top_k]
    return np.bincount(choices.ravel(), minlength=experts)


def moe_work(case: MoeCase | MmaMoeCase, figures: KernelFigures) -> Work:
    """The expert matmul's work, either kernel: the ``mma.sync`` kernel writes each working task's
    whole ``[N, block_m]`` tile (its XLA gather of the rows, after the kernel, is not counted)."""
    import jax.numpy as jnp

    from pallas_kernels import mxfp4_moe, mxfp4_moe_mma

    config = case.kernel_config()
    tile_rows = (mxfp4_moe_mma if case.kernel == "moe_mma" else mxfp4_moe).tile_rows
    rows = case.tokens * case.top_k
    block_m = tile_rows(rows, config)
    sizes = routed_group_sizes(case.tokens, case.experts, case.top_k)
    tasks = mxfp4_moe.Tasks(jnp.asarray(sizes, jnp.int32), rows, block_m)
    working_tasks = int((np.asarray(tasks.count) > 0).sum())
    halves = 2 if case.matmul == "mlp1" else 1
    out_n = case.n // halves
    steps = case.k // 2 // config.block_kb
    active = int((sizes > 0).sum())
    weights = active * case.n * (case.k // 2 + case.k // 32 + 2)  # blocks, scales, bias
    out_itemsize = 4 if case.matmul == "mlp2" else 2
    out_bytes = rows * out_n * out_itemsize + (4 * rows if case.matmul == "mlp2" else 0)
    overhead = 0
    if case.kernel == "moe_mma":
        overhead = (working_tasks * block_m - rows) * out_n * out_itemsize
    return Work(math.prod(figures.grid), (steps,) * (working_tasks * out_n // mxfp4_moe.BLOCK_N),
                weights + rows * case.k * 2 + out_bytes + overhead, 2 * rows * case.n * case.k,
                overhead_bytes=overhead)


def decode_work(case: DecodeCase, figures: KernelFigures) -> Work:
    from pallas_kernels.decode_attention import DecodeAttentionConfig, decode_tiling

    # Split for the default device's SMs: DEFAULT_SM_COUNT on the CPU, the modelled devices' 132.
    tiling = decode_tiling(case.config or DecodeAttentionConfig(), case.batch, case.q_len, case.cache_len,
                           case.kv_heads, q_heads=case.q_heads)
    per_split = math.ceil(tiling.num_tiles / tiling.num_splits)
    split_tiles = [max(0, min(per_split, tiling.num_tiles - s * per_split)) for s in range(tiling.num_splits)]
    iterations = [t for _ in range(case.batch * case.kv_heads * tiling.num_q_blocks) for t in split_tiles if t]
    rows_written = case.batch * case.kv_heads * tiling.num_q_blocks * tiling.partial_rows
    kv = 2 * case.batch * case.cache_len * case.kv_heads * case.head_dim * 2 + case.batch * case.cache_len * 4
    q = case.batch * case.q_len * case.q_heads * case.head_dim * 2
    if tiling.merged_in_kernel:  # the output itself, bf16 (as large as q), and its padding rows
        written = rows_written * case.head_dim * 2
        overhead = written - q
    else:  # each split's float32 partials, for the XLA merge
        written = overhead = rows_written * tiling.num_splits * (case.head_dim + 2) * 4
    flops = 4 * case.batch * case.q_len * case.q_heads * case.cache_len * case.head_dim
    return Work(math.prod(figures.grid), tuple(iterations), kv + q + written, flops, overhead_bytes=overhead)


def prefill_work(case: PrefillCase, figures: KernelFigures) -> Work:
    from pallas_kernels.flash_attention import FlashAttentionConfig, kv_block_range

    config = case.config or FlashAttentionConfig()
    kv_blocks = math.ceil(case.seq_len / config.block_kv)
    per_block = []
    for start in range(0, case.seq_len, config.block_q):
        lo, hi = kv_block_range(start, min(start + config.block_q, case.seq_len), kv_blocks, config.block_kv,
                                case.window)
        per_block.append(int(hi) - int(lo))
    # Grid (q, kv_head, batch), q fastest.
    iterations = tuple(n for _ in range(case.batch * case.kv_heads) for n in per_block)
    positions = np.arange(case.seq_len)
    visible = int(np.minimum(positions + 1, case.window or case.seq_len).sum())
    tokens = case.batch * case.seq_len
    io = 2 * tokens * (case.q_heads + case.kv_heads) * case.head_dim * 2
    return Work(math.prod(figures.grid), iterations, io, 4 * case.batch * visible * case.q_heads * case.head_dim)


def work(case: Case, figures: KernelFigures) -> Work:
    return {"moe": moe_work, "moe_mma": moe_work, "decode": decode_work, "flash": prefill_work}[case.kernel](case, figures)


# ---------------------------------------------------------------------------------------------
# The prediction.

def busiest_sm(iterations: Sequence[int], sms: int) -> tuple[int, float]:
    """Iterations of the busiest SM and the mean SM's over the busiest's, each CTA in launch order
    going to the least loaded SM."""
    loads = [0] * sms
    for n in iterations:
        heapq.heapreplace(loads, loads[0] + n)
    busiest = max(loads)
    return busiest, (sum(loads) / sms / busiest if busiest else 1.0)


@dataclasses.dataclass(frozen=True)
class Prediction:
    case: str
    device: str
    launched: int
    working: int
    ctas_per_sm: int
    waves: int
    balance: float  # mean SM's work / the busiest SM's
    hbm_bytes: int
    overhead_bytes: int
    seconds: dict[str, float]  # by bound: "HBM", "issue", "LSU", "tensor"
    flops: int
    peaks: Peaks

    @property
    def bound(self) -> str:
        return max(self.seconds, key=self.seconds.get)

    @property
    def time(self) -> float:
        return self.seconds[self.bound]

    @property
    def hbm_fraction(self) -> float:
        """The necessary bytes (less the overhead) over the predicted time, of the HBM peak."""
        return (self.hbm_bytes - self.overhead_bytes) / self.time / self.peaks.hbm_bytes_per_second

    @property
    def tensor_fraction(self) -> float:
        return self.flops / self.time / self.peaks.bf16_flops


def predict(case: Case, figures: KernelFigures, device: Device) -> Prediction:
    w = work(case, figures)
    busiest, balance = busiest_sm(w.iterations, device.sms)
    loop_wavefronts = sum(wavefronts(i) for i in figures.loop)
    # HGMMA is one warpgroup's instruction, HMMA (mma.sync) one warp's.
    cta_flops = (math.ceil(figures.warps / 4) * sum(hgmma_flops(i) for i in figures.loop)
                 + figures.warps * sum(hmma_flops(i) for i in figures.loop))
    cycles = {
        "issue": busiest * figures.warps * len(figures.loop) / device.issue_per_sm_cycle,
        "LSU": busiest * figures.warps * loop_wavefronts / device.l1_wavefronts_per_sm_cycle,
        "tensor": busiest * cta_flops / device.tensor_flops_per_sm_cycle,
    }
    seconds = {"HBM": w.hbm_bytes / device.peaks.hbm_bytes_per_second}
    seconds |= {bound: c / device.clock_hz for bound, c in cycles.items()}
    working = len(w.iterations)
    waves = math.ceil(working / (device.sms * figures.ctas_per_sm)) if working else 0
    return Prediction(case.name, device.name, w.launched, working, figures.ctas_per_sm, waves, balance,
                      w.hbm_bytes, w.overhead_bytes, seconds, w.flops, device.peaks)


def device_of(device_kind: str) -> Device | None:
    """The model's device for a jax ``device_kind`` (None for one it has no figures of)."""
    kind = next((name for name, _ in PEAKS if name in device_kind), None)
    if kind is None or kind not in ("H100", "H200"):  # PCIe / NVL parts: other SM counts and clocks
        return None
    return DEVICES[("H100", "H200").index(kind)]


def predicted_cell(case: Case, device_kind: str) -> str:
    """``12.3 (issue)``: the predicted microseconds and bound of ``case`` on the device, from
    kernel_sass's committed figures; '' where the model has no figures for either."""
    device, figures = device_of(device_kind), committed_figures().get(case.name)
    if device is None or figures is None:
        return ""
    p = predict(case, figures, device)
    return f"{p.time * 1e6:.1f} ({p.bound})"


# ---------------------------------------------------------------------------------------------
# Tables.

def assumptions_table() -> str:
    rows = ["| quantity | H100 SXM | H200 | source |", "|---|---|---|---|"]
    rows += [f"| {' | '.join(row)} |" for row in ASSUMPTIONS]
    return "\n".join(rows) + "\n"


def prediction_table(predictions: Sequence[tuple[Prediction, Prediction]]) -> str:
    """One row per case: the device-independent per-SM bounds, then each device's HBM figures."""
    rows = ["| case | grid CTAs | working | CTAs/SM | waves | SM balance | MB | issue us | LSU us | tensor us "
            "| HBM us H100 / H200 | bound H100 / H200 | predicted us H100 / H200 | % HBM peak H100 / H200 "
            "| % bf16 peak H100 / H200 |", "|---" * 15 + "|"]
    for h100, h200 in predictions:
        def pair(f):
            return f"{f(h100)} / {f(h200)}"

        rows.append(
            f"| {h100.case} | {h100.launched} | {h100.working} | {h100.ctas_per_sm} | {h100.waves} | "
            f"{100 * h100.balance:.0f}% | {h100.hbm_bytes / 1e6:.2f} | " + " | ".join(
                f"{h100.seconds[b] * 1e6:.1f}" for b in ("issue", "LSU", "tensor"))
            + f" | {pair(lambda p: f'{p.seconds['HBM'] * 1e6:.1f}')} | {pair(lambda p: p.bound)} | "
            f"{pair(lambda p: f'{p.time * 1e6:.1f}')} | {pair(lambda p: f'{100 * p.hbm_fraction:.0f}%')} | "
            f"{pair(lambda p: f'{100 * p.tensor_fraction:.1f}%')} |")
    return "\n".join(rows) + "\n"


def cases() -> list[Case]:
    """The modelled cases: gpt-oss-20b and -120b's MoE at 1, 8, 64 and 4096 tokens, flash
    attention at a 4096-token prompt, decode attention at 4K and 32K contexts, batch 1 and 64;
    then the kernels' other variants at decode shapes (:func:`benchmarks.kernels.kernel_cases.variant_cases`)."""
    defaults = gpt_oss_cases(tokens=(1, 8, 64, 4096), prefill=(4096,), contexts=(4096, 32768), batches=(1, 64))
    return defaults + variant_cases()


def predictions(figures: dict[str, KernelFigures]) -> list[tuple[Prediction, ...]]:
    return [tuple(predict(case, figures[case.name], device) for device in DEVICES) for case in cases()]


def section(predicted: Sequence[tuple[Prediction, ...]], source: str) -> str:
    return (
        f"{COST_SECTION_TITLE}\n\n"
        f"Predicted on the CPU by `python -m benchmarks.kernels.kernel_cost --write` from {source} (the module's "
        "docstring says how). No GPU has measured these: the kernel benchmarks print the prediction "
        "beside each measured time, and the first GPU session calibrates the model. Per-SM bounds (issue, "
        "LSU, tensor) are the busiest SM's main-loop iterations at the same clock on both devices; "
        "*working* counts the CTAs with rows or keys to process; *SM balance* is the mean SM's work over "
        "the busiest's; *MB* the HBM bytes the kernel moves, each once (for decode attention including its "
        "float32 partials, which *% HBM peak* leaves out: it counts only the bytes a perfect kernel moves).\n\nAssumptions:\n\n"
        + assumptions_table() + "\n" + prediction_table(predicted))


MMA_COST_SECTION_TITLE = "## The mma.sync expert kernel on Ampere, Ada and Blackwell GPUs (predicted, not measured)"


def mma_predictions(figures: dict[str, KernelFigures]) -> list[Prediction]:
    """Each of :data:`MMA_DEVICES` with its compute capability's ``mma.sync`` kernel cases."""
    return [predict(case, figures[case.name], device) for device, arch in MMA_DEVICES
            for case in mma_cases(archs=(arch,))]


def mma_table(predicted: Sequence[Prediction]) -> str:
    rows = ["| device | case | working CTAs | CTAs/SM | waves | SM balance | MB | issue us | LSU us | tensor us "
            "| HBM us | bound | predicted us | % HBM peak |", "|---" * 14 + "|"]
    for p in predicted:
        rows.append(
            f"| {p.device} | {p.case} | {p.working} | {p.ctas_per_sm} | {p.waves} | {100 * p.balance:.0f}% | "
            f"{p.hbm_bytes / 1e6:.2f} | " + " | ".join(f"{p.seconds[b] * 1e6:.1f}" for b in ("issue", "LSU", "tensor", "HBM"))
            + f" | {p.bound} | {p.time * 1e6:.1f} | {100 * p.hbm_fraction:.0f}% |")
    return "\n".join(rows) + "\n"


def layer_table(predicted: Sequence[Prediction]) -> str:
    """A layer's two expert matmuls together, per device and token count: their necessary bytes
    over their summed predicted times, of the device's bandwidth (the issue's goal: 70%)."""
    totals: dict[tuple[str, int], list[float]] = {}
    peaks = {}
    for p in predicted:
        tokens = int(re.search(r"tokens=(\d+)", p.case).group(1))
        total = totals.setdefault((p.device, tokens), [0.0, 0.0])
        total[0] += p.hbm_bytes - p.overhead_bytes
        total[1] += p.time
        peaks[p.device] = p.peaks.hbm_bytes_per_second
    rows = ["| device | tokens | MB (mlp1 + mlp2) | predicted us | GB/s | % HBM peak |", "|---" * 6 + "|"]
    for (device, tokens), (necessary, seconds) in totals.items():
        rows.append(f"| {device} | {tokens} | {necessary / 1e6:.2f} | {seconds * 1e6:.1f} | {necessary / seconds / 1e9:.0f} "
                    f"| {100 * necessary / seconds / peaks[device]:.0f}% |")
    return "\n".join(rows) + "\n"


def mma_section(predicted: Sequence[Prediction], source: str) -> str:
    from benchmarks.gpu.e2e import git_commit

    sources = "\n".join(f"- {name}: {text}." for name, text in MMA_SOURCES)
    return (
        f"{MMA_COST_SECTION_TITLE}\n\n"
        f"Predicted on a 2-core CPU machine (no GPU) by `python -m benchmarks.kernels.kernel_cost --write` at commit "
        f"{git_commit()} from {source}, the same model as "
        "the Hopper kernels' (above): the `mma.sync` expert kernel (`pallas_kernels/mxfp4_moe_mma.py`) at "
        "gpt-oss-20b's decode shapes, each GPU with the SASS of its compute capability (sm_89 for the RTX 4090 "
        "and the L4, sm_80 for the A100s, sm_120 for the RTX 5090). No such GPU has run it. *MB* counts the "
        "kernel's per-task output tiles too (a few hundred KB; *% HBM peak* leaves them out), not the XLA "
        "gather of the rows after it. The model leaves out latency: with 2 CTAs (8 warps) an SM it assumes "
        "the `cp.async` pipeline keeps enough bytes in flight (2 stages of 18 KB a CTA, where an RTX 4090 "
        "needs about 5 KB an SM by Little's law at 600 ns).\n\nDevices (datasheets):\n\n" + sources
        + "\n\nA layer's two expert matmuls together:\n\n" + layer_table(predicted)
        + "\nEach matmul:\n\n" + mma_table(predicted))


def main(argv: Sequence[str] | None = None) -> list[tuple[Prediction, ...]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--compile", action="store_true",
                        help="compile the kernels to SASS now (benchmarks.kernels.kernel_sass) instead of reading "
                             "its committed output")
    parser.add_argument("--write", action="store_true", help="replace this model's section of RESULTS.md")
    args = parser.parse_args(argv)
    if args.compile:
        from benchmarks.kernels.kernel_sass import compile_kernels

        figures = {r.case.name: KernelFigures.of_report(r) for r in compile_kernels(cases() + mma_cases())}
        source = "a fresh compile of the kernels (`--compile`)"
    else:
        figures = committed_figures()
        source = "the committed output of `benchmarks.kernels.kernel_sass` (its section above and `benchmarks/kernels/main_loops.json`)"
    predicted = predictions(figures)
    mma_predicted = mma_predictions(figures)
    print(assumptions_table())
    print(prediction_table(predicted))
    print(layer_table(mma_predicted))
    print(mma_table(mma_predicted))
    if args.write:
        text = replace_section(RESULTS_MD.read_text(), section(predicted, source), COST_SECTION_TITLE,
                               before="## On a GPU session")
        RESULTS_MD.write_text(replace_section(text, mma_section(mma_predicted, source), MMA_COST_SECTION_TITLE,
                                              before=None))
    return predicted


if __name__ == "__main__":
    main()
