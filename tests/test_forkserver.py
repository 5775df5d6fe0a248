"""The local pool's fork server (autograder.forkserver): each forked worker is a fresh process of its own
(session, environment, working folder, log, module state), a crash or a hang costs only its submission, and
the server's death or the grading run's takes every worker with it."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from autograder.forkserver import ForkServer, ForkServerError

REPO = Path(__file__).resolve().parents[1]


def _script(tmp: Path, name: str, body: str) -> Path:
    path = tmp / f"{name}.py"
    path.write_text(textwrap.dedent(body))
    return path


def _env(**extra) -> dict:
    return dict(os.environ, PYTHONPATH=str(REPO), **extra)


@pytest.fixture
def server():
    s = ForkServer(_env())
    yield s
    s.close()


def _run(server, tmp: Path, script: Path, wall: float = 60, **env) -> tuple[int | None, str]:
    folder = tmp / script.stem
    folder.mkdir(exist_ok=True)
    log = folder / "worker.log"
    rc = server.run(str(script), str(log), str(folder), _env(**env), wall, script=True)
    return rc, log.read_text()


def test_children_are_fresh_processes_with_their_own_environment(server, tmp_path):
    probe = _script(tmp_path, "probe", """
        import json, os, sys
        import autograder.worker as w                       # preloaded by the server
        print(json.dumps({"pid": os.getpid(), "sid": os.getsid(0), "ppid": os.getppid(), "cwd": os.getcwd(),
                          "mark": os.environ.get("MARK"), "left": getattr(w, "_left_by_a_child", None),
                          "torch": "torch" in sys.modules, "threads": len(os.listdir("/proc/self/task"))}))
        w._left_by_a_child = os.environ.get("MARK")       # must not reach the next child
        sys.exit(int(os.environ.get("CODE", "0")))
    """)
    seen = []
    for mark, code in (("first", 0), ("second", 3)):
        rc, log = _run(server, tmp_path, probe, MARK=mark, CODE=str(code))
        assert rc == code, log
        seen.append(json.loads(log.strip().splitlines()[-1]))
        (tmp_path / "probe" / "worker.log").unlink()
    a, b = seen
    assert a["mark"] == "first" and b["mark"] == "second"
    assert a["left"] is None and b["left"] is None          # no state from one child in the next
    assert a["pid"] != b["pid"] and a["sid"] == a["pid"] and b["sid"] == b["pid"]   # own sessions
    assert a["ppid"] == b["ppid"] == server.proc.pid
    assert a["cwd"] == str(tmp_path / "probe")
    assert a["torch"]                                          # the imports were done before the fork
    assert a["threads"] == 1                                   # forked from a process without threads


def test_a_crash_and_a_hang_cost_only_their_own_worker(server, tmp_path):
    crash = _script(tmp_path, "crash", "import os, signal; print('going'); os.kill(os.getpid(), signal.SIGSEGV)\n")
    rc, log = _run(server, tmp_path, crash)
    assert rc == -signal.SIGSEGV and "going" in log
    hang = _script(tmp_path, "hang", """
        import subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        open("grandchild.pid", "w").write(str(child.pid))
        time.sleep(600)
    """)
    t = time.monotonic()
    rc, _ = _run(server, tmp_path, hang, wall=5)
    assert rc is None and time.monotonic() - t < 30            # past its wall time: killed, reported
    grandchild = int((tmp_path / "hang" / "grandchild.pid").read_text())
    for _ in range(50):                                        # its whole session went with it
        if not Path(f"/proc/{grandchild}").exists() or "Z" in Path(f"/proc/{grandchild}/stat").read_text().split()[2]:
            break
        time.sleep(0.1)
    else:
        pytest.fail("the hung worker's child outlived its session")
    ok = _script(tmp_path, "ok", "print('still serving')\n")
    assert _run(server, tmp_path, ok) == (0, "still serving\n")


def test_workers_die_with_the_server_and_the_server_with_the_run(tmp_path):
    """Kill the grading run's stand-in: the server dies (PDEATHSIG), and its busy worker with it."""
    hang = _script(tmp_path, "hang", "import os, time; open('pid', 'w').write(str(os.getpid())); time.sleep(600)\n")
    (tmp_path / "hang").mkdir()
    driver = _script(tmp_path, "driver", f"""
        import os, sys, threading
        sys.path.insert(0, {str(REPO)!r})
        from autograder.forkserver import ForkServer
        from autograder.grade import _set_pdeathsig
        s = ForkServer(dict(os.environ, PYTHONPATH={str(REPO)!r}), preexec_fn=_set_pdeathsig)
        print(s.proc.pid, flush=True)
        s.run({str(hang)!r}, {str(tmp_path / 'hang' / 'log')!r}, {str(tmp_path / 'hang')!r}, dict(os.environ), 600,
              script=True)
    """)
    proc = subprocess.Popen([sys.executable, str(driver)], stdout=subprocess.PIPE, text=True, env=_env())
    server_pid = int(proc.stdout.readline())
    pid_file = tmp_path / "hang" / "pid"
    for _ in range(300):
        if pid_file.exists() and pid_file.read_text():
            break
        time.sleep(0.1)
    worker = int(pid_file.read_text())
    proc.kill()
    proc.wait()

    def gone(pid):
        try:
            return "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]
        except FileNotFoundError:
            return True
    for _ in range(100):
        if gone(server_pid) and gone(worker):
            break
        time.sleep(0.1)
    assert gone(server_pid), "the fork server outlived the grading run"
    assert gone(worker), "a forked worker outlived its fork server"


def test_a_dead_server_is_an_error_before_the_fork_only(server, tmp_path):
    """Before a worker is forked, a dead server raises (the pool starts that worker as a plain process);
    once forked, the worker is never started a second time."""
    os.kill(server.proc.pid, signal.SIGKILL)
    server.proc.wait()
    ok = _script(tmp_path, "ok", "print('x')\n")
    with pytest.raises(ForkServerError):
        _run(server, tmp_path, ok)


def test_a_dask_worker_keeps_one_server_that_outlives_the_task_thread_that_started_it(tmp_path, monkeypatch):
    """A Dask worker's tasks share one fork server (autograder.cluster.worker_fork_server). The task
    thread that starts it may end (Dask's threads come and go), and PR_SET_PDEATHSIG would kill a
    server started from that thread: it must still serve afterwards. New code on disk gets a new server,
    and the old one exits once its workers are done; AUTOGRADER_FORK_SERVER=0 gives none."""
    import threading
    from autograder import cluster
    monkeypatch.setattr(cluster, "_SERVER", {})
    got = []
    t = threading.Thread(target=lambda: got.append(cluster.worker_fork_server("digest-1")))
    t.start()
    t.join()
    first = got[0]
    try:
        ok = _script(tmp_path, "ok", "print('served')\n")
        time.sleep(1.0)                                          # a PDEATHSIG would have fired by now
        assert first.alive(), "the server died with the short-lived thread that started it"
        assert _run(first, tmp_path, ok) == (0, "served\n")
        assert cluster.worker_fork_server("digest-1") is first   # the next task: the same server
        second = cluster.worker_fork_server("digest-2")          # the code changed on disk
        assert second is not first and second.alive()
        first.proc.wait(timeout=30)                              # detached: it exits, having no worker
        assert _run(second, tmp_path, ok) == (0, "served\n")
        monkeypatch.setenv("AUTOGRADER_FORK_SERVER", "0")
        assert cluster.worker_fork_server("digest-2") is None
    finally:
        for s in {id(x): x for x in (first, cluster._SERVER.get("server")) if x is not None}.values():
            s.close()


def test_a_dask_task_shares_the_cores_with_every_worker_on_its_machine():
    """`dask worker --nworkers 2` starts two processes that each know only their own slot: a kernel that
    took the cores over its own worker's slots used all of them twice over (its autograde stage was half
    again as slow as the local pool's in the class-scale benchmark)."""
    import logging
    from distributed import Client, LocalCluster
    from autograder import cluster
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None,
                      silence_logs=logging.ERROR) as lc, Client(lc) as client:
        seen = client.gather([client.submit(cluster._worker_threads, pure=False) for _ in range(4)])
    assert seen == [max(1, (os.cpu_count() or 1) // 2)] * 4, seen
