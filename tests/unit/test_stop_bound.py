"""jina_server.py bounds its stop: Jina joins its processes with no timeout, so a worker stuck in its teardown
(seen once in CI: the server outlived its SIGTERM by more than 30 s) would hold `docker stop` until SIGKILL.
Past the grace, each live child dumps its stacks (SIGUSR1, faulthandler) and is killed."""

import faulthandler
import logging
import multiprocessing
import signal
import time

import jina_server


def _stuck_in_teardown(ready):
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # as executor/__init__.py does in every worker
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    ready.set()
    time.sleep(120)


def test_a_child_that_does_not_stop_is_named_in_the_log_and_killed(caplog):
    ready = multiprocessing.get_context("fork").Event()
    child = multiprocessing.get_context("fork").Process(target=_stuck_in_teardown, args=(ready,), name="rep-0")
    child.start()
    try:
        assert ready.wait(30)
        child.terminate()  # what Jina's Pod.close sends: ignored here, as by a worker stuck in its teardown
        child.join(0.5)
        assert child.is_alive()
        started = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="jina_llm_stream"):
            jina_server._kill_stragglers(grace_s=0.2)
        child.join(10)
        assert not child.is_alive() and child.exitcode == -signal.SIGKILL
        assert time.monotonic() - started < 5
        assert f"process rep-0 (pid {child.pid}) did not stop within 0 s" in caplog.text
    finally:
        if child.is_alive():
            child.kill()
            child.join()


def test_the_stop_is_bounded_once_however_many_signals_arrive(monkeypatch):
    started = []
    monkeypatch.setattr(jina_server, "_stop_bounded", jina_server.threading.Event())
    monkeypatch.setattr(jina_server, "_stop_within", lambda grace_s: started.append(grace_s))
    for _ in range(3):
        jina_server.bound_the_stop(grace_s=0)
    time.sleep(0.2)
    assert started == [0]
