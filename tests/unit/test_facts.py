"""Fact parsing from recorded command output."""

from __future__ import annotations

import os
from pathlib import Path

from llamadeploy.config import HostConfig
from llamadeploy.facts import CpuTopology, parse_help_flags
from llamadeploy.tuning import server_args

DATA = Path(__file__).parent / "data"

# lscpu -p=CPU,CORE,SOCKET,NODE on a 2-socket, 2-core-per-socket host with SMT
LSCPU_SMT = """# The following is the parsable format
# CPU,Core,Socket,Node
0,0,0,0
1,1,0,0
2,2,1,1
3,3,1,1
4,0,0,0
5,1,0,0
6,2,1,1
7,3,1,1
flags\t\t: fpu vme avx2 avx512f
""".splitlines()


def test_cpu_topology_counts_smt_siblings_once():
    info = CpuTopology().process(LSCPU_SMT)
    assert (info.logical, info.physical, info.sockets, info.numa_nodes) == (8, 4, 2, 2)
    assert {"avx2", "avx512f"} <= info.flags


def test_cpu_topology_container_without_node_column():
    info = CpuTopology().process(["# CPU,Core,Socket,Node", "0,0,0,", "1,1,0,"])
    assert (info.logical, info.physical, info.numa_nodes) == (2, 2, 1)


def test_help_flags_of_b11434():
    flags = parse_help_flags((DATA / "llama-server-b11434-help.txt").read_text().splitlines())
    for f in ("--kv-unified", "--no-kv-unified", "-kvu", "--load-mode", "--api-key-file",
              "--n-gpu-layers", "--metrics", "--threads-batch", "--no-cont-batching", "--alias"):
        assert f in flags, f
    # removed in favour of --load-mode: must be rejected before a restart
    assert "--mlock" not in flags and "--no-mmap" not in flags


def test_every_rendered_flag_exists_in_b11434():
    flags = parse_help_flags((DATA / "llama-server-b11434-help.txt").read_text().splitlines())
    c = HostConfig.model_validate({"model": {"path": "/m.gguf"}, "server": {
        "api_key": "x" * 16, "load_mode": "mlock", "cont_batching": False, "kv_unified": False,
        "numa": "distribute"}})
    from llamadeploy.facts import CpuInfo
    from llamadeploy.tuning import MemoryPlan

    # every optional flag rendered: --swa-full and --load-mode come from the plan
    plan = MemoryPlan(8192, 8, 1 << 33, 1, 1, 1, swa_full=True, load_mode="mlock")
    args = server_args(c, CpuInfo(2, 2, 1, 1), plan, "/m.gguf", "m")
    assert "--swa-full" in args and "--load-mode" in args
    assert [a for a in args if a.startswith("--") and a not in flags] == []


def test_disk_free_from_df():
    from llamadeploy.roles.model.facts import DiskFree

    out = ["Filesystem        1-blocks       Used   Available Capacity Mounted on",
           "/dev/vda      270475862016 23622320128 233019981824      10% /"]
    assert DiskFree().process(out) == 233_019_981_824
    assert DiskFree().process([]) is None


def test_host_memory_with_and_without_cgroup_limit():
    from llamadeploy.roles.preflight.facts import HostMemory

    out = ["MemTotal:       24683964 kB", "MemAvailable:   21794052 kB", "cgroup 8589934592"]
    mem = HostMemory().process(out)
    assert (mem.total, mem.available, mem.cgroup_limit) == (24683964 * 1024, 21794052 * 1024, 8 << 30)
    assert mem.usable == 8 << 30
    unlimited = HostMemory().process(out[:2] + ["cgroup max"])
    assert unlimited.cgroup_limit is None and unlimited.usable == 24683964 * 1024


def test_memlock_ceiling_from_pid1():
    """Recorded from a systemd-nspawn host (no CAP_SYS_RESOURCE) and from a normal host."""
    from llamadeploy.roles.preflight.facts import HostMemory

    mem = ["MemTotal:       24683964 kB", "MemAvailable:   21794052 kB", "cgroup max"]
    nspawn = HostMemory().process(mem + [
        "CapEff:\t00000000fcecbfff",
        "Max locked memory         8388608              8388608              bytes     ",
    ])
    assert nspawn.memlock_ceiling == 8 << 20
    full = HostMemory().process(mem + [
        "CapEff:\t000001ffffffffff",
        "Max locked memory         8388608              8388608              bytes     ",
    ])
    assert full.memlock_ceiling is None  # PID 1 may raise LimitMEMLOCK= for its services
    unlimited = HostMemory().process(mem + [
        "CapEff:\t00000000fcecbfff",
        "Max locked memory         unlimited            unlimited            bytes     ",
    ])
    assert unlimited.memlock_ceiling is None


def test_started_before_compares_process_start_with_file_mtimes():
    """The stale-server fact's parsing and quoting."""
    from llamadeploy.roles.service.facts import StartedBefore

    fact = StartedBefore()
    assert fact.process(["yes"]) is True and fact.process(["no"]) is False and fact.process([]) is False
    cmd = fact.command("llama-server.service", ["/etc/llama-server/api-key", "/opt/x y/bin"])
    assert "'/opt/x y/bin'" in cmd and "/proc/$pid/stat" in cmd


def test_newer_than_process_against_a_real_process(tmp_path):
    """The comparison run by ``sh`` against a process of this machine: a file written a second
    before the start is not newer, one written just after is, one written in the same second
    before the start is not (what whole seconds got wrong), a missing file counts for nothing."""
    import subprocess
    import time

    from llamadeploy.roles.service.facts import newer_than_process

    old, same, after = tmp_path / "old", tmp_path / "same second", tmp_path / "after"
    old.write_text("x")
    os.utime(old, (time.time() - 2, time.time() - 2))
    same.write_text("x")
    proc = subprocess.Popen(["sleep", "30"])
    try:
        time.sleep(0.6)  # past the tolerance, and the kernel's coarse mtime clock
        after.write_text("x")
        # dated 2 s after now: the shell reckons the start from /proc/uptime and date, read at two
        # moments, and on a loaded machine the gap between them ate the 0.35 s margin
        os.utime(after, (time.time() + 2, time.time() + 2))

        def newer(*paths):
            out = subprocess.run(["sh", "-c", f"pid={proc.pid}; " + newer_than_process([str(p) for p in paths])],
                                 capture_output=True, text=True, timeout=30)
            assert out.returncode == 0, out.stderr
            return out.stdout.strip()

        assert newer(old) == "no"
        assert newer(same) == "no"
        assert newer(old, tmp_path / "missing") == "no"
        assert newer(old, same, after) == "yes"
        assert newer(after) == "yes"
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert subprocess.run(["sh", "-c", "pid=0; " + newer_than_process([str(after)])], capture_output=True,
                          text=True, timeout=30).stdout.strip() == "no"
