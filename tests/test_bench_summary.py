"""The summary that ends a benchmark run (benchmarks/summary.py): a block per family, a line per case,
a column per provider with time, GB/s, % of the copy ceiling and the speed-ups over eager and compile."""
import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import summary  # noqa: E402


class _B(SimpleNamespace):
    """A pytest-benchmark result: false without stats, like pytest_benchmark.stats.Metadata."""
    def __bool__(self):
        return self.stats is not None


def bench(file, t, **info):
    return _B(fullname=f"benchmarks/test_bench_{file}.py::test_x", stats=SimpleNamespace(median=t),
              extra_info=dict(info, device_name="cpu", threads=2, copy_gbps=10.0))


def test_one_line_per_case_one_column_per_provider():
    case = dict(op="rms_norm", pass_="forward", shape=[4096, 2048], dtype="torch.float32", bytes=4e9)
    rows = [bench("norm", 1.0, provider="cpu", **case), bench("norm", 2.0, provider="eager", **case),
            bench("norm", 4.0, provider="compile", **case),
            bench("norm", 0.5, provider="cpu", **dict(case, shape=[16384, 8192])),
            bench("scan", 0.1, provider="cpu", op="selective_scan", pass_="fwd", shape=[2, 8], dtype="float32",
                  bytes=1e8)]
    out = summary.lines(rows)
    blocks = [i for i, line in enumerate(out) if line.startswith("--- ")]
    assert [out[i].split(":")[0] for i in blocks] == ["--- norm", "--- scan"]
    assert "copy ceiling 10 GB/s" in out[blocks[0]]
    header = out[blocks[0] + 1].split("|")
    assert [h.strip() for h in header[1:]] == ["cpu", "eager", "compile"]
    line = next(line for line in out if line.startswith("rms_norm forward 4096x2048 float32"))
    cpu, eager, comp = (c.strip() for c in line.split("|")[1:])
    # 4 GB in 1 s = 4 GB/s = 40% of 10 GB/s; 2x faster than eager, 4x faster than compile.
    assert cpu == "1.00s 4GB/s 40% 2.00xE 4.00xC", cpu
    assert eager == "2.00s 2GB/s 20% 2.00xC", eager      # eager is not compared with itself
    assert comp.endswith("0.50xE"), comp
    other = next(line for line in out if line.startswith("rms_norm forward 16384x8192"))
    assert other.split("|")[2].strip() == "-"            # a provider with no row for this case


def test_rows_without_timing_or_provider_are_left_out():
    rows = [_B(fullname="benchmarks/test_bench_norm.py::t", stats=None, extra_info={"provider": "cpu"}),
            bench("norm", 1.0, op="x")]
    assert summary.lines(rows) == []
