"""Tunnel endpoints to start on lab hosts: a bare tailpy data plane (:mod:`tailpy.lab.wgnode`) and stock
userspace WireGuard peers configured with wg(8) over their UAPI socket (wireguard-go, boringtun-cli). All are
tracked by the lab and stopped when it closes.

The throughput benchmark also compares against peers that Debian does not ship at the version it wants: the
newest wireguard-go (built with ``go install`` at a pinned pseudo-version) and boringtun-cli (built with
``cargo install --locked`` at a pinned version). :func:`wireguard_go_newest` and :func:`boringtun_cli` build
them once into :func:`bench_cache_dir` and say why when they cannot.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from tailpy.errors import LabError
from tailpy.lab.netns import Host
from tailpy.lab.procs import read_line, wait_for
from tailpy.lab.wgnode import PeerArg
from tailpy.packetfilter import FilterRule, filter_to_json

#: Where wireguard-go and boringtun put their UAPI socket (``<ifname>.sock``). It is not per network
#: namespace, so the lab names every such interface uniquely (lab prefix + host name) to let parallel labs
#: coexist.
WG_RUN_DIR = Path("/var/run/wireguard")

#: The newest wireguard-go, pinned: Go module path and pseudo-version (a commit of wireguard-go's master).
WIREGUARD_GO_MODULE = "golang.zx2c4.com/wireguard"
WIREGUARD_GO_VERSION = "v0.0.0-20260522210424-ecfc5a8d5446"
#: boringtun-cli, pinned (crates.io; built with its Cargo.lock).
BORINGTUN_CLI_VERSION = "0.7.1"
#: Debian's wireguard-go (package wireguard-go), when installed.
DEBIAN_WIREGUARD_GO = Path("/usr/bin/wireguard-go")

P = TypeVar("P", bound="UapiPeer")


def missing_tools(*tools: str) -> str | None:
    """A one-sentence reason naming the tools that are not on PATH, or None when all are there."""
    missing = [t for t in tools if shutil.which(t) is None]
    return f"not installed: {', '.join(missing)} (make deps installs them)" if missing else None


def native_device_reason() -> str | None:
    """Why ``tailpy._native.Device`` cannot be used (one sentence), or None when it can."""
    try:
        from tailpy import _native
    except ImportError as e:
        return f"tailpy._native is not built ({e}): run make build"
    if not hasattr(_native, "Device"):
        return "tailpy._native has no Device yet (this build of the extension lacks the data plane)"
    return None


def wg_keypair() -> tuple[str, str]:
    """(private, public) key in base64, from ``wg genkey`` / ``wg pubkey`` (no network involved)."""
    private = subprocess.run(["wg", "genkey"], capture_output=True, text=True, check=True).stdout.strip()
    public = subprocess.run(
        ["wg", "pubkey"], input=private, capture_output=True, text=True, check=True
    ).stdout.strip()
    return private, public


# -- peer binaries built for the benchmark ---------------------------------------------------------------


def bench_cache_dir() -> Path:
    """Where benchmark peers are built: ``$TAILPY_BENCH_CACHE``, else ``~/.cache/tailpy/bench-tools``."""
    env = os.environ.get("TAILPY_BENCH_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "tailpy" / "bench-tools"


@dataclass(frozen=True)
class Tool:
    """A peer binary for the benchmark: its path and the version it reports, or the reason there is none.

    ``version`` is what the binary says (``--version``'s first line), plus the Go module version recorded in
    the binary for wireguard-go (``go version -m``), so a report shows which build really ran."""

    name: str
    path: Path | None
    version: str = ""
    reason: str | None = None


def _first_line(args: list[str]) -> str:
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=30, check=False)
    except OSError as e:
        return f"({e})"
    return (done.stdout.strip() or done.stderr.strip() or "?").splitlines()[0]


def _go_module_version(binary: Path) -> str | None:
    """The main module's version recorded in a Go binary (``go version -m``), or None when unknown."""
    go = shutil.which("go")
    if go is None:
        return None
    done = subprocess.run([go, "version", "-m", str(binary)], capture_output=True, text=True, check=False)
    for line in done.stdout.splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[0] == "mod":
            return f"{fields[1]} {fields[2]}"
    return None


def _build(
    args: list[str], log: Path, *, cwd: Path | None = None, env: dict[str, str] | None = None
) -> str | None:
    """Run one build command, appending its output to ``log``; None on success, else a one-line reason."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as out:
        out.write(f"$ {' '.join(args)}\n")
        out.flush()
        done = subprocess.run(
            args,
            cwd=cwd,
            env={**os.environ, **(env or {})},
            stdout=out,
            stderr=subprocess.STDOUT,
            check=False,
        )
    if done.returncode == 0:
        return None
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    last = lines[-1] if lines else "no output"
    return f"`{' '.join(args)}` failed (exit {done.returncode}): {last} (log: {log})"


def wireguard_go_newest(cache: Path | None = None, *, build: bool = True) -> Tool:
    """The newest wireguard-go (:data:`WIREGUARD_GO_MODULE` at :data:`WIREGUARD_GO_VERSION`), built into
    ``<cache>/wireguard-go-<version>/bin/wireguard`` when missing and ``build`` is true.

    Built with ``go install module@version``; when that is refused, with ``go mod download`` of that exact
    version and ``go build`` in its folder. Never raises for a missing toolchain or a failed build: the
    returned :class:`Tool` has no path and says why."""
    name = "wireguard-go-newest"
    root = (cache or bench_cache_dir()) / f"wireguard-go-{WIREGUARD_GO_VERSION}"
    binary = root / "bin" / "wireguard"
    if not binary.exists():
        if not build:
            return Tool(
                name, None, reason=f"not built ({binary}): `make bench` or `throughput.py --build-tools`"
            )
        go = shutil.which("go")
        if go is None:
            return Tool(name, None, reason="go (the Go toolchain, 1.23 or newer) is not on PATH")
        log = root / "build.log"
        spec = f"{WIREGUARD_GO_MODULE}@{WIREGUARD_GO_VERSION}"
        error = _build([go, "install", spec], log, env={"GOBIN": str(binary.parent)})
        if error:
            error = _build_in_module_folder(go, spec, binary, log)
        if error:
            return Tool(name, None, reason=error)
    module = _go_module_version(binary)
    stamp = root / "built-from"  # written by the go mod download path, whose binary says "(devel)"
    if stamp.exists() and (module is None or "(devel)" in module):
        module = stamp.read_text().strip()
    version = _first_line([str(binary), "--version"]) + (f" ({module})" if module else "")
    return Tool(name, binary, version)


def _build_in_module_folder(go: str, spec: str, binary: Path, log: Path) -> str | None:
    """``go mod download -json spec``, then ``go build -o binary .`` in the downloaded module's folder."""
    with log.open("a") as out:
        out.write(f"$ {go} mod download -json {spec}\n")
    done = subprocess.run([go, "mod", "download", "-json", spec], capture_output=True, text=True, check=False)
    with log.open("a") as out:
        out.write(done.stdout + done.stderr)
    if done.returncode != 0:
        return f"`go install {spec}` and `go mod download {spec}` failed (log: {log})"
    folder = Path(json.loads(done.stdout)["Dir"])
    error = _build([go, "build", "-o", str(binary), "."], log, cwd=folder)
    if error is None:
        (binary.parent.parent / "built-from").write_text(spec.replace("@", " ") + "\n")
    return error


def boringtun_cli(cache: Path | None = None, *, build: bool = True) -> Tool:
    """boringtun-cli :data:`BORINGTUN_CLI_VERSION`, built into ``<cache>/boringtun-cli-<version>/bin`` with
    ``cargo install boringtun-cli --version V --locked --root ...`` when missing and ``build`` is true.
    Never raises for a missing toolchain or a failed build: the returned :class:`Tool` says why."""
    name = "boringtun-cli"
    root = (cache or bench_cache_dir()) / f"boringtun-cli-{BORINGTUN_CLI_VERSION}"
    binary = root / "bin" / "boringtun-cli"
    if not binary.exists():
        if not build:
            return Tool(
                name, None, reason=f"not built ({binary}): `make bench` or `throughput.py --build-tools`"
            )
        cargo = shutil.which("cargo")
        if cargo is None:
            return Tool(name, None, reason="cargo (the Rust toolchain) is not on PATH")
        error = _build(
            [
                cargo,
                "install",
                "boringtun-cli",
                "--version",
                BORINGTUN_CLI_VERSION,
                "--locked",
                "--root",
                str(root),
            ],
            root / "build.log",
        )
        if error:
            return Tool(name, None, reason=error)
    return Tool(name, binary, _first_line([str(binary), "--version"]))


def debian_wireguard_go() -> Tool:
    """Debian's wireguard-go (``/usr/bin/wireguard-go``, package wireguard-go), or why it is missing."""
    name = "wireguard-go-debian"
    if not DEBIAN_WIREGUARD_GO.exists():
        return Tool(name, None, reason=f"{DEBIAN_WIREGUARD_GO} is not installed (make deps installs it)")
    return Tool(name, DEBIAN_WIREGUARD_GO, _first_line([str(DEBIAN_WIREGUARD_GO), "--version"]))


# -- tunnel endpoints ------------------------------------------------------------------------------------


@dataclass
class TailpyNode:
    """A running ``python -m tailpy.lab.wgnode`` on ``host``."""

    host: Host
    proc: subprocess.Popen[str]
    public_key: str  # base64
    listen_port: int

    @classmethod
    def start(
        cls,
        host: Host,
        private_key: str,
        *,
        address: str,
        peers: list[PeerArg],
        listen_port: int = 0,
        tun: str = "tailpy0",
        mtu: int = 1280,
        keepalive: int | None = None,
        relay_listen: str | None = None,
        relay_connect: str | None = None,
        timeout: float = 20.0,
    ) -> TailpyNode:
        """Start the node and wait (up to ``timeout`` s) until it reports ready. Raises LabError."""
        args = [
            "--private-key",
            private_key,
            "--listen-port",
            str(listen_port),
            "--tun",
            tun,
            "--address",
            address,
            "--mtu",
            str(mtu),
        ]
        for peer in peers:
            args += ["--peer", peer.format()]
        if keepalive:
            args += ["--keepalive", str(keepalive)]
        if relay_listen:
            args += ["--relay-listen", relay_listen]
        if relay_connect:
            args += ["--relay-connect", relay_connect]
        proc = host.python("tailpy.lab.wgnode", *args, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert proc.stdout is not None
        ready = json.loads(read_line(proc.stdout, timeout, f"tailpy wgnode on {host.name} to be ready"))
        return cls(host, proc, ready["public_key"], int(ready["listen_port"]))

    def stats(self, timeout: float = 5.0) -> dict[str, Any]:
        """The node's device and peer stats (``{"device": ..., "peers": [...], "relay": ...}``)."""
        return self._ask("stats", timeout, f"stats of {self.host.name}")

    def set_filter(self, rules: tuple[FilterRule, ...] | None, timeout: float = 5.0) -> None:
        """Set the device's packet filter (None: none, everything admitted). Raises LabError with the
        device's sentence when it refuses the rules."""
        text = json.dumps(None if rules is None else filter_to_json(rules))
        reply = self._ask(f"filter {text}", timeout, f"{self.host.name} to set its filter")
        if "error" in reply:
            raise LabError(f"{self.host.name} refused the packet filter: {reply['error']}")

    def _ask(self, line: str, timeout: float, what: str) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        reply: dict[str, Any] = json.loads(read_line(self.proc.stdout, timeout, what))
        return reply


#: The tunnel addresses of :func:`start_tailpy_pair`'s two ends.
TUN_A, TUN_B = "100.64.0.1", "100.64.0.2"


@dataclass(frozen=True)
class TailpyPair:
    """Two bare tailpy data planes, each the other's only peer: ``a`` at tunnel address ``tun_a``, ``b`` at
    ``tun_b``."""

    a: TailpyNode
    b: TailpyNode
    tun_a: str = TUN_A
    tun_b: str = TUN_B


def start_tailpy_pair(
    a: Host,
    b: Host,
    *,
    endpoint_a: str | None,
    endpoint_b: str | None,
    port_a: int = 41641,
    port_b: int = 41641,
    mtu: int = 1280,
    relay: str | None = None,
) -> TailpyPair:
    """Start ``python -m tailpy.lab.wgnode`` on ``a`` and ``b`` with fresh keys (wg(8)), each the other's
    peer: ``a`` is 100.64.0.1/32 listening on UDP ``port_a``, ``b`` 100.64.0.2/32 on ``port_b``, both at
    ``mtu``. ``endpoint_a`` / ``endpoint_b``: the underlay IP where the other end reaches each (None: no
    endpoint, learned from the peer's handshake). ``relay``: ``"ip:port"`` where ``a`` listens and ``b``
    connects to bridge their relay queues (every path "relay", :mod:`tailpy.lab.relay`); None: direct.
    Raises LabError when a node does not come up."""
    (a_priv, a_pub), (b_priv, b_pub) = wg_keypair(), wg_keypair()
    to_b = PeerArg(base64.b64decode(b_pub), f"{endpoint_b}:{port_b}" if endpoint_b else None, [f"{TUN_B}/32"])
    to_a = PeerArg(base64.b64decode(a_pub), f"{endpoint_a}:{port_a}" if endpoint_a else None, [f"{TUN_A}/32"])
    na = TailpyNode.start(
        a, a_priv, address=f"{TUN_A}/32", listen_port=port_a, mtu=mtu, peers=[to_b], relay_listen=relay
    )
    nb = TailpyNode.start(
        b, b_priv, address=f"{TUN_B}/32", listen_port=port_b, mtu=mtu, peers=[to_a], relay_connect=relay
    )
    return TailpyPair(na, nb)


@dataclass
class UapiPeer:
    """A userspace WireGuard process on ``host`` that made the TUN ``ifname`` and is configured with wg(8)
    over its UAPI socket (``/var/run/wireguard/<ifname>.sock``, the cross-platform userspace interface of
    wireguard.com/xplatform). ``log`` holds its output."""

    host: Host
    proc: subprocess.Popen[str]
    ifname: str
    public_key: str
    listen_port: int
    log: Path

    @classmethod
    def _launch(
        cls: type[P],
        host: Host,
        argv: list[str],
        env: dict[str, str],
        *,
        private_key: str,
        address: str,
        peers: list[PeerArg],
        listen_port: int,
        mtu: int,
        timeout: float,
    ) -> P:
        """Start ``argv + [ifname]`` in the foreground (tracked), output to a log file the lab removes; wait
        for the UAPI socket; set key, port and peers with ``wg set``; address, MTU, up and routes with ip(8).
        Raises LabError with the log's last line when the process exits or the socket does not appear."""
        what = Path(argv[0]).name
        ifname = f"wg{host.lab.prefix[3:7]}{host.name}"[:15]
        sock = WG_RUN_DIR / f"{ifname}.sock"
        host.lab.track_path(sock)
        log_dir = Path(tempfile.mkdtemp(prefix=f"{host.lab.prefix}{host.name}-"))
        host.lab.track_path(log_dir)
        log = log_dir / f"{what}.log"
        with log.open("w") as out:
            proc = host.popen([*argv, ifname], env=env, stdout=out, stderr=subprocess.STDOUT)

        def tail() -> str:
            lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
            return lines[-1].strip() if lines else "no output"

        try:
            wait_for(
                lambda: sock.exists() or proc.poll() is not None, timeout=timeout, what=f"{what} {ifname}"
            )
        except LabError as e:
            raise LabError(f"{e} ({what} said: {tail()})") from None
        if proc.poll() is not None:
            raise LabError(f"{what} {ifname} on {host.name} exited with status {proc.returncode}: {tail()}")
        cmd = ["wg", "set", ifname, "private-key", "/dev/stdin", "listen-port", str(listen_port)]
        for peer in peers:
            cmd += [
                "peer",
                base64.b64encode(peer.public_key).decode(),
                "allowed-ips",
                ",".join(peer.allowed_ips),
            ]
            if peer.endpoint:
                cmd += ["endpoint", peer.endpoint]
        host.run(cmd, input=private_key + "\n")
        host.run(["ip", "addr", "add", address, "dev", ifname])
        host.run(["ip", "link", "set", ifname, "mtu", str(mtu), "up"])
        for peer in peers:
            for prefix in peer.allowed_ips:
                host.run(["ip", "route", "replace", prefix, "dev", ifname])
        public = host.run(["wg", "show", ifname, "public-key"]).stdout.strip()
        return cls(host, proc, ifname, public, listen_port, log)

    def latest_handshakes(self) -> dict[str, int]:
        """Peer public key (base64) -> unix time of the latest handshake (0 = none yet)."""
        out = self.host.run(["wg", "show", self.ifname, "latest-handshakes"]).stdout
        return {key: int(ts) for key, ts in (line.split() for line in out.splitlines() if line.strip())}


@dataclass
class WireguardGo(UapiPeer):
    """A running ``wireguard-go -f <ifname>`` on ``host``, configured with wg(8) and ip(8).

    ``binary`` picks the build: ``wireguard-go`` on PATH (Debian's) by default, or the newest one from
    :func:`wireguard_go_newest`. Recent builds open the TUN with ``IFF_VNET_HDR`` and TSO (and USO where the
    kernel has it) and use UDP GSO/GRO (wireguard-go ``tun/tun_linux.go``, ``conn/bind_std.go``); Debian's
    0.0.20220316 does neither."""

    @classmethod
    def start(
        cls,
        host: Host,
        private_key: str,
        *,
        address: str,
        peers: list[PeerArg],
        listen_port: int = 51820,
        mtu: int = 1280,
        binary: str | Path = "wireguard-go",
        timeout: float = 10.0,
    ) -> WireguardGo:
        """Start wireguard-go in the foreground (tracked), wait for its UAPI socket, configure it.
        Raises LabError (not installed, exited, no socket in ``timeout`` s, or a failed wg/ip command)."""
        if shutil.which(str(binary)) is None:
            raise LabError(f"{binary} is not installed (make deps installs Debian's)")
        reason = missing_tools("wg")
        if reason:
            raise LabError(reason)
        return cls._launch(
            host,
            [str(binary), "-f"],
            {"LOG_LEVEL": "error"},
            private_key=private_key,
            address=address,
            peers=peers,
            listen_port=listen_port,
            mtu=mtu,
            timeout=timeout,
        )


@dataclass
class Boringtun(UapiPeer):
    """A running ``boringtun-cli --foreground <ifname>`` on ``host``, configured with wg(8) and ip(8).

    boringtun-cli makes the TUN itself (multi-queue, one queue per thread) and serves the same UAPI socket as
    wireguard-go. Run as root it must keep its privileges: by default it calls ``drop_privileges()``
    (boringtun ``device/drop_privileges.rs``), which looks up the login user with getlogin(3) and fails
    without a controlling terminal or when that user is root, so it is started with
    ``--disable-drop-privileges`` (the flag that env ``WG_SUDO`` also sets). ``threads`` is its
    ``--threads`` (None: its default, 4)."""

    threads: int | None = None

    @classmethod
    def start(
        cls,
        host: Host,
        private_key: str,
        *,
        address: str,
        peers: list[PeerArg],
        binary: str | Path,
        listen_port: int = 51820,
        mtu: int = 1280,
        threads: int | None = None,
        timeout: float = 10.0,
    ) -> Boringtun:
        """Start boringtun-cli in the foreground (tracked), wait for its UAPI socket, configure it.
        Raises LabError (missing, exited, no socket in ``timeout`` s, or a failed wg/ip command)."""
        if shutil.which(str(binary)) is None:
            raise LabError(f"{binary} is not installed (throughput.py --build-tools builds it)")
        reason = missing_tools("wg")
        if reason:
            raise LabError(reason)
        argv = [str(binary), "--foreground", "--disable-drop-privileges"]
        if threads is not None:
            argv += ["--threads", str(threads)]
        peer = cls._launch(
            host,
            argv,
            {"WG_LOG_LEVEL": "error"},
            private_key=private_key,
            address=address,
            peers=peers,
            listen_port=listen_port,
            mtu=mtu,
            timeout=timeout,
        )
        peer.threads = threads
        return peer
