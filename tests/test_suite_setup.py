"""The suite's own plumbing: `make test` runs `pytest -n 2 --dist loadgroup`, and its time budget (under 10 minutes on
2 cores) assumes that the tests marked `xdist_group("quick_lab")` share one worker and so one quick CPU image lab
(minutes of CPU, tests/conftest.py). pytest 9.2 with pytest-xdist 3.8 silently stopped grouping
(pytest-dev/pytest-xdist#1386): every test passed and the lab was built twice. This test notices that."""

import subprocess
import sys
import textwrap


def test_loadgroup_keeps_a_group_on_one_worker(tmp_path):
    (tmp_path / "conftest.py").write_text("")
    for name in ("a", "b"):  # the group spans two files, like test_lab.py and test_tutorials.py
        (tmp_path / f"test_{name}.py").write_text(textwrap.dedent(f"""
            import os
            import pytest

            @pytest.mark.xdist_group("shared")
            @pytest.mark.parametrize("i", range(3))
            def test_grouped_{name}(i):
                with open({str(tmp_path / "workers.txt")!r}, "a") as log:
                    log.write(os.environ["PYTEST_XDIST_WORKER"] + "\\n")

            @pytest.mark.parametrize("i", range(3))
            def test_free_{name}(i):
                pass
            """))
    result = subprocess.run([sys.executable, "-m", "pytest", "-n", "2", "--dist", "loadgroup", "-q",
                             "-p", "no:cacheprovider", str(tmp_path)], capture_output=True, text=True, timeout=120,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    workers = (tmp_path / "workers.txt").read_text().split()
    assert len(workers) == 6
    assert len(set(workers)) == 1, f"xdist_group tests ran on {sorted(set(workers))}: --dist loadgroup does not group"
