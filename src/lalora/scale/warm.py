"""Warm start for stage processes: a fork server that has imported torch, transformers, peft,
pandas and matplotlib once, and forks a child for each stage that ``lalora.scale.launch`` starts
(``launch.warm_start``).

A heavy stage's own start is its library imports (torch, then peft through transformers: 5-7 s
on a small CPU), paid again by every stage of a study. The server pays them once; each stage
then runs in a fork of it, in the launcher's working directory, environment, standard streams
and arguments, as ``python stages/<script> ...`` would, and the launcher exits with its status
(a signal that ends the stage ends the launcher the same way; a signal sent to the launcher is
passed to the stage; a launcher that dies takes its stage with it).

What the server holds is keyed by everything that decides it: the interpreter, the working
directory, the environment (but ``DVC_STAGE``, the launcher's start time and the shell's own
variables) and the state of
site-packages (any install or removal there changes the key). It imports third-party libraries
only, never ``lalora``: each stage imports the project's code fresh from disk, so a code change
is seen by the next stage as by a new process. A server exits after ``IDLE_S`` seconds without
a stage. Results do not depend on it: the stage's code and libraries are the same modules.

This file runs as a script for the server (``python warm.py serve SOCKET IDLE``) and imports
nothing from ``lalora``; the launcher's side is :func:`run`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PRELOAD = (
    "torch",
    "transformers",
    "peft",
    "safetensors.torch",
    "numpy",
    "yaml",
    "tqdm",
    "pandas",
    "matplotlib.pyplot",
)
IDLE_S = 120.0
IGNORED_ENV = frozenset({"DVC_STAGE", "LALORA_LAUNCH_START", "PWD", "OLDPWD", "SHLVL", "_"})
FORWARDED = ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2")
_HEADER = struct.Struct("!Q")


def key(cwd: str, env: dict[str, str]) -> str:
    """The server's key: interpreter, this file, working directory, environment and the state of
    site-packages."""
    import site
    import sysconfig

    dirs = {*site.getsitepackages(), sysconfig.get_paths()["purelib"]}
    if site.ENABLE_USER_SITE:
        dirs.add(site.getusersitepackages())
    state = sorted((d, os.stat(d).st_mtime_ns) for d in dirs if os.path.isdir(d))
    blob = json.dumps(
        {
            "python": [sys.executable, sys.version],
            "server": hashlib.sha256(Path(__file__).read_bytes()).hexdigest(),
            "cwd": os.path.realpath(cwd),
            "env": sorted((k, v) for k, v in env.items() if k not in IGNORED_ENV),
            "site": state,
        }
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def socket_path(k: str) -> Path:
    """Where the server of key ``k`` listens (a folder of this user's, mode 0700)."""
    folder = Path(os.environ.get("LALORA_WARM_DIR") or tempfile.gettempdir())
    folder = folder / f"lalora-warm-{os.getuid()}"
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    return folder / f"{k}.sock"


# --- the launcher's side ---------------------------------------------------------------------


def _connect(path: Path) -> socket.socket | None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
    except OSError:
        sock.close()
        return None
    return sock


def _start(path: Path, env: dict[str, str], cwd: str) -> socket.socket | None:
    """Connect to the server at ``path``, starting it first if none answers (one starter at a
    time: a file lock beside the socket)."""
    from filelock import FileLock

    with FileLock(str(path) + ".lock"):
        sock = _connect(path)
        if sock is not None:
            return sock
        path.unlink(missing_ok=True)
        log = open(str(path) + ".log", "ab")  # noqa: SIM115 (the server's, closed here)
        server = subprocess.Popen(
            [sys.executable, __file__, "serve", str(path), str(IDLE_S)],
            cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
            start_new_session=True,
        )  # fmt: skip
        log.close()
        while server.poll() is None:
            if path.exists() and (sock := _connect(path)) is not None:
                return sock
            time.sleep(0.05)
    return None


def _recv_line(sock: socket.socket) -> str:
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(1)
        if not chunk:
            raise ConnectionError("the warm-start server closed the connection")
        data += chunk
    return data.decode().strip()


def run(argv: list[str], env: dict[str, str], cwd: str | None = None) -> int | None:
    """Run ``python argv...`` in a fork of the warm server for ``cwd`` and ``env``; the stage's
    wait status as :func:`os.waitstatus_to_exitcode` gives it (negative: the signal that ended
    it), or None where no server could take it (nothing ran: start it as a process)."""
    import signal

    cwd = cwd or os.getcwd()
    path = socket_path(key(cwd, env))
    if len(str(path)) > 100:  # AF_UNIX paths are limited to 108 bytes
        return None
    sock = _start(path, env, cwd)
    if sock is None:
        return None
    with sock:
        payload = json.dumps({"argv": argv, "env": env, "cwd": cwd}).encode()
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            socket.send_fds(sock, [_HEADER.pack(len(payload))], [0, 1, 2])
            sock.sendall(payload)
            pid = int(_recv_line(sock).removeprefix("pid "))
        except (OSError, ValueError):
            return None

        def forward(signum, _frame):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

        for name in FORWARDED:
            signal.signal(getattr(signal, name), forward)
        status = int(_recv_line(sock).removeprefix("exit "))
        for name in FORWARDED:
            signal.signal(getattr(signal, name), signal.SIG_DFL)
    return os.waitstatus_to_exitcode(status)


def exit_as(code: int) -> None:
    """End this process as the stage ended: its exit code, or the signal that killed it."""
    import signal

    if code < 0:
        if -code not in (signal.SIGKILL, signal.SIGSTOP):
            signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    sys.exit(code)


# --- the server ------------------------------------------------------------------------------


def _recv_exact(conn: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            raise ConnectionError("short request")
        data += chunk
    return data


def _child(conn: socket.socket, request: dict, fds: list[int]) -> None:
    """In the fork: become ``python argv...`` and exit with its status (never returns)."""
    import atexit
    import runpy
    import signal
    import threading
    import traceback

    code = 1
    try:
        conn.close()
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for name in ("SIGTERM", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGCHLD"):
            signal.signal(getattr(signal, name), signal.SIG_DFL)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        if not os.environ.get("PYTHONUNBUFFERED"):
            sys.stdout.reconfigure(line_buffering=os.isatty(1))
        script = request["argv"][0]
        sys.argv = list(request["argv"])
        sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
        try:
            runpy.run_path(script, run_name="__main__")
            code = 0
        except SystemExit as err:
            if err.code is None or isinstance(err.code, int):
                code = err.code or 0
            else:
                print(err.code, file=sys.stderr)
                code = 1
        except KeyboardInterrupt:
            traceback.print_exc()
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            sys.stderr.flush()
            os.kill(os.getpid(), signal.SIGINT)
        except BaseException as err:
            tb = err.__traceback__  # from the script's own frames on, as python would print it
            while tb is not None and tb.tb_frame.f_code.co_filename != script:
                tb = tb.tb_next
            traceback.print_exception(type(err), err, tb or err.__traceback__)
            code = 1
        threading._shutdown()
        atexit._run_exitfuncs()
    except BaseException:  # the set-up above failed: say why on the stage's stderr
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)


def _accept(listener: socket.socket, running: dict[int, socket.socket]) -> None:
    """Read one launcher's request (its fds 0-2, cwd, environment, argv) and fork its stage;
    ``running`` maps the child's pid to the launcher's connection."""
    conn, _ = listener.accept()
    try:
        conn.settimeout(30)
        head, fds, _, _ = socket.recv_fds(conn, _HEADER.size, 3)
        (n,) = _HEADER.unpack(head)
        request = json.loads(_recv_exact(conn, n))
        conn.settimeout(None)
    except (OSError, ValueError, struct.error):
        conn.close()
        return
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        listener.close()
        for other in running.values():
            other.close()
        _child(conn, request, fds)
    for fd in fds:
        os.close(fd)
    running[pid] = conn
    conn.sendall(f"pid {pid}\n".encode())


def _reap(running: dict[int, socket.socket]) -> bool:
    """Send each finished stage's wait status to its launcher; whether any finished."""
    finished = False
    for pid, conn in list(running.items()):
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            with contextlib.suppress(OSError):
                conn.sendall(f"exit {status}\n".encode())
            conn.close()
            del running[pid]
            finished = True
    return finished


def serve(path: Path, idle_s: float) -> None:
    """Import :data:`PRELOAD`, listen at ``path`` and fork a child per request until ``idle_s``
    seconds pass with no stage running; give up the socket if another server replaced it."""
    import importlib
    import select
    import signal

    for name in PRELOAD:
        importlib.import_module(name)
    assert not any(m == "lalora" or m.startswith("lalora.") for m in sys.modules)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    staging = path.with_name(f"{path.name}.{os.getpid()}")
    listener.bind(str(staging))
    listener.listen(16)
    os.replace(staging, path)
    inode = path.stat().st_ino
    running: dict[int, socket.socket] = {}
    last = time.monotonic()
    while True:
        ready, _, _ = select.select([listener, *running.values()], [], [], 0.2)
        for sock in ready:
            if sock is listener:
                _accept(listener, running)
            else:  # the launcher went away (it only reads): its stage goes too
                pid = next(p for p, c in running.items() if c is sock)
                os.kill(pid, signal.SIGKILL)
        if _reap(running):
            last = time.monotonic()
        replaced = not path.exists() or path.stat().st_ino != inode
        if not running and (replaced or time.monotonic() - last > idle_s):
            break
    listener.close()
    if not replaced:
        path.unlink(missing_ok=True)


if __name__ == "__main__":
    # run as a script: its own folder (src/lalora) must not shadow a library's modules
    sys.path.pop(0)
    if len(sys.argv) != 4 or sys.argv[1] != "serve":
        sys.exit("usage: python warm.py serve SOCKET IDLE_SECONDS")
    serve(Path(sys.argv[2]), float(sys.argv[3]))
