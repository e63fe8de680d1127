"""The kernel cost model's arithmetic on a hand-computed case, and its inputs: kernel_sass's
committed SASS, so a change in the instructions changes the prediction."""

import dataclasses

import pytest

from benchmarks.kernels import kernel_cost
from benchmarks.gpu.gpu_measure import Peaks
from benchmarks.kernels.kernel_cases import DecodeCase, MmaMoeCase, MoeCase
from benchmarks.kernels.kernel_sass import RESULTS_MD, SECTION_TITLE
from benchmarks.kernels.sass_reading import count_classes

# 132 SMs at 1 GHz with 4096 bf16 FLOP a cycle each, and 1 TB/s of HBM.
DEVICE = kernel_cost.Device("round", Peaks(bf16_flops=132 * 4096 * 1e9, hbm_bytes_per_second=1e12), clock_hz=1e9)
LOOP = ("IADD3 R1, R2, R3, RZ", "LDS.64 R4, [R5]", "@P0 HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], R24")


def test_decode_attention_at_4k_by_hand():
    # One sequence at a 4K full cache: one CTA per SM fits (161 KB of SMEM), so 132 / 8 KV heads
    # -> 17 splits asked, 16 given two 128-slot tiles each: 128 CTAs of 2 iterations over 132
    # SMs, so the busiest SM runs 2 iterations of 4 warps.
    case = DecodeCase(batch=1, context=4096, window=None)
    figures = kernel_cost.KernelFigures(case.name, (1, 8, 16), 128, 150, 164905, 1, LOOP)
    p = kernel_cost.predict(case, figures, DEVICE)
    assert (p.launched, p.working, p.waves) == (128, 128, 1)
    kv = 2 * 4096 * 8 * 64 * 2 + 4096 * 4  # K and V in bf16, int32 slot positions
    partials = 8 * 16 * 8 * (64 + 2) * 4  # float32 [8 real rows, head_dim + max + sum] per CTA
    q = 64 * 64 * 2
    assert p.hbm_bytes == kv + partials + q
    assert p.seconds == pytest.approx({
        "HBM": (kv + partials + q) / 1e12,
        "issue": 2 * 4 * 3 / 4 / 1e9,  # 3 warp instructions, 4 a cycle
        "LSU": 2 * 4 * 2 / 1e9,  # LDS.64: 256 B a warp, 2 wavefronts
        "tensor": 2 * 1 * (2 * 64 * 64 * 16) / 4096 / 1e9,  # one warpgroup's HGMMA
    })
    assert p.bound == "HBM"
    assert p.hbm_fraction == pytest.approx((kv + q) / (kv + partials + q))


def test_wavefronts_by_width():
    assert [kernel_cost.wavefronts(i) for i in ("LDS.U16 R1, [R2]", "LDS R1, [R2]", "LDS.128 R4, [R2]",
                                                  "LDSM.16.M88.4 R4, [R2]", "LD.E.U8 R1, desc[UR4][R2.64]",
                                                  "IADD3 R1, R2, R3, RZ")] == [1, 1, 4, 4, 8, 0]
    # cp.async: 32 lanes of 8 or 16 bytes.
    assert [kernel_cost.wavefronts(i) for i in ("LDGSTS.E.BYPASS.LTC128B.128 [R1], desc[UR4][R2.64]",
                                                  "LDGSTS.E.LTC128B.64 [R1], desc[UR4][R2.64]")] == [4, 2]


def test_mma_sync_flops_count_per_warp():
    assert kernel_cost.hmma_flops("HMMA.16816.F32.BF16 R4, R8, R12, R4") == 2 * 16 * 8 * 16
    assert kernel_cost.hmma_flops("@P0 HMMA.16816.F32.BF16 R4, R8, R12, R4") == 4096
    assert kernel_cost.hmma_flops("HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], R24") == 0
    case = MmaMoeCase("20b", "mlp2", 1, 32, 2880, 2880, arch="8.9")
    figures = kernel_cost.KernelFigures(case.name, (45, 5, 1), 128, 110, 24577, 3,
                                        ("HMMA.16816.F32.BF16 R4, R8, R12, R4",))
    p = kernel_cost.predict(case, figures, DEVICE)
    # 180 working CTAs (4 experts x 45 tiles) of 15 steps on 132 SMs: the busiest runs 2; 4 warps each.
    assert p.seconds["tensor"] == pytest.approx(2 * 15 * 4 * 4096 / 4096 / 1e9)


def test_the_mma_kernels_predictions_use_each_devices_own_target():
    figures = kernel_cost.committed_figures()
    predicted = kernel_cost.mma_predictions(figures)
    assert {(p.device, p.case.split()[1]) for p in predicted} == {
        ("RTX 4090", "sm_89"), ("L4", "sm_89"), ("A100 40 GB", "sm_80"), ("A100 80 GB", "sm_80"),
        ("RTX 5090", "sm_120")}
    # The per-task output tiles are counted, not credited: 4 tasks of 16 rows for 4 rows at 1 token.
    one = next(p for p in predicted if p.case == "moe-mma sm_89 20b mlp2 tokens=1")
    assert one.overhead_bytes == (4 * 16 - 4) * 2880 * 4
    assert "| RTX 4090 | 1 |" in kernel_cost.layer_table(predicted)


def _loop_table_totals() -> dict[str, int]:
    text = RESULTS_MD.read_text()
    section = text[text.index(SECTION_TITLE):]
    totals = {}
    for line in section[section.index("| case | int |"):].splitlines()[2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        totals[cells[0]] = int(cells[-1])
    return totals


def test_inputs_are_kernel_sass_committed_figures():
    figures = kernel_cost.committed_figures()
    assert {case.name for case in kernel_cost.cases()} <= figures.keys()
    totals = _loop_table_totals()
    for name in ("moe 20b mlp1 tokens=1", "decode full ctx=32K batch=1", "flash T=4096 full"):
        assert sum(count_classes(list(figures[name].loop)).values()) == totals[name]

    case = MoeCase("20b", "mlp1", 1, 32, 5760, 2880)
    one = figures[case.name]
    assert (one.grid, one.threads, one.ctas_per_sm) == ((45, 7, 1), 128, 3)
    before = kernel_cost.predict(case, one, kernel_cost.DEVICES[0])
    after = kernel_cost.predict(case, dataclasses.replace(one, loop=one.loop + LOOP[:1]), kernel_cost.DEVICES[0])
    # 180 working CTAs (4 experts x 45 column tiles) of 15 steps: the busiest SM runs 2 CTAs.
    assert after.seconds["issue"] - before.seconds["issue"] == pytest.approx(2 * 15 * 4 / 4 / 1.83e9)
    assert before.bound == "issue"
