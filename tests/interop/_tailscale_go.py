"""Tailscale's ``derper`` and ``derpprobe``, built with ``go install`` at a pinned version, for interop tests.

The binaries go to ``$TAILPY_CACHE_DIR/go-bin/<version>/`` (default ``~/.cache/tailpy/go-bin/<version>/``), so
the build (about a minute on 2 cores with an empty Go cache) happens once per machine; later runs find the
binaries there. ``GOFLAGS=-mod=mod``; ``GOPROXY`` is whatever the environment says; ``GOTOOLCHAIN=local`` so
that Go never tries to download another toolchain. The version is pinned to one whose ``go.mod`` asks for a
Go no newer than the machine's (tailscale.com v1.102.3 needs go >= 1.26.6).

:func:`build_tailscale_tools` returns the two paths, or a one-sentence reason to skip. :class:`Derper` runs
derper on 127.0.0.1 (plain HTTP, no certificates, no STUN) and kills it by pid when done, pass or fail.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

TAILSCALE_VERSION = "v1.102.3"
BUILD_TIMEOUT = 900.0  # seconds; a cold build with module downloads takes about a minute on 2 cores


@dataclass(frozen=True)
class GoTools:
    derper: Path
    derpprobe: Path
    version: str
    build_seconds: float  # 0.0 when both came from the cache


def cache_dir(version: str = TAILSCALE_VERSION) -> Path:
    root = os.environ.get("TAILPY_CACHE_DIR") or os.path.join(Path.home(), ".cache", "tailpy")
    return Path(root) / "go-bin" / version


@contextlib.contextmanager
def build_lock(directory: Path) -> Iterator[None]:
    """Hold an exclusive flock(2) on ``<directory>/.build.lock``: one build at a time per output directory,
    across processes (parallel test workers, a benchmark), so a second builder waits and then finds the
    binaries in the cache instead of building them again beside the first."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _last_error_line(output: str) -> str:
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    for line in reversed(lines):
        if "error" in line.lower() or line.startswith(("go:", "#")) or ": " in line:
            return line[:300]
    return lines[-1][:300] if lines else "no output"


def build_tailscale_tools(version: str = TAILSCALE_VERSION) -> GoTools | str:
    """Build (or find in the cache) derper and derpprobe at ``version``: GoTools, or a reason to skip.
    Concurrent callers (in several processes) build once: the others wait on :func:`build_lock`."""
    out = cache_dir(version)
    derper, derpprobe = out / "derper", out / "derpprobe"

    with build_lock(out):  # a binary another process is still writing is never taken for a built one
        if all(b.is_file() and os.access(b, os.X_OK) for b in (derper, derpprobe)):
            return GoTools(derper, derpprobe, version, 0.0)
        go = shutil.which("go")
        if go is None:
            return "no Go toolchain ('go' is not on PATH) to build Tailscale's derper and derpprobe"
        return _go_install(go, out, version)


def _go_install(go: str, out: Path, version: str) -> GoTools | str:
    derper, derpprobe = out / "derper", out / "derpprobe"
    env = dict(os.environ)
    env.update(GOBIN=str(out), GOFLAGS="-mod=mod", GOTOOLCHAIN="local", CGO_ENABLED="0")
    start = time.monotonic()
    try:
        proc = subprocess.run(
            [go, "install", f"tailscale.com/cmd/derper@{version}", f"tailscale.com/cmd/derpprobe@{version}"],
            env=env,
            cwd=out,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=BUILD_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return f"building Tailscale's derper {version} with go install took over {BUILD_TIMEOUT:g} s"
    elapsed = time.monotonic() - start
    if proc.returncode != 0 or not derper.is_file() or not derpprobe.is_file():
        return f"go install of Tailscale's derper/derpprobe {version} failed: {_last_error_line(proc.stderr)}"
    return GoTools(derper, derpprobe, version, elapsed)


def free_tcp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Wait until ``url`` answers any HTTP status; RuntimeError on timeout or if ``proc`` exits first."""
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with status {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=1.0):
                return
        except urllib.error.HTTPError:
            return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not answer within {timeout:g} s")
        time.sleep(0.1)


def wait_tcp(port: int, proc: subprocess.Popen[bytes], timeout: float) -> None:
    """Wait until 127.0.0.1:``port`` accepts TCP; RuntimeError on timeout or if ``proc`` exits first."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with status {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"nothing listened on 127.0.0.1:{port} within {timeout:g} s") from None
            time.sleep(0.1)


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 5.0) -> None:
    """SIGTERM, then SIGKILL, to this one pid (only processes the tests started)."""
    if proc.poll() is None:
        try:
            os.kill(proc.pid, signal.SIGTERM)
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=timeout)
        except ProcessLookupError:
            pass


class Derper:
    """Tailscale's derper on 127.0.0.1:<free port>, plain HTTP (a port other than 443 and certmode other
    than manual means no TLS), STUN off, the HTTP-80 listener off, its key in ``state_dir``."""

    def __init__(
        self,
        binary: Path,
        state_dir: Path,
        extra_args: list[str] | None = None,
        env: dict[str, str] | None = None,
        port: int | None = None,
    ) -> None:
        self.binary = binary
        self.state_dir = state_dir
        self.extra_args = list(extra_args or [])
        self.env = env
        self.port = port or free_tcp_port()
        self.log_path = state_dir / "derper.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/derp"

    def start(self, timeout: float = 20.0) -> Derper:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [
                    str(self.binary),
                    "-a",
                    f"127.0.0.1:{self.port}",
                    "-http-port=-1",
                    "-stun=false",
                    "-home=blank",
                    "-c",
                    str(self.state_dir / "derper.key"),
                    *self.extra_args,
                ],
                env=None if self.env is None else {**os.environ, **self.env},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.state_dir,
            )
        try:
            wait_http(f"http://127.0.0.1:{self.port}/generate_204", timeout, self.proc)
        except RuntimeError as exc:
            self.stop()
            raise RuntimeError(f"derper did not start: {exc}; log: {self.log_tail()}") from None
        return self

    def log_tail(self, n: int = 10) -> str:
        try:
            return " | ".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)

    def __enter__(self) -> Derper:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
