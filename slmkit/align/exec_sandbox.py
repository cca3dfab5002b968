"""Run jobs on completed Python functions in a separate, limited process: the sandbox of ``python-exec``.

:func:`run_jobs` (the caller's side) starts ``python -I -S`` on a fresh temporary directory and hands it a
batch of jobs; the child (:func:`child_main`) judges each with :mod:`slmkit.align.exec_judge` and reports
one verdict per job on a private channel. The child imports this module and the judge from the package
directory, then takes that directory off ``sys.path``: the judged code sees the standard library only.

What the sandbox does (it protects the caller from accidents and runaway code; it is not a security boundary
against code written to escape it): a new session (process group), a fresh temporary working directory and a
minimal environment; limits on address space (``memory_mb``), CPU seconds, file size and open files; per
call a wall-clock timer that raises, and re-fires until the child ends itself if the code swallows it; a
watchdog in the caller that kills the group when no progress arrives for ``timeout + grace`` seconds (code
stuck in C); process creation, signals, network connections, and deleting, renaming or writing files outside
the working directory raise ``PermissionError``; ``print`` and file descriptors 0/1 go nowhere. A child that
dies (``os._exit``, a crash, a limit) fails the job it was running with the reason, and a new child takes
the remaining jobs. The caller never sees an exception from a job.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time

DEFAULT_TIMEOUT = 1.0  # seconds per call of the judged function
DEFAULT_MEMORY_MB = 1024
DEFAULT_GRACE = 10.0  # seconds of silence beyond the call timeout before the parent kills the child


# == parent ================================================================================================

_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_LAUNCH = (f"import sys; sys.path.append({_PACKAGE_ROOT!r}); import importlib; "
           f"importlib.import_module({__name__!r}).child_main({_PACKAGE_ROOT!r})")


def run_jobs(jobs: list[dict], *, timeout: float = DEFAULT_TIMEOUT, memory_mb: int = DEFAULT_MEMORY_MB,
             grace: float = DEFAULT_GRACE) -> list[dict]:
    """One result dict per job (``passed``, ``score``, ``reason``; ``prepare`` jobs: ``cases``, ``decidable``,
    ``reason``), in order. Runs the jobs in as few child processes as crashes allow."""
    results: list[dict | None] = [None] * len(jobs)
    pending = list(range(len(jobs)))
    while pending:
        _run_child(jobs, pending, results, timeout, memory_mb, grace)
        pending = [i for i in pending if results[i] is None]
    return results  # type: ignore[return-value]


def failure(reason: str, op: str) -> dict:
    if op == "prepare":
        return {"cases": 0, "decidable": False, "reason": reason}
    return {"passed": False, "score": 0.0, "reason": reason}


def _run_child(jobs, pending, results, timeout, memory_mb, grace) -> None:
    work = tempfile.mkdtemp(prefix="slmkit-exec-")
    cwd = os.path.join(work, "cwd")
    os.mkdir(cwd)
    nonce = os.urandom(8).hex()
    header = {"nonce": nonce, "timeout": timeout, "memory_mb": memory_mb, "cwd": cwd,
              "cpu_seconds": int(30 + 20 * timeout * len(pending)), "jobs": [[i, jobs[i]] for i in pending]}
    env = {"PATH": os.defpath, "HOME": cwd, "TMPDIR": cwd, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
    current = None
    try:
        with open(os.path.join(work, "stderr"), "w+b") as err:
            proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", _LAUNCH], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, stderr=err, cwd=cwd, env=env, start_new_session=True)
            try:
                proc.stdin.write(json.dumps(header).encode())
                proc.stdin.close()
            except OSError:
                pass  # the child died at once; its exit status says why
            current, killed = _read_messages(proc, nonce, results, timeout + grace)
            try:
                proc.wait(timeout=timeout + grace)
            except subprocess.TimeoutExpired:  # it closed its verdict channel but goes on
                _kill_group(proc)
                proc.wait()
                killed = killed or "the function closed the sandbox's verdict channel; the process was killed"
            err.seek(0, os.SEEK_END)
            err.seek(max(0, err.tell() - 2000))
            tail = err.read().decode("utf-8", "replace").strip().splitlines()
        why = killed or _exit_reason(proc.returncode, tail)
        if current is not None and results[current] is None:
            results[current] = failure(why, jobs[current]["op"])
        if all(results[i] is None for i in pending):  # no progress at all: the sandbox itself fails
            for i in pending:
                results[i] = failure(f"the sandbox process failed: {why}", jobs[i]["op"])
        # Jobs still without a verdict run in the next child.
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _read_messages(proc, nonce: str, results: list, silence: float) -> tuple[int | None, str | None]:
    """Read the child's messages until it closes its end; returns (job running at the end, kill reason)."""
    fd, buf, current = proc.stdout.fileno(), b"", None
    deadline = time.monotonic() + silence
    prefix = nonce.encode()
    while True:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            _kill_group(proc)
            return current, (f"no progress for {silence:.0f} s (stuck outside Python code, e.g. a huge "
                             "arithmetic or a regular expression); the sandbox process was killed")
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            return current, None
        deadline = time.monotonic() + silence
        buf += chunk
        *lines, buf = buf.split(b"\n")
        for line in lines:
            if not line.startswith(prefix):
                continue
            try:
                msg = json.loads(line[len(prefix):])
            except ValueError:
                continue
            if "start" in msg:
                current = msg["start"]
            elif "done" in msg:
                results[msg["done"]] = msg["result"]
                current = None


def _kill_group(proc) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()


def _exit_reason(code: int | None, stderr_tail: list[str]) -> str:
    last = f" ({stderr_tail[-1][:200]})" if stderr_tail else ""
    if code is None:
        return "the sandbox process did not exit"
    if code < 0:
        sig = signal.Signals(-code).name if -code in signal.valid_signals() else str(-code)
        what = {"SIGXCPU": "it ran out of CPU time", "SIGSEGV": "it crashed (segmentation fault)",
                "SIGKILL": "it was killed (out of memory?)", "SIGABRT": "it aborted"}.get(sig, "")
        return f"the sandbox process died of {sig}" + (f": {what}" if what else "") + last
    return f"the sandbox process exited with code {code} while running this function{last}"


# == child =================================================================================================

class _CallTimeout(BaseException):
    """Raised in the child when a call runs past its time (a BaseException: `except Exception` cannot eat it)."""


class _Sink:
    """Where print() goes in the child: nowhere."""

    encoding = "utf-8"

    def write(self, text):
        return len(text)

    def writelines(self, lines):
        pass

    def flush(self):
        pass

    def isatty(self):
        return False


_state = {"proto": -1, "nonce": "", "job": None, "op": "judge", "fires": 0, "armed": False}


def _send(msg: dict) -> None:
    os.write(_state["proto"], (_state["nonce"] + json.dumps(msg) + "\n").encode())


def _on_alarm(signum, frame):
    if not _state["armed"]:  # delivered just after the call returned
        return
    _state["fires"] += 1
    if _state["fires"] > 20:  # the code swallowed the timeout for two seconds: give up on this child
        _send({"done": _state["job"], "result": failure(
            "timed out, and the function caught the timeout and went on; the sandbox process ended itself",
            _state["op"])})
        os._exit(0)
    raise _CallTimeout()


def timed_call(fn, timeout: float):
    """fn() under a wall-clock limit (the timer re-fires every 0.1 s until the call gives up)."""
    _send({"beat": _state["job"]})
    _state.update(fires=0, armed=True)
    signal.setitimer(signal.ITIMER_REAL, timeout, 0.1)
    try:
        return fn()
    finally:
        _state["armed"] = False
        signal.setitimer(signal.ITIMER_REAL, 0)


def _set_limits(memory_mb: int, cpu_seconds: int) -> None:
    import resource

    def lower(which, soft, hard=None):
        old_hard = resource.getrlimit(which)[1]
        hard = soft if hard is None else hard
        if old_hard != resource.RLIM_INFINITY:
            soft, hard = min(soft, old_hard), min(hard, old_hard)
        resource.setrlimit(which, (soft, hard))

    lower(resource.RLIMIT_AS, memory_mb << 20)
    lower(resource.RLIMIT_CPU, cpu_seconds, cpu_seconds + 5)  # SIGXCPU, then SIGKILL
    lower(resource.RLIMIT_FSIZE, 16 << 20)
    lower(resource.RLIMIT_CORE, 0)
    lower(resource.RLIMIT_NOFILE, 64)
    if os.getuid() != 0:  # the kernel does not apply it to root; the guards below still stop fork
        lower(resource.RLIMIT_NPROC, 0)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the size limit raises instead of killing


def _denied(what: str):
    def deny(*args, **kwargs):
        raise PermissionError(f"{what} is not allowed in the sandbox")
    return deny


def _install_guards(cwd: str) -> None:
    """Process creation, signals and network raise; file changes outside ``cwd`` raise."""
    import builtins
    import io
    import socket
    import subprocess as sp

    root = os.path.realpath(cwd)

    def inside(path) -> bool:
        if isinstance(path, int):
            return True
        real = os.path.realpath(os.fsdecode(os.fspath(path)))
        return real == root or real.startswith(root + os.sep)

    def paths_inside(fn, what: str, n_paths: int):
        def guarded(*args, **kwargs):
            if not all(inside(p) for p in args[:n_paths]):
                raise PermissionError(f"{what} outside the sandbox directory is not allowed")
            return fn(*args, **kwargs)
        return guarded

    for name in ("system", "popen", "fork", "forkpty", "kill", "killpg", "setuid", "setgid", "posix_spawn",
                 "posix_spawnp", "execv", "execve", "execl", "execle", "execlp", "execlpe", "execvp", "execvpe",
                 "spawnv", "spawnve", "spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnvp", "spawnvpe"):
        if hasattr(os, name):
            setattr(os, name, _denied(f"os.{name}"))
    for name, n in (("remove", 1), ("unlink", 1), ("rmdir", 1), ("removedirs", 1), ("truncate", 1),
                    ("chmod", 1), ("chown", 1), ("lchown", 1), ("rename", 2), ("renames", 2), ("replace", 2),
                    ("link", 2), ("symlink", 2), ("mkdir", 1), ("makedirs", 1)):
        if hasattr(os, name):
            setattr(os, name, paths_inside(getattr(os, name), f"os.{name}", n))
    shutil.rmtree = paths_inside(shutil.rmtree, "shutil.rmtree", 1)
    shutil.move = paths_inside(shutil.move, "shutil.move", 2)
    sp.Popen = _denied("subprocess")  # run, call and check_output all create a Popen
    try:
        import _posixsubprocess

        _posixsubprocess.fork_exec = _denied("subprocess")
    except ImportError:
        pass
    for name in ("connect", "connect_ex", "bind", "sendto", "sendmsg"):
        setattr(socket.socket, name, _denied("network access"))
    socket.getaddrinfo = _denied("network access")
    real_open, real_os_open = builtins.open, os.open

    def guarded_open(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+") and not inside(file):
            raise PermissionError(f"writing {file!r} outside the sandbox directory is not allowed")
        return real_open(file, mode, *args, **kwargs)

    def guarded_os_open(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND) and not inside(path):
            raise PermissionError(f"writing {path!r} outside the sandbox directory is not allowed")
        return real_os_open(path, flags, *args, **kwargs)

    builtins.open = io.open = guarded_open
    os.open = guarded_os_open


def child_main(package_root: str) -> None:
    """The child: read the jobs, put up limits and guards, judge each job, report each verdict."""
    proto = os.dup(1)  # the verdict channel; fd 0 and 1 then read and write nothing
    devnull = os.open(os.devnull, os.O_RDWR)
    header = json.loads(sys.stdin.buffer.read())
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    _state.update(proto=proto, nonce=header["nonce"])
    from . import exec_judge  # with everything it imports, before the guards go up

    sys.path.remove(package_root)  # the judged code imports from the standard library only
    import warnings

    warnings.simplefilter("ignore")
    _set_limits(header["memory_mb"], header["cpu_seconds"])
    _install_guards(header["cwd"])
    sys.stdout = sys.stderr = _Sink()
    sys.stdin = None
    signal.signal(signal.SIGALRM, _on_alarm)
    for i, job in header["jobs"]:
        _state.update(job=i, op=job["op"])
        _send({"start": i})
        try:
            result = exec_judge.run_job(job, header["timeout"])
        except BaseException as e:  # noqa: BLE001 - every job ends in a verdict
            result = failure(exec_judge.exception_text(e), job["op"])
        _send({"done": i, "result": result})
