"""A short run of bench/soak.py (make soak runs 32 clients for 60 s): mixed valid, abandoned and bad
requests from many clients; the script itself checks 0 failed valid, 0 accepted bad, an idle CPU after the
last abandoned stream and flat RSS, and exits non-zero otherwise."""

import subprocess

from conftest import PYTHON, ROOT


def test_short_soak(slow_model):
    # The slower test model: an abandoned answer cannot finish legitimately before its cancel arrives.
    result = subprocess.run([PYTHON, "bench/soak.py", "--clients", "8", "--seconds", "12", "--model_name",
                             str(slow_model)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    report = result.stdout
    assert result.returncode == 0, report + result.stderr[-3000:]
    assert "| failed valid requests | 0 | yes |" in report
    assert "abandon ok" in report and "bad ok" in report
