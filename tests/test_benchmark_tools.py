"""The benchmark scripts' own logic (not their timings: those are never asserted)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import kernel_count  # noqa: E402

# Shaped like inductor's generated wrapper (TORCH_LOGS=output_code): CPU and Triton flavours.
OUTPUT_CODE = '''
V1122 [__output_code] # AOT ID: ['3_forward']
V1122 [__output_code] cpp_fused_add_0 = async_compile.cpp_pybinding(['float*'], r\'\'\'
V1122 [__output_code] def call(args):
        cpp_fused_add_0(buf1, buf2)
        extern_kernels.mm(reinterpret_tensor(buf3, (4, 64), (64, 1), 0), primals_1, out=buf4)
        extern_kernels.addmm(primals_2, buf4, primals_3, alpha=1, beta=1, out=buf5)
        buf6 = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default(buf1, buf2, buf3)
        triton_poi_fused_mul_1.run(buf5, buf7, 1024, stream=stream0)
        # Topologically Sorted Source Nodes: [mm_3], Original ATen: [aten.mm]
        return (buf5, )
def benchmark_compiled_module(times=10, repeat=10):
        cpp_fused_add_0(buf1, buf2)
V1122 [__output_code] # AOT ID: ['3_backward']
V1122 [__output_code] def call(args):
        extern_kernels.mm(buf1, buf2, out=buf3)
        return (buf3, )
'''


def test_kernel_count_reads_launches_per_graph():
    graphs = kernel_count.count_graphs(OUTPUT_CODE)
    assert set(graphs) == {"3_forward", "3_backward"}
    # the wrapper's calls only: not the kernel definitions, comments or the benchmark helper
    assert graphs["3_forward"] == {"fused": 2, "library": 2, "aten": 1}
    assert graphs["3_backward"] == {"library": 1}
