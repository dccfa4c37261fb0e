"""The cluster model and verbs shared by every backend.

A :class:`Cluster` owns N trio-kv nodes (ids 1..N) split into S shards of contiguous ids
(6 nodes, 2 shards: ``shard1 = 1,2,3``, ``shard2 = 4,5,6``), the view it sent them, and the
network faults it injected.  Faults are kept as *desired state* (a set of directed cuts
``src -> dst`` and a delay per node) and every change re-renders the whole rule set of the
nodes it touches, so applying is idempotent and a restarted container (whose network
namespace is new) gets exactly the rules it should have.

State lives in ``<state dir>/<prefix>/state.json`` so that separate CLI invocations
(``up``, then ``partition``, then ``heal``...) act on the same cluster.  Every invocation
takes a file lock, so two of them never interleave their edits.

Every cluster gets a random cluster secret (``KV_CLUSTER_SECRET`` in the nodes' environment,
kept in the state file, readable by its owner only) unless the caller passes one, or an empty
one for bare nodes; every view sent carries it in ``X-KV-Secret``.
"""

from __future__ import annotations

import abc
import contextlib
import fcntl
import json
import os
import re
import secrets
import shlex
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from chaos.history import check_convergence
from chaos.util import ChaosError, Unsupported

REPO = Path(__file__).resolve().parent.parent
DEFAULT_PREFIX = "tkv"
PREFIX_RE = re.compile(r"^[a-z][a-z0-9]{0,5}$")
BACKENDS = ("local", "netns", "podman")
SECRET_ENV = "KV_CLUSTER_SECRET"
SECRET_HEADER = "X-KV-Secret"


def default_state_dir() -> Path:
    """``$CHAOS_STATE_DIR``, else ``.chaos/`` at the repository root (git-ignored)."""
    return Path(os.environ.get("CHAOS_STATE_DIR") or REPO / ".chaos")


def default_node_cmd() -> list[str]:
    """``$CHAOS_NODE_CMD`` (shell words), else this interpreter running ``-m trio_kv``."""
    custom = os.environ.get("CHAOS_NODE_CMD")
    return shlex.split(custom) if custom else [sys.executable, "-m", "trio_kv"]


@dataclass
class Node:
    """One node: its id, where clients reach it, and what the backend needs to manage it."""

    id: int
    host: str
    port: int
    shard: str
    name: str = ""
    """Namespace or container name (backend-specific)."""
    pid: int | None = None
    delayer_pid: int | None = None

    @property
    def address(self) -> str:
        """``host:port`` as it appears in the view."""
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        """Base URL for clients."""
        return f"http://{self.address}"


@dataclass
class State:
    """Everything needed to find and change a running cluster from another process."""

    backend: str
    prefix: str
    nodes: list[Node]
    shards: dict[str, list[int]]
    node_cmd: list[str] = field(default_factory=default_node_cmd)
    env: dict[str, str] = field(default_factory=dict)
    cuts: list[tuple[int, int]] = field(default_factory=list)
    """Directed cuts: packets from ``src`` to ``dst`` are dropped."""
    delays: dict[int, float] = field(default_factory=dict)
    """Extra egress latency per node id, in ms."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Backend-specific facts (subnet, bridge, image, delay mechanism...)."""

    def to_json(self) -> str:
        """Serialise (JSON keys must be strings; tuples become lists)."""
        data = asdict(self)
        data["delays"] = {str(k): v for k, v in self.delays.items()}
        return json.dumps(data, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> State:
        """Inverse of :meth:`to_json`."""
        data = json.loads(text)
        data["nodes"] = [Node(**n) for n in data["nodes"]]
        data["cuts"] = [tuple(c) for c in data["cuts"]]
        data["delays"] = {int(k): v for k, v in data["delays"].items()}
        return cls(**data)

    def node(self, node_id: int) -> Node:
        """The node with this id, or a clear error."""
        for node in self.nodes:
            if node.id == node_id:
                return node
        known = ", ".join(str(n.id) for n in self.nodes)
        raise ChaosError(f"no node {node_id} in this cluster (nodes: {known})")

    @property
    def secret(self) -> str:
        """The cluster secret every node was started with ('' for bare nodes)."""
        return self.env.get(SECRET_ENV, "")

    def auth_headers(self) -> dict[str, str]:
        """Headers that let an operator's request (``PUT /view``) through."""
        return {SECRET_HEADER: self.secret} if self.secret else {}

    def view(self) -> dict[str, list[dict[str, Any]]]:
        """The view every node is sent: shard name -> [{address, id}]."""
        return {shard: [{"address": self.node(i).address, "id": i} for i in ids]
                for shard, ids in self.shards.items()}


def with_secret(env: Mapping[str, str] | None) -> dict[str, str]:
    """``env`` plus a fresh random ``KV_CLUSTER_SECRET`` unless it already names one."""
    out = dict(env or {})
    out.setdefault(SECRET_ENV, secrets.token_hex(16))
    return out


def plan_shards(n: int, shards: int) -> dict[str, list[int]]:
    """Split ids 1..n into ``shards`` contiguous groups as even as possible."""
    if n < 1:
        raise ChaosError("a cluster needs at least one node")
    if not 1 <= shards <= n:
        raise ChaosError(f"--shards must be between 1 and the number of nodes ({n})")
    out: dict[str, list[int]] = {}
    for i in range(1, n + 1):
        out.setdefault(f"shard{(i - 1) * shards // n + 1}", []).append(i)
    return out


class Backend(abc.ABC):
    """How nodes are run and how the network between them is cut."""

    name: str = ""
    has_network: bool = True

    def __init__(self, state: State, workdir: Path) -> None:
        self.state = state
        self.workdir = workdir
        self.logdir = workdir / "logs"

    @classmethod
    @abc.abstractmethod
    def preflight(cls) -> None:
        """Raise a clear ChaosError if this machine cannot run the backend."""

    @abc.abstractmethod
    def plan(self, n: int, options: Mapping[str, Any]) -> list[tuple[str, int, str]]:
        """(host, port, name) for nodes 1..n; may record facts in ``state.extra``."""

    @abc.abstractmethod
    def create(self) -> None:
        """Build the network and start every node (stale leftovers already removed)."""

    @abc.abstractmethod
    def start(self, node: Node) -> None:
        """Start (or start again) one node's process or container."""

    @abc.abstractmethod
    def kill(self, node: Node) -> None:
        """SIGKILL the node: no clean shutdown, like a power cut."""

    @abc.abstractmethod
    def alive(self, node: Node) -> bool:
        """Whether the node's process or container is running."""

    @abc.abstractmethod
    def apply_network(self, node: Node) -> None:
        """Make the node's iptables rules and delay match the desired state."""

    @abc.abstractmethod
    def destroy(self) -> None:
        """Remove everything named with this prefix, whether or not state says it exists."""

    @abc.abstractmethod
    def log_tail(self, node: Node) -> str:
        """Recent output of the node, for error messages."""

    def check_route(self, node: Node) -> None:
        """Refuse to send traffic that would leave the machine (no-op where not needed)."""
        return None

    def no_network(self, verb: str) -> Unsupported:
        """The error for network verbs on a backend without a network of its own."""
        return Unsupported(f"`{verb}` needs a network to cut: the {self.name} backend runs "
                           "plain processes on 127.0.0.1. Use --backend netns (root) or "
                           "--backend podman.")


def backend_class(name: str) -> type[Backend]:
    """Import lazily, so the local backend works without podman or iproute2 installed."""
    if name == "local":
        from chaos.local import LocalBackend
        return LocalBackend
    if name == "netns":
        from chaos.netns import NetnsBackend
        return NetnsBackend
    if name == "podman":
        from chaos.podman import PodmanBackend
        return PodmanBackend
    raise ChaosError(f"unknown backend {name!r} (choose from {', '.join(BACKENDS)})")


class Cluster:
    """A running (or about to run) cluster: the verbs of the CLI, as a library.

    Use :meth:`up` to create one, :meth:`attach` to act on one created by another process.
    As a context manager it tears the cluster down on exit, including Ctrl-C.
    """

    READY_TIMEOUT = 60.0
    VIEW_TIMEOUT = 60.0

    def __init__(self, state: State, state_dir: Path) -> None:
        self.state = state
        self.state_dir = state_dir
        self.workdir = state_dir / state.prefix
        self.backend = backend_class(state.backend)(state, self.workdir)
        self.http = httpx.Client(trust_env=False, timeout=httpx.Timeout(10.0, connect=2.0))

    # ---- lifecycle -----------------------------------------------------------------------

    @classmethod
    def up(cls, n: int, shards: int = 1, *, backend: str = "netns",
           prefix: str = DEFAULT_PREFIX, state_dir: Path | None = None,
           env: Mapping[str, str] | None = None, node_cmd: Sequence[str] | None = None,
           send_view: bool = True, **options: Any) -> Cluster:
        """Remove stale leftovers of ``prefix``, start N nodes, send the view, wait for all.

        Unless ``env`` sets ``KV_CLUSTER_SECRET`` (empty: bare nodes), the nodes get a fresh
        random secret."""
        if not PREFIX_RE.match(prefix):
            raise ChaosError("prefix must be 1-6 lowercase letters/digits starting with a "
                             "letter (it ends up in interface names, limited to 15 chars)")
        state_dir = state_dir or default_state_dir()
        backend_cls = backend_class(backend)
        backend_cls.preflight()
        with _locked(state_dir, prefix):
            _down_stale(state_dir, prefix, backend)
            state = State(backend=backend, prefix=prefix, nodes=[],
                          shards=plan_shards(n, shards),
                          node_cmd=list(node_cmd or default_node_cmd()), env=with_secret(env))
            cluster = cls(state, state_dir)
            try:
                shard_of = {i: s for s, ids in state.shards.items() for i in ids}
                for i, (host, port, name) in enumerate(cluster.backend.plan(n, options), 1):
                    state.nodes.append(Node(id=i, host=host, port=port, shard=shard_of[i],
                                            name=name))
                cluster.workdir.mkdir(parents=True, exist_ok=True)
                cluster.backend.logdir.mkdir(parents=True, exist_ok=True)
                cluster.save()
                cluster.backend.create()
                cluster.save()
                cluster.wait_ready()
                if send_view:
                    cluster.send_view()
            except BaseException:
                cluster._teardown()
                raise
            return cluster

    @classmethod
    def attach(cls, prefix: str = DEFAULT_PREFIX, state_dir: Path | None = None) -> Cluster:
        """The cluster a previous ``up`` (maybe in another process) left running."""
        state_dir = state_dir or default_state_dir()
        path = state_dir / prefix / "state.json"
        if not path.exists():
            raise ChaosError(f"no cluster {prefix!r} is up (no {path}); run `up` first")
        return cls(State.from_json(path.read_text()), state_dir)

    def save(self) -> None:
        """Persist state atomically (write, then rename)."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        tmp = self.workdir / "state.json.tmp"
        tmp.touch(mode=0o600)  # it holds the cluster secret
        tmp.chmod(0o600)
        tmp.write_text(self.state.to_json())
        tmp.replace(self.workdir / "state.json")

    def _reload(self) -> None:
        """Adopt the state on disk: another process (a CLI verb) may have changed it."""
        path = self.workdir / "state.json"
        if path.exists():
            self.state = State.from_json(path.read_text())
            self.backend.state = self.state

    @contextlib.contextmanager
    def _txn(self) -> Iterator[None]:
        """One verb: hold the cluster lock, start from the state on disk, save at the end."""
        with _locked(self.state_dir, self.state.prefix):
            self._reload()
            try:
                yield
            finally:
                self.save()

    def down(self) -> None:
        """Stop every node and remove everything this cluster created."""
        with _locked(self.state_dir, self.state.prefix):
            self._reload()
            self._teardown()

    def _teardown(self) -> None:
        try:
            self.backend.destroy()
        finally:
            self.http.close()
            with contextlib.suppress(FileNotFoundError):
                (self.workdir / "state.json").unlink()

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()

    # ---- queries -------------------------------------------------------------------------

    @property
    def nodes(self) -> list[Node]:
        """All nodes, by id."""
        return self.state.nodes

    def node(self, node_id: int) -> Node:
        """One node by id."""
        return self.state.node(node_id)

    def url(self, node_id: int) -> str:
        """``http://host:port`` of a node."""
        return self.node(node_id).url

    def shard_nodes(self) -> dict[str, list[int]]:
        """Shard name -> node ids."""
        return {s: list(ids) for s, ids in self.state.shards.items()}

    # ---- view and readiness --------------------------------------------------------------

    def wait_ready(self, ids: Sequence[int] | None = None, timeout: float | None = None) -> None:
        """Wait until each node answers ``GET /ping``; fail fast if one died."""
        targets = [self.node(i) for i in ids] if ids else list(self.nodes)
        for node in targets:
            self.backend.check_route(node)
        deadline = time.monotonic() + (timeout or self.READY_TIMEOUT)
        pending = list(targets)
        while pending:
            for node in list(pending):
                try:
                    if self.http.get(f"{node.url}/ping", timeout=1.0).status_code == 200:
                        pending.remove(node)
                        continue
                except httpx.HTTPError:
                    pass
                if not self.backend.alive(node):
                    raise ChaosError(f"node {node.id} exited during start-up; its log ends:\n"
                                     f"{self.backend.log_tail(node)}")
            if pending and time.monotonic() > deadline:
                names = ", ".join(str(n.id) for n in pending)
                raise ChaosError(f"nodes {names} did not answer /ping in time; last log of "
                                 f"{pending[0].id}:\n{self.backend.log_tail(pending[0])}")
            if pending:
                time.sleep(0.1)

    def send_view(self, ids: Sequence[int] | None = None, timeout: float | None = None) -> None:
        """``PUT /view`` to the nodes (default: all) concurrently; each must answer 200."""
        targets = [self.node(i) for i in ids] if ids else list(self.nodes)
        body = {"view": self.state.view()}
        limit = timeout or self.VIEW_TIMEOUT

        def put(node: Node) -> None:
            deadline = time.monotonic() + limit
            last = ""
            while time.monotonic() < deadline:
                try:
                    r = self.http.put(f"{node.url}/view", json=body,
                                      headers=self.state.auth_headers(),
                                      timeout=max(1.0, deadline - time.monotonic()))
                    if r.status_code == 200:
                        return
                    last = f"{r.status_code} {r.text[:300]}"
                except httpx.HTTPError as exc:
                    last = repr(exc)
                time.sleep(0.2)
            raise ChaosError(f"node {node.id} did not accept the view within {limit:.0f}s: "
                             f"{last}")

        with ThreadPoolExecutor(max_workers=max(1, len(targets))) as pool:
            for future in [pool.submit(put, n) for n in targets]:
                future.result()

    # ---- faults --------------------------------------------------------------------------

    def _require_network(self, verb: str) -> None:
        if not self.backend.has_network:
            raise self.backend.no_network(verb)

    def _set_cuts(self, cuts: set[tuple[int, int]]) -> None:
        touched = {i for c in set(self.state.cuts) ^ cuts for i in c}
        self.state.cuts = sorted(cuts)
        self.save()
        self._apply(touched)

    def _apply(self, ids: set[int] | list[int]) -> None:
        live = [self.node(i) for i in sorted(ids)]  # the backend skips what it cannot reach
        if not live:
            return
        with ThreadPoolExecutor(max_workers=len(live)) as pool:
            for future in [pool.submit(self.backend.apply_network, n) for n in live]:
                future.result()
        self.save()

    def partition(self, *groups: Sequence[int], oneway: bool = False) -> None:
        """Cut the network between groups (replacing earlier cuts).

        Nodes in different groups cannot talk; nodes not named in any group keep talking to
        everyone.  With ``oneway``, only packets from an earlier group to a later one are
        dropped (an asymmetric partition).  Clients on the host still reach every node.
        """
        self._require_network("partition")
        with self._txn():
            self._partition(groups, oneway)

    def _partition(self, groups: Sequence[Sequence[int]], oneway: bool) -> None:
        if len(groups) < 2:
            raise ChaosError("a partition needs at least two groups, e.g. `partition 1,2 / 3`")
        seen: set[int] = set()
        for group in groups:
            for i in group:
                self.node(i)
                if i in seen:
                    raise ChaosError(f"node {i} is in two groups")
                seen.add(i)
        cuts: set[tuple[int, int]] = set()
        for gi, group in enumerate(groups):
            for gj, other in enumerate(groups):
                if gi == gj or (oneway and gj < gi):
                    continue
                cuts.update((a, b) for a in group for b in other)
        self._set_cuts(cuts)

    def isolate(self, node_id: int) -> None:
        """Cut one node off from every other node (clients can still reach it)."""
        self._require_network("isolate")
        with self._txn():
            self.node(node_id)
            others = [n.id for n in self.nodes if n.id != node_id]
            if not others:
                raise ChaosError("nothing to isolate a single node from")
            self._partition([[node_id], others], oneway=False)

    def heal(self) -> None:
        """Remove every cut and every delay: the network is whole again."""
        self._require_network("heal")
        with self._txn():
            touched = {i for c in self.state.cuts for i in c} | set(self.state.delays)
            self.state.cuts = []
            self.state.delays = {}
            self.save()
            self._apply(touched)

    def delay(self, node_id: int, ms: float) -> None:
        """Add ``ms`` of latency to everything the node sends (0 removes it)."""
        self._require_network("delay")
        if ms < 0:
            raise ChaosError("delay must be >= 0 ms")
        with self._txn():
            self.node(node_id)
            if ms:
                self.state.delays[node_id] = float(ms)
            else:
                self.state.delays.pop(node_id, None)
            self.save()
            self._apply([node_id])

    def kill(self, node_id: int) -> None:
        """SIGKILL a node (its container/process stays dead until :meth:`restart`)."""
        with self._txn():
            self.backend.kill(self.node(node_id))

    def restart(self, node_id: int, send_view: bool = True) -> None:
        """Start a node again (killing it first if alive), reapply its faults, resend the view."""
        with self._txn():
            node = self.node(node_id)
            if self.backend.alive(node):
                self.backend.kill(node)
            self.backend.start(node)
            self.save()
            if self.backend.has_network:
                self.backend.apply_network(node)
        self.wait_ready([node_id])
        if send_view:
            self.send_view([node_id])

    # ---- observation ---------------------------------------------------------------------

    def items(self, node_id: int, timeout: float = 5.0) -> dict[str, str] | None:
        """``GET /data`` of one node without causal metadata; None if it does not answer."""
        try:
            r = self.http.get(f"{self.url(node_id)}/data", timeout=timeout)
        except httpx.HTTPError:
            return None
        if r.status_code != 200:
            return None
        items = r.json().get("items")
        return dict(items) if isinstance(items, dict) else None

    def replica_items(self, timeout: float = 5.0) -> dict[str, dict[str, str] | None]:
        """Every node's ``GET /data``, fetched concurrently, keyed by ``n<id>``."""
        with ThreadPoolExecutor(max_workers=len(self.nodes)) as pool:
            futures = {f"n{n.id}": pool.submit(self.items, n.id, timeout) for n in self.nodes}
            return {name: f.result() for name, f in futures.items()}

    def wait_converged(self, timeout: float = 10.0,
                       interval: float = 0.25) -> tuple[float, dict[str, dict[str, str] | None]]:
        """Poll until all replicas of every shard hold the same items; (seconds, items).

        Raises with the remaining differences if the deadline passes.
        """
        shards = {s: [f"n{i}" for i in ids] for s, ids in self.state.shards.items()}
        start = time.monotonic()
        while True:
            items = self.replica_items()
            problems = check_convergence(items, shards)
            elapsed = time.monotonic() - start
            if not problems:
                return elapsed, items
            if elapsed > timeout:
                raise ChaosError(f"replicas did not converge within {timeout:.1f}s: "
                                 + "; ".join(problems))
            time.sleep(interval)

    def describe(self) -> str:
        """Human summary: nodes, addresses, shards, faults."""
        lines = [f"cluster {self.state.prefix!r} ({self.state.backend} backend)"]
        for node in self.nodes:
            status = "up" if self.backend.alive(node) else "DOWN"
            delay = self.state.delays.get(node.id)
            extra = f", +{delay:g} ms" if delay else ""
            lines.append(f"  node {node.id}  {node.url:<24} {node.shard:<8} {status}{extra}")
        if self.state.cuts:
            lines.append("  cuts: " + ", ".join(f"{a}->{b}" for a, b in self.state.cuts))
        if self.state.secret:
            lines.append(f"  cluster secret: {SECRET_ENV} in {self.workdir / 'state.json'} "
                         f"(send it as {SECRET_HEADER} with PUT /view)")
        else:
            lines.append("  no cluster secret: anyone who reaches a node can change its view")
        return "\n".join(lines)


@contextlib.contextmanager
def _locked(state_dir: Path, prefix: str) -> Iterator[None]:
    """Serialise CLI invocations on one cluster (flock on ``<state>/<prefix>.lock``)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    with (state_dir / f"{prefix}.lock").open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _down_stale(state_dir: Path, prefix: str, new_backend: str) -> None:
    """Remove what an earlier cluster of this prefix left behind, in any backend it used."""
    path = state_dir / prefix / "state.json"
    old: State | None = None
    if path.exists():
        with contextlib.suppress(ValueError, TypeError, KeyError):
            old = State.from_json(path.read_text())
    names = {new_backend} | ({old.backend} if old else set())
    for name in sorted(names):
        cls = backend_class(name)
        state = old if old and old.backend == name else State(backend=name, prefix=prefix,
                                                                nodes=[], shards={})
        with contextlib.suppress(ChaosError):
            if name != new_backend:
                cls.preflight()
            cls(state, state_dir / prefix).destroy()
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
