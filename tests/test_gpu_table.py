"""benchmarks/gpu_table.py's CPU smoke mode and its JSON (the GPU run's machine-readable results).

The smoke run (tiny shapes on the CPU) runs in a subprocess on the families without torch.compile-heavy rows
(CI's .ci/run runs every family); the peer rows are checked in-process with every peer hidden.
"""
import json
import os
import subprocess
import sys

import pytest

import fastlayers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")
sys.path.insert(0, BENCH)

import gpu_peers  # noqa: E402
import gpu_table as gt  # noqa: E402

META_KEYS = {"schema", "date", "device", "smoke", "graphs", "torch", "triton", "git_commit", "copy_ceiling_gbps",
             "peers", "fastlayers_backends", "args"}
# Each family's peers: a row per peer whatever its state (timed, needs GPU, unavailable, not installed).
FAMILY_PEERS = {"mla": {"flash_mla"}, "ssd": {"mamba_ssm"}, "scan": {"mamba_ssm"}, "state_update": {"mamba_ssm"},
                "conv1d": {"causal-conv1d"}, "norm": {"liger"}}
SMOKE_FAMILIES = "mla,ssd,scan,state_update,conv1d,norm,overhead"


def _smoke(tmp_path, *args):
    out = tmp_path / "x.json"
    pkg_parent = os.path.dirname(os.path.dirname(os.path.abspath(fastlayers.__file__)))  # the fastlayers under test
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [pkg_parent, os.environ.get("PYTHONPATH")])))
    r = subprocess.run([sys.executable, os.path.join(BENCH, "gpu_table.py"), "--cpu-smoke", "--json", str(out), *args],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return json.loads(out.read_text()), r.stdout


def test_cpu_smoke_writes_rows_and_metadata(tmp_path):
    doc, stdout = _smoke(tmp_path, "--families", SMOKE_FAMILIES)
    meta = doc["meta"]
    assert META_KEYS <= set(meta) and meta["schema"] == gt.SCHEMA and meta["smoke"] is True
    assert meta["graphs"] is False and meta["copy_ceiling_gbps"] > 0 and meta["git_commit"]
    assert doc["complete"] is True
    assert [f["name"] for f in doc["families"]] == SMOKE_FAMILIES.split(",")
    rows = doc["rows"]
    for r in rows:
        assert set(r) == set(gt.ROW_KEYS), r
        assert r["provider"] and r["status"] in gt.STATUSES and r["family"] in SMOKE_FAMILIES.split(","), r
    ok = [r for r in rows if r["status"] == "ok"]
    # fastlayers and torch rows all run on the CPU; only peers may be missing or need a GPU.
    assert all(r["provider"] in gt.PEERS for r in rows if r["status"] != "ok"), \
        [r for r in rows if r["status"] != "ok" and r["provider"] not in gt.PEERS]
    for r in ok:
        assert r["time_us"] > 0 and r["time_us_graph"] is None and r["host_us"] is None, r  # no graphs on the CPU
        if r["gbps"] is not None:
            assert r["pct_copy"] == pytest.approx(100 * r["gbps"] / meta["copy_ceiling_gbps"])
    fams = {r["family"] for r in ok if r["provider"] == "fastlayers"}
    assert fams == set(SMOKE_FAMILIES.split(",")), fams  # every family timed fastlayers
    assert any(r["time_us_kernel"] for r in ok if r["op"] == "mla_decode")  # the kernel-alone column
    assert any(r["tflops"] for r in ok if r["op"].startswith("ssd_scan"))
    for fam, want in FAMILY_PEERS.items():
        have = {r["provider"] for r in rows if r["family"] == fam}
        assert want <= have, (fam, have)
    assert {"torch"} <= {r["provider"] for r in rows if r["family"] == "norm"}
    # The markdown is kept: a header and one line per row, graph_us n/a.
    lines = stdout.splitlines()
    head = max(i for i, ln in enumerate(lines) if ln.startswith("| op | "))  # the whole table, printed at the end
    assert lines[head].startswith("| op | shape | dtype | provider | backend | time_us | graph_us | kernel_us")
    table = [ln for ln in lines[head + 2:] if ln.startswith("| ")]
    assert len(table) == len(rows)
    assert all("| n/a |" in ln for r, ln in zip(rows, table) if r["status"] == "ok")
    # --render gives the same markdown back from the JSON.
    rendered = gt.render(str(tmp_path / "x.json"))
    assert rendered.count("\n| ") == len(rows) + 1


def test_budget_spent_rows_say_not_run(tmp_path):
    doc, stdout = _smoke(tmp_path, "--families", "ssd,state_update", "--budget", "1e-6")
    timed = [r for r in doc["rows"] if r["provider"] in ("fastlayers", "torch")]
    assert timed and all(r["status"] == "not run" for r in timed)
    assert {r["family"] for r in timed} == {"ssd", "state_update"} and doc["complete"] is True
    assert "NOT RUN: --budget spent" in stdout


def test_missing_peers_are_rows(monkeypatch):
    """Every peer hidden (as on a machine where fetch_peers.sh has not run): each family says so in rows."""
    from gpu_table_mla import conv1d_rows, mla_rows, scan_rows, state_update_rows
    from gpu_table_ssd import ssd_rows
    monkeypatch.setattr(gpu_peers, "_installed", lambda mod: False)
    monkeypatch.setattr(gpu_peers, "_cache", {})
    monkeypatch.setattr(gt, "DEVICE", "cpu")
    monkeypatch.setattr(gt, "DEADLINE", 0.0)  # no timing: the peer rows come before any
    fams = dict(mla=mla_rows, ssd=ssd_rows, scan=scan_rows, state_update=state_update_rows, conv1d=conv1d_rows)
    for name, fam in fams.items():
        rows = fam(gt, 1.0, 1 << 20, smoke=True)
        missing = [r for r in rows if r["provider"] in gt.PEERS]
        assert {r["provider"] for r in missing} == FAMILY_PEERS[name], name
        assert all(r["status"] == "not installed" and "not installed" in r["note"] for r in missing), missing
        assert all(r["status"] == "not run" for r in rows if r["provider"] == "fastlayers")
    assert gpu_peers.liger()[1][0] == "not installed"


def test_results_name_and_statuses_in_markdown():
    assert gt.results_name("NVIDIA H200", "2026-12-04") == "2026-12-04-h200.json"
    assert gt.results_name("NVIDIA H100 80GB HBM3", "2026-12-04") == "2026-12-04-h100-80gb-hbm3.json"
    row = gt.new_row(("rms_norm", "-", "-", "liger", "-"), "not installed", "liger-kernel not installed")
    assert gt.md_line(row).endswith("| NOT INSTALLED: liger-kernel not installed |")
    with pytest.raises(AssertionError):
        gt.status_row([], ("x", "-", "-", "liger", "-"), "missing", "")  # only the listed statuses
