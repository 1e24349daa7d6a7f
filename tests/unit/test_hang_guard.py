"""pytest.ini bounds every test: a hang fails fast with every thread's stack, instead of running CI into its
time limit (seen once: a server fixture's worker spinning in grpc's Server.stop)."""

import subprocess
import sys
import textwrap
import time

from conftest import ROOT


def test_a_hanging_test_fails_within_its_limit_and_prints_the_stacks(tmp_path):
    hanging = tmp_path / "test_hangs.py"
    hanging.write_text(textwrap.dedent("""
        import threading, time

        def test_waits_forever():
            threading.Event().wait()
    """))
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-c", str(ROOT / "pytest.ini"), "-o", "timeout=3",
                             "-o", "faulthandler_timeout=2", "--rootdir", str(tmp_path), str(hanging)],
                            capture_output=True, text=True, timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert time.monotonic() - started < 60
    assert "Timeout" in output and "test_waits_forever" in output, output[-2000:]
