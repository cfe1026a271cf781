"""Real Redis topologies for tests, started from the `redis-server` binary on free loopback ports:

    cluster = LocalCluster(tmp)      # 6 nodes: 3 primaries, 3 replicas (redis-cli --cluster create)
    sentinels = LocalSentinelSet(tmp)  # 1 primary, 1 replica, 3 sentinels (writable config files)
    cluster.start(); cluster.url; cluster.kill(port); cluster.restart(port); cluster.wait_ready()
    cluster.flush(); cluster.cleanup()

`wait_ready()` waits (with a deadline) until the topology is whole again: on a cluster every running
node says `cluster_state:ok`, every slot has a primary and every primary its replica attached; on
Sentinel every sentinel names the same primary and sees its replica and the other sentinels. Never
the shared Redis on 6379. Cluster ports are at most 55535, since the cluster bus listens on
port + 10000.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import redis
from redis.exceptions import RedisError

HOST = "127.0.0.1"
MAX_CLUSTER_PORT = 55535


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def free_port(*, below: int = 65535, bus_offset: int | None = None, taken: set[int] | None = None) -> int:
    """A free loopback port <= `below` (and port + `bus_offset` free too, for a cluster bus)."""
    taken = taken if taken is not None else set()
    for _ in range(1000):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((HOST, 0))
            port = int(sock.getsockname()[1])
        if port > below:
            # The kernel's ephemeral range often lies above 55535: try a port derived from it.
            port = 20000 + port % (below - 20000)
            if not _port_free(port):
                continue
        if port in taken or (
            bus_offset is not None and (port + bus_offset in taken or not _port_free(port + bus_offset))
        ):
            continue
        taken.add(port)
        if bus_offset is not None:
            taken.add(port + bus_offset)
        return port
    raise RuntimeError("no free loopback port found")


def wait_until(condition: Callable[[], bool], *, timeout: float, what: str, explain: Callable[[], str] = str) -> None:
    """Poll `condition` until true, or fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{explain()}")
        time.sleep(0.05)  # polling a condition, bounded by the deadline above


class NodeProcess:
    """One redis-server (data node or sentinel) with its own directory; killable and restartable
    on the same port."""

    def __init__(self, directory: Path, port: int, argv: Sequence[str], *, password: str | None = None) -> None:
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = port
        self.password = password
        self._argv = list(argv)
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def client(self, **overrides: Any) -> redis.Redis:
        options: dict[str, Any] = {
            "host": HOST,
            "port": self.port,
            "password": self.password,
            "socket_timeout": 5.0,
            "socket_connect_timeout": 5.0,
            "decode_responses": True,
        }
        options.update(overrides)
        return redis.Redis(**options)

    def start(self, *, timeout: float = 15.0) -> None:
        if self.running:
            return
        with open(self.directory / "redis.log", "ab") as log:
            self._process = subprocess.Popen(
                self._argv, cwd=self.directory, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        process = self._process

        def answers() -> bool:
            if process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {process.returncode}:\n{self.log_tail()}")
            with contextlib.suppress(RedisError, OSError), self.client(socket_timeout=0.5) as probe:
                return bool(probe.ping())
            return False

        wait_until(answers, timeout=timeout, what=f"redis-server on port {self.port}", explain=self.log_tail)

    def kill(self) -> None:
        """SIGKILL: a crash, as a machine lost would be."""
        self._stop(signal.SIGKILL)

    def stop(self) -> None:
        self._stop(signal.SIGTERM)

    def _stop(self, sig: signal.Signals) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(sig)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join((self.directory / "redis.log").read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def _data_node_argv(port: int, directory: Path, extra: Sequence[str]) -> list[str]:
    return [
        "redis-server",
        "--port", str(port),
        "--bind", HOST,
        "--daemonize", "no",
        "--save", "",
        "--appendonly", "no",
        "--dir", str(directory),
        "--logfile", "",
        *extra,
    ]  # fmt: skip


class LocalCluster:
    """`primaries` primaries with `replicas` replicas each, joined by `redis-cli --cluster create`."""

    def __init__(
        self, directory: Path | None = None, *, primaries: int = 3, replicas: int = 1, node_timeout_ms: int = 2000
    ) -> None:
        self.directory = directory or Path(tempfile.mkdtemp(prefix="companion-cluster-"))
        self._owns_directory = directory is None
        self.primaries_count = primaries
        self.replicas_per_primary = replicas
        taken: set[int] = set()
        self.nodes: list[NodeProcess] = []
        for index in range(primaries * (1 + replicas)):
            port = free_port(below=MAX_CLUSTER_PORT, bus_offset=10000, taken=taken)
            node_dir = self.directory / f"node-{index}"
            argv = _data_node_argv(
                port,
                node_dir,
                [
                    "--cluster-enabled", "yes",
                    "--cluster-config-file", "nodes.conf",
                    "--cluster-node-timeout", str(node_timeout_ms),
                    # A replica of a primary that just died is always allowed to take over.
                    "--cluster-replica-validity-factor", "0",
                ],
            )  # fmt: skip
            self.nodes.append(NodeProcess(node_dir, port, argv))

    @property
    def url(self) -> str:
        """Any node's URL: the client discovers the rest (a running one is picked)."""
        node = next((n for n in self.nodes if n.running), self.nodes[0])
        return f"redis://{HOST}:{node.port}/0"

    def node(self, port: int) -> NodeProcess:
        return next(n for n in self.nodes if n.port == port)

    def start(self, *, timeout: float = 60.0) -> None:
        for node in self.nodes:
            node.start()
        create = subprocess.run(
            [
                "redis-cli", "--cluster", "create",
                *(f"{HOST}:{node.port}" for node in self.nodes),
                "--cluster-replicas", str(self.replicas_per_primary),
                "--cluster-yes",
            ],
            capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        if create.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed:\n{create.stdout}\n{create.stderr}")
        self.wait_ready(timeout=timeout)

    def _nodes_view(self) -> list[dict[str, Any]]:
        """CLUSTER NODES as seen by a running node: id, port, role, primary id, link state, slots."""
        for node in self.nodes:
            if not node.running:
                continue
            with contextlib.suppress(RedisError, OSError), node.client() as client:
                text = client.execute_command("CLUSTER", "NODES")
                if isinstance(text, bytes):
                    text = text.decode()
                rows = []
                for line in str(text).splitlines():
                    fields = line.split()
                    address = fields[1].split("@")[0]
                    rows.append(
                        {
                            "id": fields[0],
                            "port": int(address.rsplit(":", 1)[1]),
                            "flags": set(fields[2].split(",")),
                            "primary": fields[3],
                            "link": fields[7],
                            "slots": fields[8:],
                        }
                    )
                return rows
        return []

    def primary_ports(self) -> list[int]:
        """Ports of the primaries that serve slots, now."""
        return sorted(
            row["port"]
            for row in self._nodes_view()
            if "master" in row["flags"] and row["slots"] and "fail" not in row["flags"]
        )

    def replica_of(self, primary_port: int) -> int | None:
        rows = self._nodes_view()
        primary_id = next((r["id"] for r in rows if r["port"] == primary_port), None)
        return next((r["port"] for r in rows if r["primary"] == primary_id and "slave" in r["flags"]), None)

    def _ready(self) -> bool:
        running = [node for node in self.nodes if node.running]
        for node in running:
            try:
                with node.client(socket_timeout=1.0) as client:
                    info = client.execute_command("CLUSTER", "INFO")
                    if isinstance(info, bytes):
                        info = info.decode()
                    if "cluster_state:ok" not in str(info):
                        return False
                    role = client.info("replication")
                    if role.get("role") == "slave" and role.get("master_link_status") != "up":
                        return False
            except (RedisError, OSError):
                return False
        rows = self._nodes_view()
        primaries = [r for r in rows if "master" in r["flags"] and r["slots"] and not r["flags"] & {"fail", "fail?"}]
        if len(primaries) != self.primaries_count:
            return False
        # Every running node that is not a serving primary must be attached as a replica, and with
        # every node running, every primary has its replica.
        attached = [
            r for r in rows if "slave" in r["flags"] and r["link"] == "connected" and not r["flags"] & {"fail", "fail?"}
        ]
        if len(attached) < len(running) - self.primaries_count:
            return False
        if len(running) == len(self.nodes):
            return all(any(r["primary"] == p["id"] for r in attached) for p in primaries)
        return True

    def wait_ready(self, *, timeout: float = 60.0) -> None:
        wait_until(self._ready, timeout=timeout, what="the cluster (cluster_state:ok, replicas attached)",
                   explain=lambda: "\n".join(f"{n.port}: {n.log_tail(5)}" for n in self.nodes))  # fmt: skip

    def kill(self, port: int) -> None:
        self.node(port).kill()

    def restart(self, port: int) -> None:
        """Start a killed node again: it rejoins (as a replica of whoever took over its slots)."""
        self.node(port).start()

    def heal(self, *, timeout: float = 60.0) -> None:
        """Every node running again and the cluster whole (after a test killed one)."""
        for node in self.nodes:
            node.start()
        self.wait_ready(timeout=timeout)

    def primary_clients(self) -> list[redis.Redis]:
        return [self.node(port).client() for port in self.primary_ports()]

    def flush(self) -> None:
        """Empty every primary (replicas follow)."""
        for client in self.primary_clients():
            with client:
                client.flushall()

    def cleanup(self) -> None:
        for node in self.nodes:
            node.kill()
        if self._owns_directory:
            shutil.rmtree(self.directory, ignore_errors=True)


class LocalSentinelSet:
    """One primary, one replica, three sentinels monitoring them as `master_name`."""

    def __init__(
        self,
        directory: Path | None = None,
        *,
        master_name: str = "mymaster",
        password: str | None = None,
        down_after_ms: int = 1000,
        sentinels: int = 3,
    ) -> None:
        self.directory = directory or Path(tempfile.mkdtemp(prefix="companion-sentinel-"))
        self._owns_directory = directory is None
        self.master_name = master_name
        self.password = password
        self.down_after_ms = down_after_ms
        taken: set[int] = set()
        auth = ["--requirepass", password, "--masterauth", password] if password else []
        primary_port = free_port(taken=taken)
        replica_port = free_port(taken=taken)
        self.data_nodes = [
            NodeProcess(self.directory / "primary", primary_port,
                        _data_node_argv(primary_port, self.directory / "primary", auth), password=password),
            NodeProcess(self.directory / "replica", replica_port,
                        _data_node_argv(replica_port, self.directory / "replica",
                                        [*auth, "--replicaof", HOST, str(primary_port)]), password=password),
        ]  # fmt: skip
        self.sentinels: list[NodeProcess] = []
        for index in range(sentinels):
            port = free_port(taken=taken)
            directory_i = self.directory / f"sentinel-{index}"
            directory_i.mkdir(parents=True, exist_ok=True)
            config = directory_i / "sentinel.conf"  # sentinels rewrite their config file: writable
            lines = [
                f"port {port}",
                f"bind {HOST}",
                f"dir {directory_i}",
                f"sentinel monitor {master_name} {HOST} {primary_port} 2",
                f"sentinel down-after-milliseconds {master_name} {down_after_ms}",
                f"sentinel failover-timeout {master_name} 10000",
                f"sentinel parallel-syncs {master_name} 1",
            ]
            if password:
                lines.append(f"sentinel auth-pass {master_name} {password}")
            config.write_text("\n".join(lines) + "\n")
            self.sentinels.append(NodeProcess(directory_i, port, ["redis-server", str(config), "--sentinel"]))

    @property
    def sentinel_addresses(self) -> str:
        """REDIS_SENTINELS."""
        return ",".join(f"{HOST}:{s.port}" for s in self.sentinels)

    @property
    def url(self) -> str:
        """REDIS_URL for sentinel mode: credentials only (the host is ignored)."""
        credentials = f":{self.password}@" if self.password else ""
        return f"redis://{credentials}{HOST}:{self.data_nodes[0].port}/0"

    def node(self, port: int) -> NodeProcess:
        return next(n for n in self.data_nodes if n.port == port)

    def start(self, *, timeout: float = 60.0) -> None:
        for node in (*self.data_nodes, *self.sentinels):
            node.start()
        self.wait_ready(timeout=timeout)

    def primary_port(self) -> int | None:
        """The primary as the sentinels name it (None while they disagree or cannot tell)."""
        answers = set()
        for sentinel in self.sentinels:
            if not sentinel.running:
                continue
            try:
                with sentinel.client(password=None) as client:
                    address = client.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.master_name)
            except (RedisError, OSError):
                return None
            if not address:
                return None
            answers.add(int(address[1]))
        return answers.pop() if len(answers) == 1 else None

    def _ready(self) -> bool:
        port = self.primary_port()
        if port is None or not self.node(port).running:
            return False
        try:
            with self.node(port).client(socket_timeout=1.0) as primary:
                if primary.info("replication").get("role") != "master":
                    return False
            for node in self.data_nodes:
                if node.port != port and node.running:
                    with node.client(socket_timeout=1.0) as replica:
                        info = replica.info("replication")
                        if info.get("role") != "slave" or info.get("master_port") != port:
                            return False
                        if info.get("master_link_status") != "up":
                            return False
            for sentinel in self.sentinels:
                with sentinel.client(password=None, socket_timeout=1.0) as client:
                    state = client.execute_command("SENTINEL", "MASTER", self.master_name)
                    fields = dict(zip(state[::2], state[1::2], strict=False)) if isinstance(state, list) else state
                    if "s_down" in str(fields.get("flags", "")) or "o_down" in str(fields.get("flags", "")):
                        return False
                    replicas = sum(1 for n in self.data_nodes if n.running) - 1
                    if int(fields.get("num-slaves", 0)) < replicas:
                        return False
                    if int(fields.get("num-other-sentinels", 0)) < len(self.sentinels) - 1:
                        return False
                    if replicas:
                        slaves = client.execute_command("SENTINEL", "REPLICAS", self.master_name)
                        for slave in slaves:
                            row = dict(zip(slave[::2], slave[1::2], strict=False)) if isinstance(slave, list) else slave
                            if "down" in str(row.get("flags", "")) or "disconnected" in str(row.get("flags", "")):
                                return False
        except (RedisError, OSError):
            return False
        return True

    def wait_ready(self, *, timeout: float = 60.0) -> None:
        wait_until(self._ready, timeout=timeout, what="the sentinel set (one primary, its replica, 3 sentinels agree)",
                   explain=lambda: "\n".join(f"{n.port}: {n.log_tail(8)}" for n in (*self.data_nodes, *self.sentinels)))  # fmt: skip

    def kill_primary(self) -> int:
        port = self.primary_port()
        assert port is not None, "no primary to kill"
        self.node(port).kill()
        return port

    def heal(self, *, timeout: float = 60.0) -> None:
        """Every process running again (a killed primary comes back as a replica) and all agreed."""
        for node in (*self.data_nodes, *self.sentinels):
            node.start()
        self.wait_ready(timeout=timeout)

    def flush(self) -> None:
        port = self.primary_port()
        assert port is not None
        with self.node(port).client() as client:
            client.flushall()
            # The replica must have applied it too before a test reads after a failover.
            client.execute_command("WAIT", 1, 2000)

    def cleanup(self) -> None:
        for node in (*self.sentinels, *self.data_nodes):
            node.kill()
        if self._owns_directory:
            shutil.rmtree(self.directory, ignore_errors=True)


def topology_options(
    kind: str, *, url: str | None = None, cluster: LocalCluster | None = None, sentinels: LocalSentinelSet | None = None
) -> Any:
    """`RedisOptions` for one topology under test: "redis"/"standalone" (at `url`), "cluster" or
    "sentinel", built the way the app builds them (companion.cache.topology)."""
    from companion.cache.topology import RedisOptions, parse_sentinels

    # Generous timeouts: these topologies run many processes on a busy two-core machine, and the
    # suites using them test what the operations do, not how fast (the failover tests build their
    # own settings with the defaults).
    timeouts = {"socket_timeout_ms": 2000, "connect_timeout_ms": 2000}
    if kind == "cluster":
        assert cluster is not None
        return RedisOptions(url=cluster.url, mode="cluster", **timeouts)
    if kind == "sentinel":
        assert sentinels is not None
        return RedisOptions(
            url=sentinels.url,
            mode="sentinel",
            sentinels=parse_sentinels(sentinels.sentinel_addresses),
            sentinel_master=sentinels.master_name,
            **timeouts,
        )
    assert url is not None
    return RedisOptions(url=url, mode="standalone", **timeouts)


TOPOLOGIES = ("cluster", "sentinel")


# The contract suites test what each command does, not how fast: on a loaded two-core machine a
# connect or a reply can wait longer than the service's 250 ms for this process to be scheduled.
CONTRACT_TIMEOUT_MS = 3_000


def prepared_topology(kind: str, request: Any) -> Any:
    """A fresh `Topology` client on the session's (emptied) cluster or sentinel set, for a
    fixture parametrized over topologies. The caller closes it (`await topology.aclose()`)."""
    from companion.cache.topology import make_topology

    if kind == "cluster":
        cluster: LocalCluster = request.getfixturevalue("redis_cluster")
        cluster.flush()
        options = topology_options("cluster", cluster=cluster)
    else:
        sentinels: LocalSentinelSet = request.getfixturevalue("redis_sentinels")
        sentinels.flush()
        options = topology_options("sentinel", sentinels=sentinels)
    return make_topology(
        dataclasses.replace(options, socket_timeout_ms=CONTRACT_TIMEOUT_MS, connect_timeout_ms=CONTRACT_TIMEOUT_MS)
    )


def contract_client(url: str, **options: Any) -> Any:
    """`make_client` with CONTRACT_TIMEOUT_MS for connecting, for a free pool slot and (through
    its backstop) for a read: for tests of what commands do, never of how fast."""
    from companion.cache.redis import make_client

    options.setdefault("socket_timeout_ms", CONTRACT_TIMEOUT_MS)
    options.setdefault("connect_timeout_ms", CONTRACT_TIMEOUT_MS)
    return make_client(url, **options)


def contract_backend(url: str, **backend_options: Any) -> Any:
    """A `RedisBackend` on a single server (`contract_client`) whose operations may take
    CONTRACT_TIMEOUT_MS. Tests of timeouts build their own, with the service's 250 ms."""
    from companion.cache.redis import RedisBackend

    backend_options.setdefault("timeout", CONTRACT_TIMEOUT_MS / 1000)
    return RedisBackend(contract_client(url), **backend_options)


def backend_on(kind: str, request: Any, **backend_options: Any) -> Any:
    """A `RedisBackend` on the session's cluster or sentinel set (emptied first)."""
    from companion.cache.redis import RedisBackend

    topology = prepared_topology(kind, request)
    backend_options.setdefault("timeout", CONTRACT_TIMEOUT_MS / 1000)
    return RedisBackend(topology.client, topology=topology, **backend_options)
