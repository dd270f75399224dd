"""The role template: one preloaded process per daemon that forks the role processes, so that
the interpreter and the libraries every role imports (numpy, pyarrow, pyzmq, Pillow, tokenizers,
fabricd itself: about 40 MB of private memory per process when each role imports them on its own)
are shared copy-on-write instead of paid once per role.

Two sides, one module:

* :func:`serve` runs in the template process (``python -m fabricd.roles.template --fd N``,
  started by :class:`RoleTemplate`). It imports the role modules, creates no zmq context and
  no thread (pyarrow's jemalloc background thread and OpenBLAS's pool are turned off through
  the environment, see :data:`MEMORY_ENV`), collects and freezes the garbage collector's
  objects (``gc.freeze()``: the collector then never writes to the shared pages), says
  ``ready``, and forks a role per request on its control socket.
* :class:`RoleTemplate` is the daemon's handle on it: starts it, asks it for a role, stops it.

A role is forked *twice* (the template forks an intermediate that forks the role and exits at
once), and the daemon is a child subreaper (``PR_SET_CHILD_SUBREAPER``), so the orphaned role
is re-parented to the daemon: it is the daemon's own child, exactly as a spawned role, and the
supervisor waits for it, restarts it and kills it by pid (:class:`ForkedRole`); the template
dying does not touch running roles. The role arms its parent-death signal only once its parent
is the daemon (arming it earlier would fire when the intermediate exits), then runs
``fabricd.roles.__main__.main`` exactly as ``python -m fabricd.roles ARGS_JSON`` would; it
checks, as a spawned role does, that its parent is still the daemon, so a role never outlives
the daemon. The template itself dies with the daemon (parent-death signal, and end of file on
its control socket).

Wire (newline-delimited JSON on a Unix stream socket pair): the template sends
``{"ready": true}`` once, then answers each ``{"args": ARGS_JSON}`` with ``{"pid": N}`` or
``{"error": REASON}``.
"""

from __future__ import annotations

import ctypes
import gc
import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping

from .base import PROCESS_NAMES, RoleArgs, set_parent_death_signal, set_process_name

__all__ = ["RoleTemplate", "ForkedRole", "TemplateError", "MEMORY_ENV", "PRELOAD", "serve"]

log = logging.getLogger(__name__)

#: Set (unless the operator set them) in the environment of the template and of every role:
#: Arrow's system allocator returns freed memory where its default (mimalloc) keeps 15 to 30 MB
#: per process that reads Parquet; no jemalloc background thread and no OpenBLAS thread pool
#: (roles do no linear algebra), so the template is single-threaded when it forks.
MEMORY_ENV = {"ARROW_DEFAULT_MEMORY_POOL": "system", "JE_ARROW_MALLOC_CONF": "background_thread:false",
              "OPENBLAS_NUM_THREADS": "1"}

#: What the template imports before it forks: both roles and what they import lazily while
#: serving (a module missing here is imported by the role itself, privately; optional ones may
#: be absent).
PRELOAD = ("fabricd.roles.__main__", "fabricd.roles.source_loader", "fabricd.roles.constructor", "fabricd.roles.memory_probe",
           "fabricd.text.hf", "tokenizers", "pyarrow.dataset", "pyarrow.parquet", "pyarrow.ipc", "numpy.ma",
           "PIL.Image", "PIL.JpegImagePlugin", "PIL.PngImagePlugin", "PIL.GifImagePlugin", "PIL.BmpImagePlugin",
           "PIL.PpmImagePlugin", "psutil")
OPTIONAL_PRELOAD = ("fabricd.text.spm", "sentencepiece", "PIL.WebPImagePlugin")

READY_TIMEOUT_S = 60.0     # imports on a loaded machine; past it the template is given up (roles are spawned)
REQUEST_TIMEOUT_S = 5.0    # one fork; past it the template is killed and the role spawned
REPARENT_TIMEOUT_S = 5.0   # how long a new role waits for its intermediate to exit

_PR_SET_CHILD_SUBREAPER = 36


class TemplateError(Exception):
    """The template cannot fork a role now (it is gone, not ready, or answered an error)."""


def set_child_subreaper(on: bool) -> bool:
    """Make this process adopt its orphaned descendants (Linux >= 3.4); returns whether it could."""
    try:
        return ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0) == 0
    except OSError:
        return False


# -- the daemon's side ------------------------------------------------------------------------


class ForkedRole:
    """A role process the template forked, re-parented to this process: the part of
    ``subprocess.Popen``'s interface the supervisor uses, by pid (``os.waitpid``)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:  # not (or no longer) our child: nothing left to wait for
                log.error("role pid %d is not a child of this process", self.pid)
                self.returncode = -signal.SIGKILL
                return self.returncode
            if pid == self.pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = 0.0005
        while self.poll() is None:
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(f"role pid {self.pid}", timeout)
            time.sleep(delay)
            delay = min(delay * 2, 0.05)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:  # never signal a reaped pid: it may belong to someone else by now
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class RoleTemplate:
    """The daemon's handle on its template process.

    ``start(tag)`` launches it (non-blocking; ``tag`` goes on its command line, so tools that look
    for a fabric's processes by path find it); ``ready()`` says, without blocking, whether it can
    fork; ``fork(args_json)`` returns the new role's pid (a child of this process) or raises
    :class:`TemplateError`; ``stop()`` ends it by pid. The roles it forked are not its children
    and are not touched by ``stop()``.
    """

    def __init__(self, env: Callable[[], Mapping[str, str]], *, ready_timeout_s: float = READY_TIMEOUT_S,
                 request_timeout_s: float = REQUEST_TIMEOUT_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.env = env
        self.ready_timeout_s = ready_timeout_s
        self.request_timeout_s = request_timeout_s
        self.clock = clock
        self.proc: subprocess.Popen | None = None
        self.sock: socket.socket | None = None
        self._buf = b""
        self._ready = False
        self.started_at = 0.0
        self.forks = 0
        self.failures = 0          # template processes that died, timed out or refused
        self.last_error = ""
        self._subreaper = False

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, tag: str = "") -> None:
        """Launch the template unless it runs already. Raises TemplateError where forked roles
        cannot be re-parented to this process (no child subreaper)."""
        if self.running:
            return
        self._close()
        if not self._subreaper:
            if not set_child_subreaper(True):
                raise TemplateError("this system has no child subreaper (prctl PR_SET_CHILD_SUBREAPER)")
            self._subreaper = True
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            argv = [sys.executable, "-m", "fabricd.roles.template", "--fd", str(theirs.fileno()),
                    "--parent", str(os.getpid())]
            if tag:
                argv += ["--tag", tag]
            self.proc = subprocess.Popen(argv, env=dict(self.env()), stdin=subprocess.DEVNULL,
                                         pass_fds=(theirs.fileno(),))
        finally:
            theirs.close()
        self.sock = mine
        self._buf = b""
        self._ready = False
        self.started_at = self.clock()
        log.info("started the role template (pid %d)", self.proc.pid)

    def ready(self) -> bool:
        """Whether the template has said ``ready`` (never blocks). A template that died or did not
        get ready within ``ready_timeout_s`` is stopped and counted as a failure."""
        if self._ready:
            if self.running:
                return True
            self._fail(f"exited with {self.proc.returncode}")
            return False
        if self.proc is None:
            return False
        if not self.running:
            self._fail(f"exited with {self.proc.returncode} before it was ready")
            return False
        try:
            line = self._read_line(timeout=0.0)
        except TemplateError as e:
            self._fail(str(e))
            return False
        if line is not None:
            if json.loads(line).get("ready"):
                self._ready = True
                log.info("the role template (pid %d) is ready after %.1fs", self.proc.pid,
                         self.clock() - self.started_at)
                return True
            self._fail(f"said {line!r} instead of ready")
        elif self.clock() - self.started_at > self.ready_timeout_s:
            self._fail(f"not ready after {self.ready_timeout_s:.0f}s")
        return False

    @property
    def starting(self) -> bool:
        """Launched, alive, not ready yet."""
        return self.proc is not None and not self._ready and self.running

    def fork(self, args_json: str) -> int:
        """Fork a role; its pid (a child of this process). TemplateError when it cannot."""
        if not self.ready():
            raise TemplateError("the role template is not ready")
        try:
            self.sock.sendall(json.dumps({"args": args_json}).encode() + b"\n")
            line = self._read_line(timeout=self.request_timeout_s)
        except (OSError, TemplateError) as e:
            self._fail(f"fork request failed: {e}")
            raise TemplateError(self.last_error) from e
        if line is None:
            self._fail(f"no answer to a fork request within {self.request_timeout_s:.0f}s")
            raise TemplateError(self.last_error)
        reply = json.loads(line)
        if "pid" not in reply:
            raise TemplateError(f"the role template could not fork: {reply.get('error')}")
        self.forks += 1
        return int(reply["pid"])

    def stop(self, timeout: float = 5.0) -> None:
        """End the template (SIGTERM, SIGKILL after ``timeout``) and stop adopting orphans."""
        proc = self.proc
        self._close()
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._subreaper:
            set_child_subreaper(False)
            self._subreaper = False

    def status(self) -> dict:
        return {"pid": self.pid if self.running else None, "ready": self._ready and self.running,
                "forks": self.forks, "failures": self.failures, "last_error": self.last_error}

    # -- internals

    def _fail(self, reason: str) -> None:
        self.failures += 1
        self.last_error = reason
        pid = self.pid
        log.warning("role template (pid %s) failed: %s", pid, reason)
        proc = self.proc
        self._close()
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()

    def _close(self) -> None:
        if self.sock is not None:
            self.sock.close()
        self.sock = None
        self.proc = None
        self._ready = False
        self._buf = b""

    def _read_line(self, timeout: float) -> bytes | None:
        """One line from the template, waiting at most ``timeout``; None if none came."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = max(0.0, deadline - time.monotonic())
            readable, _, _ = select.select([self.sock], [], [], left)
            if not readable:
                return None
            chunk = self.sock.recv(65536)
            if not chunk:
                raise TemplateError("the role template closed its socket")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line


# -- the template's side ----------------------------------------------------------------------


def preload() -> list[str]:
    """Import what roles use; returns the optional modules that are missing."""
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)
    missing = []
    for name in OPTIONAL_PRELOAD:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    from PIL import Image

    Image.preinit()
    return missing


def warm_up() -> None:
    """Run, once and on tiny inputs, what roles run: reading Parquet with each codec, an Arrow IPC
    stream with lz4, decoding JPEG and PNG, numpy's generator. Libraries initialise much of their
    state lazily (codec tables, registries, decoder state, code pages first touched); done here,
    it is shared by every role instead of set up in each. Single-threaded: nothing here may start
    Arrow's thread pools (``use_threads=False``, no Python file objects)."""
    import io

    import numpy as np
    import pyarrow as pa
    import pyarrow.ipc
    import pyarrow.parquet as pq
    from PIL import Image

    table = pa.table({"text": ["a", "b"], "image": pa.array([b"x", b"y"], pa.binary()), "n": [1, 2]})
    for codec in ("snappy", "zstd", "lz4", "gzip", "none"):
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression=codec, use_dictionary=False)
        f = pq.ParquetFile(pa.BufferReader(sink.getvalue()), pre_buffer=False)  # a Python file would start an I/O pool
        f.read_row_group(0, use_threads=False).take(pa.array([1], pa.int64()))
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema, options=pa.ipc.IpcWriteOptions(compression="lz4",
                                                                               use_threads=False)) as w:
        w.write_table(table)
    pa.ipc.open_stream(sink.getvalue(), options=pa.ipc.IpcReadOptions(use_threads=False)).read_all()
    for fmt in ("JPEG", "PNG"):
        buf = io.BytesIO()
        Image.new("RGB", (16, 16), (9, 99, 199)).save(buf, fmt)
        with Image.open(io.BytesIO(buf.getvalue())) as img:
            np.asarray(img.convert("RGB").resize((8, 8)))
    np.random.default_rng(0).integers(0, 10, 4)


def _threads() -> int:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return 1


def serve(fd: int, parent: int) -> int:
    """The template process: preload, then fork a role per request until the daemon is gone."""
    set_process_name("fd-template")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the daemon ends it; a terminal's ^C goes to the daemon
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    set_parent_death_signal()
    if os.getppid() != parent:
        return 0
    sock = socket.socket(fileno=fd)
    missing = preload()
    try:
        warm_up()
    except Exception as e:  # an optimisation only: roles initialise what it did not
        log.warning("role template warm-up failed: %s", e)
    gc.collect()
    gc.freeze()  # the collector never touches these objects again: their pages stay shared
    if _threads() > 1:
        log.warning("the role template runs %d threads; forking it is safe only for the forking thread", _threads())
    log.debug("preloaded %d modules (optional ones missing: %s)", len(sys.modules), ", ".join(missing) or "none")
    sock.sendall(b'{"ready": true}\n')
    buf = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:  # the daemon closed its end: it is stopping or gone
            return 0
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            try:
                reply = {"pid": _fork_role(json.loads(line)["args"], sock)}
            except Exception as e:  # the daemon spawns the role instead; the template keeps serving
                reply = {"error": f"{type(e).__name__}: {e}"}
            sock.sendall(json.dumps(reply).encode() + b"\n")


def _fork_role(args_json: str, sock: socket.socket) -> int:
    """Fork an intermediate that forks the role and exits; returns the role's pid, once the
    intermediate is reaped (so the role is already re-parented to the daemon)."""
    r, w = os.pipe()
    middle = os.fork()
    if middle == 0:  # the intermediate: fork the role, say its pid, exit
        code = 1
        try:
            os.close(r)
            me = os.getpid()  # not the role's getppid(): this process may have exited by then
            role = os.fork()
            if role == 0:
                os.close(w)
                _become_role(args_json, sock, me)  # never returns
            os.write(w, str(role).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    data = b""
    while chunk := os.read(r, 64):
        data += chunk
    os.close(r)
    os.waitpid(middle, 0)
    if not data:
        raise TemplateError("the intermediate process could not fork the role")
    return int(data)


def _become_role(args_json: str, sock: socket.socket, middle: int) -> None:
    """In the forked role: drop what belongs to the template, wait to be the daemon's child, run
    the role as ``python -m fabricd.roles ARGS_JSON`` would, and exit with its code."""
    code = 1
    try:
        # named after its kind at once (top, ps, the benchmarks' process groups), not only once
        # it runs: until then it would go by the template's name
        set_process_name(PROCESS_NAMES.get(RoleArgs.from_json(args_json).kind, "fd-role"))
        sock.close()
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        deadline = time.monotonic() + REPARENT_TIMEOUT_S
        while os.getppid() == middle and time.monotonic() < deadline:
            time.sleep(0.0002)
        root = logging.getLogger()
        for h in list(root.handlers):  # the role configures its own logging
            root.removeHandler(h)
        sys.argv = ["-m", args_json]
        from .__main__ import main

        try:
            code = main(["fabricd.roles", args_json])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:
            import traceback

            traceback.print_exc()
            code = 1
        import atexit

        atexit._run_exitfuncs()  # what interpreter exit would run: the memory probe's last dump, logging
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code if isinstance(code, int) else 1)


def main(argv: list[str]) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m fabricd.roles.template")
    ap.add_argument("--fd", type=int, required=True, help="the control socket, inherited from the daemon")
    ap.add_argument("--parent", type=int, required=True, help="the daemon's pid")
    ap.add_argument("--tag", default="", help="ignored; names the daemon's state directory for tools")
    args = ap.parse_args(argv[1:])
    logging.basicConfig(level=os.environ.get("FABRICD_LOG_LEVEL", "INFO"),
                        format=f"%(asctime)s %(levelname)s [role-template pid={os.getpid()}] %(name)s: %(message)s",
                        stream=sys.stderr)
    return serve(args.fd, args.parent)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
