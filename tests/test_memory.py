"""optc.memory: size parsing, the machine-memory probe (cgroup v1/v2, /proc/meminfo) and the budget check."""

from __future__ import annotations

from pathlib import Path

import pytest

from optc.memory import (
    MemoryBudgetExceeded,
    available_memory,
    cgroup_limit,
    check_budget,
    format_size,
    meminfo_available,
    parse_size,
    resolve_budget,
)

GIB = 1 << 30


@pytest.mark.parametrize(
    ("text", "size"),
    [("8G", 8 * GIB), ("512M", 512 << 20), ("512m", 512 << 20), ("1.5G", 3 * GIB // 2), ("4096", 4096),
     ("2GiB", 2 * GIB), ("2GB", 2 * GIB), ("64K", 64 << 10), ("1T", 1 << 40), (" 3 M ", 3 << 20), (1234, 1234)],
)
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "lots", "8X", "-1G", "0", "0M", "G", "1.2.3G", "8 G B", 0, -5, 2.5, None, True])
def test_parse_size_refuses(text):
    with pytest.raises(ValueError) as info:
        parse_size(text)
    assert "\n" not in str(info.value)


def _cgroup(tmp_path: Path, files: dict[str, str], proc: str) -> tuple[Path, Path]:
    root = tmp_path / "cgroup"
    for name, content in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(content)
    (tmp_path / "self-cgroup").write_text(proc)
    return root, tmp_path / "self-cgroup"


def test_cgroup_v2_limit(tmp_path):
    root, proc = _cgroup(tmp_path, {"job/memory.max": "2147483648\n", "memory.max": "max\n"}, "0::/job\n")
    assert cgroup_limit(root, proc) == 2 * GIB


def test_cgroup_v2_without_limit(tmp_path):
    root, proc = _cgroup(tmp_path, {"job/memory.max": "max\n"}, "0::/job\n")
    assert cgroup_limit(root, proc) is None


def test_cgroup_v1_limit(tmp_path):
    root, proc = _cgroup(
        tmp_path, {"memory/docker/abc/memory.limit_in_bytes": "1073741824\n"},
        "12:cpu,cpuacct:/docker/abc\n11:memory:/docker/abc\n",
    )
    assert cgroup_limit(root, proc) == GIB


def test_cgroup_v1_unlimited_is_none(tmp_path):
    root, proc = _cgroup(tmp_path, {"memory/memory.limit_in_bytes": "9223372036854771712\n"}, "11:memory:/\n")
    assert cgroup_limit(root, proc) is None


def test_no_cgroup_at_all(tmp_path):
    assert cgroup_limit(tmp_path / "absent", tmp_path / "absent-too") is None


def test_meminfo(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24000000 kB\nMemFree:         1000000 kB\nMemAvailable:    8000000 kB\n")
    assert meminfo_available(meminfo) == 8000000 * 1024
    meminfo.write_text("MemTotal:       24000000 kB\nMemFree:         1000000 kB\n")
    assert meminfo_available(meminfo) == 1000000 * 1024
    assert meminfo_available(tmp_path / "absent") is None


def test_available_memory_is_capped_by_the_cgroup(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemAvailable:    8388608 kB\n")  # 8 GiB
    root, proc = _cgroup(tmp_path, {"memory.max": str(GIB)}, "0::/\n")
    assert available_memory(cgroup_root=root, proc_cgroup=proc, meminfo=meminfo) == GIB
    root2, proc2 = _cgroup(tmp_path / "big", {"memory.max": str(64 * GIB)}, "0::/\n")
    assert available_memory(cgroup_root=root2, proc_cgroup=proc2, meminfo=meminfo) == 8 * GIB


def test_available_memory_falls_back_to_sysconf(tmp_path):
    found = available_memory(cgroup_root=tmp_path / "none", proc_cgroup=tmp_path / "none", meminfo=tmp_path / "none")
    assert found is None or found > 0


def test_this_machine_has_some_memory():
    assert available_memory() > 16 << 20
    assert resolve_budget(None) == available_memory() or resolve_budget(None) > 0
    assert resolve_budget("1G") == GIB


def test_check_budget():
    check_budget("m.onnx", 100, 100, "loading it")
    check_budget("m.onnx", 10**15, None, "loading it")  # no budget known: not checked
    with pytest.raises(MemoryBudgetExceeded) as info:
        check_budget("m.onnx", 3 * 10**9, 10**9, "loading it")
    assert str(info.value) == (
        "m.onnx: loading it needs about 3.0 GB of memory, more than the budget of 1.0 GB; "
        "refusing to load it (raise it with --memory-budget)"
    )
    assert info.value.exit_code == 1


def test_format_size():
    assert [format_size(n) for n in (60, 1500, 27 * 10**9)] == ["60 bytes", "1.5 kB", "27.0 GB"]
