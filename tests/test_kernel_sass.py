"""benchmarks/kernels/kernel_sass.py (and sass_reading.py): its reading of ptxas' report, the launch and the SASS, its occupancy and
budget arithmetic, and its stand-in CUDA driver. The compile itself (every kernel through ptxas,
74 kernels in 2-3 minutes with ~500 MB of tools) runs in .ci/run as ``python -m benchmarks.kernels.kernel_sass
--check``, not here."""

import ctypes
import dataclasses
import json
import shutil
import types

import pytest

from benchmarks.kernels import kernel_cases, sass_tools
from benchmarks.kernels import kernel_sass as ks
from benchmarks.kernels import sass_reading as sr
from gptoss_jax.config import preset

PTXAS_LOG = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'kernel_mosaic_gpu_kernel' for 'sm_90a'
ptxas info    : Function properties for kernel_mosaic_gpu_kernel
    24 bytes stack frame, 20 bytes spill stores, 16 bytes spill loads
ptxas warning : Registers are spilled to local memory in function 'kernel_mosaic_gpu_kernel', 20 bytes spill stores, 16 bytes spill loads
ptxas info    : Used 232 registers, used 2 barriers, 1 bytes smem
ptxas info    : Compile time = 222.791 ms
"""

# A loop from .L_x_1 to the branch at 0xb0 whose barrier wait retries out of line (.L_x_3, after
# EXIT) and jumps back into it: that jump spans more code than the loop but is no back edge.
SASS = """\
\t.target\tsm_90a
kernel:
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   ISETP.NE.AND P0, PT, R0, RZ, PT ;
        /*0020*/               @P0 EXIT ;
.L_x_1:
        /*0030*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P1, [R2], R3 ;
        /*0040*/              @!P1 BRA `(.L_x_3) ;
.L_x_4:
        /*0050*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], R24 ;
        /*0060*/                   LOP3.LUT R4, R5, 0xf, RZ, 0xc0, !PT ;
        /*0070*/                   IMAD R6, R7, R8, R9 ;
        /*0080*/                   HMUL2.BF16_V2 R10, R11, R12 ;
        /*0090*/                   UIADD3 UR4, UR4, 0x1, URZ ;
        /*00a0*/                   ISETP.GE.AND P2, PT, R6, R13, PT ;
        /*00b0*/              @!P2 BRA `(.L_x_1) ;
        /*00c0*/                   EXIT ;
.L_x_3:
        /*00d0*/                   SYNCS.PHASECHK.TRANS64 P1, [R2], R3 ;
        /*00e0*/              @!P1 BRA `(.L_x_3) ;
        /*00f0*/                   BRA `(.L_x_4) ;
.L_x_5:
        /*0100*/                   BRA `(.L_x_5);
"""

HOST_LLVM = """\
; ModuleID = 'LLVMDialectModule'
declare i32 @mosaic_gpu_launch_kernel(ptr, i32, i32, i32, i32, i32, i32, i32, i32, i32, i32, i32, ptr, ptr)
  %375 = call i32 @mosaic_gpu_launch_kernel(ptr %0, i32 1, i32 8, i32 256, i32 0, i32 0, i32 0, i32 128, i32 1, i32 1, i32 52248, i32 0, ptr %1, ptr %372)
"""


def fake_report(case, registers=128, smem=1000, threads=128, spills=0, warnings=()):
    ptxas = sr.PtxasReport(registers, spills, spills, spills, 2, 1, tuple(warnings))
    return ks.KernelReport(case, ptxas, sr.Launch((1, 1, 1), threads, smem - 1), {}, "")


MOE = kernel_cases.MoeCase("20b", "mlp1", 1, 32, 5760, 2880)
FLASH = kernel_cases.PrefillCase(4096, None)
MMA = {arch: kernel_cases.MmaMoeCase("20b", "mlp1", 1, 32, 5760, 2880, arch=arch) for arch in ("8.0", "8.9", "12.0")}


def test_ptxas_report():
    report = sr.parse_ptxas(PTXAS_LOG)
    assert (report.registers, report.spill_stores, report.spill_loads, report.stack_frame) == (232, 20, 16, 24)
    assert (report.barriers, report.static_smem) == (2, 1)
    assert report.warnings == (PTXAS_LOG.splitlines()[4],)
    with pytest.raises(sr.CompileError, match="registers"):
        sr.parse_ptxas("ptxas info    : 0 bytes gmem\n")


def test_the_output_of_one_compile_splits_into_report_sass_and_launch():
    report = ks.report(FLASH, PTXAS_LOG + "\n" + SASS + "\n" + HOST_LLVM)
    assert report.launch == sr.Launch((1, 8, 256), 128, 52248)
    assert report.smem == 52249  # plus ptxas' static byte
    assert report.sass.startswith(".target\tsm_90a") and "ModuleID" not in report.sass
    with pytest.raises(sr.CompileError, match="no SASS"):
        ks.report(FLASH, PTXAS_LOG + HOST_LLVM)


def test_the_main_loop_is_the_outermost_back_edge_not_a_retry_jumping_into_it():
    loop = sr.main_loop(SASS)
    assert loop[0].startswith("SYNCS.PHASECHK.TRANS64.TRYWAIT") and loop[-1] == "@!P2 BRA `(.L_x_1)"
    assert len(loop) == 9
    counts = sr.count_classes(loop)
    assert counts == dict.fromkeys(sr.CLASS_NAMES, 0) | {
        "int": 2, "perm/logic": 1, "half2": 1, "hgmma": 1, "barrier": 1, "uniform": 1, "other": 2}
    with pytest.raises(sr.CompileError, match="no loop"):
        sr.main_loop(SASS.split(".L_x_1:")[0])


def test_opcodes_lose_predicates_and_modifiers():
    assert sr.opcode("@!P2 HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], R24") == "HGMMA"
    assert sr.mnemonic("@!P2 HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], R24") == "HGMMA.64x64x16.F32.BF16"
    assert sr.instruction_class("PRMT") == "perm/logic"
    assert sr.instruction_class("UTMALDG") == "uniform" and sr.instruction_class("SHFL") == "other"


def test_main_loops_are_committed_as_mnemonic_counts_shared_by_cases_that_differ_in_operands():
    other_operands = SASS.replace("IMAD R6, R7, R8, R9", "IMAD R16, R17, R18, R19")
    other_loop = SASS.replace("IMAD R6, R7, R8, R9", "IMAD.WIDE R6, R7, R8, R9")
    names, entries = ks.main_loop_entries(["flash a=1", "flash a=2", "flash a=3"], [SASS, other_operands, other_loop])
    assert names == {"flash a=1": "flash-a-1", "flash a=2": "flash-a-1", "flash a=3": "flash-a-3"}
    assert entries["flash-a-1"]["IMAD"] == 1 and "IMAD" not in entries["flash-a-3"]
    assert sum(entries["flash-a-1"].values()) == len(sr.main_loop(SASS))
    assert list(entries["flash-a-1"]) == sorted(entries["flash-a-1"])


@pytest.mark.parametrize("registers, ctas", [(96, 5), (113, 4), (128, 4), (129, 3), (167, 3), (168, 3),
                                             (169, 2), (255, 2)])
def test_ctas_per_sm_by_registers(registers, ctas):
    assert fake_report(MOE, registers=registers).ctas_by_registers == ctas
    assert ks.registers_allowing(ctas, 128) >= registers


@pytest.mark.parametrize("smem, ctas", [(38945, 5), (62497, 3), (155681, 1), (164905, 1)])
def test_ctas_per_sm_by_shared_memory(smem, ctas):
    assert fake_report(MOE, smem=smem).ctas_by_smem == ctas


def test_budgets_follow_what_shared_memory_allows_up_to_four_ctas():
    assert ks.register_budget(fake_report(MOE, smem=62497)) == 168  # 3 CTAs by shared memory
    assert ks.register_budget(fake_report(MOE, smem=38945)) == 128  # 5 by shared memory, 4 wanted
    assert ks.register_budget(fake_report(MOE, smem=155681)) == 255
    assert ks.register_budget(fake_report(FLASH, smem=52249)) == 255  # 4 by shared memory: the exception


def test_the_check_refuses_spills_warnings_and_registers_over_budget():
    assert ks.violations(fake_report(MOE, registers=167, smem=62497)) == []
    assert ks.violations(fake_report(FLASH, registers=255, smem=52249)) == []
    over = ks.violations(fake_report(MOE, registers=176, smem=62497))
    assert over == ["moe 20b mlp1 tokens=1: 176 registers, over its budget of 168"]
    spilled = ks.violations(fake_report(FLASH, registers=255, spills=8, warnings=["ptxas warning : spilled"]))
    assert len(spilled) == 2 and "spills 8 B" in spilled[0] and spilled[1].endswith("ptxas warning : spilled")


def test_per_weight_byte_counts_every_warp_of_the_cta():
    report = dataclasses.replace(fake_report(MOE), loop=dict.fromkeys(sr.CLASS_NAMES, 0) | {"int": 384})
    assert MOE.weight_bytes_per_step() == 2 * 64 * 96  # gate and linear halves, block_kb bytes
    assert report.per_weight_byte("int") == pytest.approx(384 * 4 / 12288)
    assert report.per_weight_byte() == report.per_weight_byte("int")


def test_default_cases_cover_every_kernel_shape_once():
    cases = kernel_cases.gpt_oss_cases()
    names = [c.name for c in cases]
    assert len(names) == len(set(names)) == 2 * 2 * 4 + 2 + 2 * 2 * 2
    assert {c.cache_len for c in cases if c.kernel == "decode" and c.window} == {128}  # the ring
    shard = dataclasses.replace(preset("gpt-oss-120b"), num_experts=32 // 4)  # expert-parallel shard
    (mlp2,) = [c for c in kernel_cases.gpt_oss_cases([shard], tokens=(64,), kernels=("moe",)) if c.matmul == "mlp2"]
    assert (mlp2.model, mlp2.experts, mlp2.n, mlp2.k) == ("E8", 8, 2880, 2880)


def test_shard_cases_add_each_devices_kernels_once():
    shards = kernel_cases.shard_cases()
    names = [c.name for c in kernel_cases.gpt_oss_cases() + shards]
    assert len(names) == len(set(names))
    # 20b's 32 and 120b's 128 experts over 2, 4 or 8 expert x tensor devices; 32 is 20b's own.
    assert {c.experts for c in shards if c.kernel == "moe"} == {64, 32, 16, 8, 4}
    assert {(c.q_heads, c.kv_heads) for c in shards if c.kernel != "moe"} == {(32, 4), (16, 2), (8, 1)}
    assert {c.batch for c in shards if c.kernel == "decode"} == {1, 32, 64}  # data=2 halves the 64 rows
    assert kernel_cases.MoeCase("E8", "mlp1", 32, 8, 5760, 2880) in shards


def test_write_results_commits_the_tables_and_the_main_loops_the_cost_model_reads(tmp_path):
    results_md, main_loops = tmp_path / "RESULTS.md", tmp_path / "main_loops.json"
    results_md.write_text("# Results\n\n## On a GPU session\n\nrows\n")
    report = ks.report(FLASH, PTXAS_LOG + "\n" + SASS + "\n" + HOST_LLVM)
    tools = types.SimpleNamespace(ptxas_version="ptxas V0")  # all write_results reads of the tools
    ks.write_results([report], tools, results_md=results_md, main_loops=main_loops)
    assert json.loads(main_loops.read_text()) == {"flash-t-4096-full": sr.main_loop_mnemonics(SASS)}
    assert "| `flash-t-4096-full` |" in results_md.read_text()
    ks.write_sass([report], tmp_path / "sass")
    assert (tmp_path / "sass" / "flash-t-4096-full.sass").read_text() == report.sass

    # --only moe-mma --write: the mma.sync kernel's section and entries, the Hopper kernels' kept.
    mma = dataclasses.replace(report, case=MMA["8.9"])
    ks.write_results([mma], tools, results_md=results_md, main_loops=main_loops)
    assert json.loads(main_loops.read_text()) == {"flash-t-4096-full": sr.main_loop_mnemonics(SASS),
                                                  "moe-mma-sm-89-20b-mlp1-tokens-1": sr.main_loop_mnemonics(SASS)}
    text = results_md.read_text()
    assert "| `flash-t-4096-full` |" in text and text.index(ks.MMA_SECTION_TITLE) > text.index("## On a GPU session")
    assert "| `moe-mma-sm-89-20b-mlp1-tokens-1` |" in text


def test_the_section_replaces_only_itself(tmp_path):
    text = "# Results\n\nintro\n\n## On a GPU session\n\nrows\n"
    first = ks.replace_section(text, f"{ks.SECTION_TITLE}\n\nfirst\n")
    assert first == f"# Results\n\nintro\n\n{ks.SECTION_TITLE}\n\nfirst\n\n## On a GPU session\n\nrows\n"
    second = ks.replace_section(first, f"{ks.SECTION_TITLE}\n\nsecond\n")
    assert second == first.replace("first", "second")


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler")
@pytest.mark.parametrize("asked, capability", [(None, (9, 0)), ("8.9", (8, 9)), ("12.0", (12, 0)), ("junk", (9, 0))])
def test_the_stand_in_driver_reports_the_asked_compute_capability_and_loads_nothing(tmp_path, monkeypatch, asked,
                                                                                     capability):
    if asked is None:
        monkeypatch.delenv(ks.STAND_IN_CAPABILITY, raising=False)
    else:
        monkeypatch.setenv(ks.STAND_IN_CAPABILITY, asked)
    driver = ctypes.CDLL(str(sass_tools._driver(tmp_path) / "libcuda.so.1"))
    value = ctypes.c_int(-1)
    assert driver.cuInit(0) == 0
    assert driver.cuDeviceGetAttribute(ctypes.byref(value), 75, 0) == 0 and value.value == capability[0]
    assert driver.cuDeviceGetAttribute(ctypes.byref(value), 76, 0) == 0 and value.value == capability[1]
    name = ctypes.create_string_buffer(32)
    assert driver.cuDeviceGetName(name, 32, 0) == 0 and name.value.decode() == "stand-in sm_%d%d" % capability
    assert driver.cuModuleLoadData(ctypes.byref(ctypes.c_void_p()), None) != 0


def test_the_mma_kernel_is_held_to_two_ctas_per_sm_by_its_targets_limits():
    # sm_80 (164 KB) fits 4 CTAs of 37 KB, sm_89 and sm_120 (100 KB) 2: 2 are wanted either way.
    assert [fake_report(MMA[arch], smem=36865).ctas_by_smem for arch in MMA] == [4, 2, 2]
    assert {ks.register_budget(fake_report(MMA[arch], smem=36865)) for arch in MMA} == {255}
    assert fake_report(MMA["8.9"], registers=184, smem=49153).ctas_per_sm == 2
    # 32 registers allow 64 warps: all of an sm_80's, more than an sm_89's 48.
    assert fake_report(MMA["8.0"], registers=32).ctas_by_registers == 16
    assert fake_report(MMA["8.9"], registers=32).ctas_by_registers == 12


def test_sm_120s_guard_call_stack_is_allowed_there_only():
    def stacked(case):
        report = fake_report(case, registers=166, smem=36881)
        return dataclasses.replace(report, ptxas=dataclasses.replace(report.ptxas, spill_stores=0, spill_loads=0,
                                                                      stack_frame=8))

    assert ks.violations(stacked(MMA["12.0"])) == []
    assert ks.violations(stacked(MMA["8.9"])) == ["moe-mma sm_89 20b mlp1 tokens=1: spills 0 B stored / 0 B loaded, "
                                                  "stack frame 8 B"]


def test_mma_cases_name_their_target_and_lower_for_it():
    cases = kernel_cases.mma_cases()
    assert len({c.name for c in cases}) == len(cases) == 3 * 2 * 2
    assert {c.arch for c in cases} == {"8.0", "8.9", "12.0"} and cases[0].name == "moe-mma sm_80 20b mlp1 tokens=1"
    assert MMA["8.9"].weight_bytes_per_step() == 2 * 64 * 96
    import jax
    from jax.experimental.mosaic.gpu import utils

    with kernel_cases.lowering_for("8.9"):
        assert utils._infer_arch() == (8, 9)
    assert jax.sharding.get_abstract_mesh().empty


def test_each_worker_compiles_for_one_target(monkeypatch, tmp_path):
    """The plugin keeps the first compute capability it is told for its whole process."""
    started = []

    class Worker:
        def __init__(self, command, env, **kwargs):
            cases = __import__("pickle").loads(open(command[command.index("--worker") + 1], "rb").read())
            started.append((env[ks.STAND_IN_CAPABILITY], {case.arch for _, case in cases}))

        def communicate(self):
            return "", ""

    monkeypatch.setattr(ks.subprocess, "Popen", Worker)
    tools = sass_tools.Tools(tmp_path, tmp_path, tmp_path)
    with pytest.raises(sr.CompileError):  # the stand-in workers write nothing
        ks.compile_kernels([MOE, *MMA.values()], tools, jobs=2)
    assert sorted(started) == [("12.0", {"12.0"}), ("8.0", {"8.0"}), ("8.9", {"8.9"}), ("9.0", {"9.0"})]
