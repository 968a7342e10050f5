"""Measuring instruments shared by the Flower benchmarks (``flower_side_by_side``, ``flower_scale``).

* :class:`TimingGrid` wraps the ``Grid`` a ``ServerApp`` gets: it counts the serialised bytes of
  every message sent to and received from each node and the seconds the server spent inside the
  grid (waiting for sites, plus Flower's own transport work), so that "server compute" is the
  wall of the server's round minus :attr:`TimingGrid.grid_seconds`.
* :func:`timing_mod` is a ClientApp mod placed OUTSIDE the mod it measures (first in ``mods``):
  it appends one JSON line per message (node id, seconds inside the inner mods and the user's
  function) to a file, because under Ray each message of one node may run in either actor
  process (a module-level counter would not see them all). :func:`site_seconds` sums them.
* :func:`content_bytes`: the size of a message's ``RecordDict`` as Flower's protobuf serialises it.
* :class:`ProcessMemory`: peak RSS of this process's Ray actor processes, sampled from ``/proc``.
* :func:`wait_for_nodes`, :func:`degree_and_threshold`: every node registered before a clock
  starts; secure_fl's SecAgg+ degree and threshold for n sites (what Flower is given too).

Nothing here is security-relevant; it only measures.
"""

from __future__ import annotations

import json
import os
import resource
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from flwr.app import Context, Message, RecordDict
from flwr.common.serde import recorddict_to_proto
from flwr.serverapp import Grid

#: The dropout rate secure_fl's plan assumes in these benchmarks (it sets the degree and threshold).
DROPOUT_RATE = 0.1

Mod = Callable[[Message, Context, Callable[[Message, Context], Message]], Message]


def content_bytes(content: RecordDict) -> int:
    """Bytes of ``content`` serialised as Flower's ``RecordDict`` protobuf (what the transport
    carries for the records; message metadata excluded)."""
    return int(recorddict_to_proto(content).ByteSize())


def _message_bytes(message: Message) -> int:
    return content_bytes(message.content) if message.has_content() else 0


class TimingGrid(Grid):
    """A ``Grid`` that forwards every call to ``inner`` and measures it: per node the bytes
    sent to it (:attr:`bytes_to`) and received from it (:attr:`bytes_from`), and the seconds
    spent inside the grid (:attr:`grid_seconds`). Counting runs only while :attr:`counting`."""

    def __init__(self, inner: Grid) -> None:
        self.inner = inner
        self.bytes_to: dict[int, int] = defaultdict(int)
        self.bytes_from: dict[int, int] = defaultdict(int)
        self.grid_seconds = 0.0
        #: (messages sent, replies, seconds) of each ``send_and_receive`` call: the stages.
        self.exchanges: list[tuple[int, int, float]] = []
        self.counting = True

    def reset(self) -> None:
        """Zero every counter."""
        self.bytes_to.clear()
        self.bytes_from.clear()
        self.grid_seconds = 0.0
        self.exchanges.clear()

    def set_run(self, run: Any) -> None:
        self.inner.set_run(run)

    @property
    def run(self) -> Any:
        return self.inner.run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return self.inner.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        t0 = time.perf_counter()
        try:
            return list(self.inner.get_node_ids())
        finally:
            self.grid_seconds += time.perf_counter() - t0

    def _sent(self, messages: list[Message]) -> None:
        if self.counting:
            for m in messages:
                self.bytes_to[int(m.metadata.dst_node_id)] += _message_bytes(m)

    def _received(self, messages: list[Message]) -> None:
        if self.counting:
            for m in messages:
                self.bytes_from[int(m.metadata.src_node_id)] += _message_bytes(m)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        t0 = time.perf_counter()
        listed = list(messages)
        self._sent(listed)
        try:
            return list(self.inner.push_messages(listed))
        finally:
            self.grid_seconds += time.perf_counter() - t0

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        t0 = time.perf_counter()
        try:
            replies = list(self.inner.pull_messages(message_ids))
            self._received(replies)
            return replies
        finally:
            self.grid_seconds += time.perf_counter() - t0

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        t0 = time.perf_counter()
        listed = list(messages)
        self._sent(listed)
        try:
            replies = list(self.inner.send_and_receive(listed, timeout=timeout))
            self._received(replies)
            if self.counting:
                self.exchanges.append((len(listed), len(replies), time.perf_counter() - t0))
            return replies
        finally:
            self.grid_seconds += time.perf_counter() - t0


def timing_mod(log_path: str | Path) -> Mod:
    """A mod appending ``{"node", "pid", "seconds"}`` to ``log_path`` (JSON lines) for each
    message: the wall seconds of everything inside it (inner mods and the user's function)."""
    path = str(log_path)

    def mod(
        message: Message, context: Context, call_next: Callable[[Message, Context], Message]
    ) -> Message:
        t0 = time.perf_counter()
        reply = call_next(message, context)
        seconds = time.perf_counter() - t0
        line = json.dumps({"node": int(context.node_id), "pid": os.getpid(), "seconds": seconds})
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(line + "\n")
        return reply

    return mod


def log_lines(log_path: str | Path) -> int:
    """How many lines :func:`timing_mod` has written to ``log_path`` so far (0: no file)."""
    path = Path(log_path)
    return len(path.read_text(encoding="utf-8").splitlines()) if path.exists() else 0


def site_seconds(log_path: str | Path, *, skip: int = 0) -> dict[int, float]:
    """Node id -> seconds summed over the lines :func:`timing_mod` wrote after the first
    ``skip`` (those of earlier rounds; see :func:`log_lines`); empty when none."""
    out: dict[int, float] = defaultdict(float)
    path = Path(log_path)
    if not path.exists():
        return {}
    for line in path.read_text(encoding="utf-8").splitlines()[skip:]:
        if line.strip():
            row = json.loads(line)
            out[int(row["node"])] += float(row["seconds"])
    return dict(out)


def peak_rss_mib() -> float:
    """This process's peak resident memory in MiB (``ru_maxrss``, KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def children_peak_rss_mib() -> float:
    """The largest peak resident memory among this process's waited-for children, MiB."""
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0


def mean(values: Iterable[float]) -> float:
    """The arithmetic mean (0.0 for no values)."""
    listed = list(values)
    return sum(listed) / len(listed) if listed else 0.0


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table (floats with 4 significant digits)."""

    def cell(x: Any) -> str:
        if isinstance(x, float):
            return f"{x:.4g}"
        return str(x)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)


def ratio(ours: float, theirs: float) -> str:
    """``ours / theirs`` as text, or "n/a" when either is missing or the base is 0."""
    if not theirs or ours is None:
        return "n/a"
    return f"{ours / theirs:.3g}x"


def quiet_flower() -> None:
    """Lower Flower's and Ray's log level (benchmarks print their own table)."""
    import logging

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    logging.getLogger("flwr").setLevel(logging.WARNING)


def write_json(path: str | Path | None, data: Mapping[str, Any]) -> None:
    """Write ``data`` as indented JSON to ``path`` (nothing when ``path`` is None)."""
    if path is None:
        return
    Path(path).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _parent(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("PPid:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def _descends_from(pid: int, root: int) -> bool:
    seen = 0
    while pid > 1 and seen < 64:
        if pid == root:
            return True
        pid = _parent(pid)
        seen += 1
    return False


def _proc_peak_kib(pid: str) -> int:
    try:
        with open(f"/proc/{pid}/status", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


class ProcessMemory:
    """Samples (every ``interval`` s, in a thread) the peak resident memory (``VmHWM`` from
    ``/proc``, Linux only) of every descendant of this process whose command line starts with
    ``prefix`` (Ray names its actor processes ``ray::ClientAppActor...``; other programs' Ray
    actors on the machine are not counted). :meth:`stop` returns pid -> peak MiB seen (empty
    where ``/proc`` is missing)."""

    def __init__(self, prefix: str = "ray::ClientAppActor", interval: float = 0.5) -> None:
        import threading

        self.prefix = prefix.encode()
        self.interval = interval
        self.peaks: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _scan(self) -> None:
        proc = Path("/proc")
        if not proc.is_dir():
            return
        for entry in proc.iterdir():
            if not entry.name.isdigit():
                continue
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            pid = int(entry.name)
            if cmdline.startswith(self.prefix) and _descends_from(pid, os.getpid()):
                kib = _proc_peak_kib(entry.name)
                self.peaks[pid] = max(self.peaks.get(pid, 0.0), kib / 1024.0)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._scan()
            self._stop.wait(self.interval)

    def start(self) -> ProcessMemory:
        """Start sampling; returns self."""
        self._thread.start()
        return self

    def stop(self) -> dict[int, float]:
        """Stop sampling (one last scan first); pid -> peak MiB."""
        self._scan()
        self._stop.set()
        self._thread.join()
        return dict(self.peaks)


def wait_for_nodes(grid: Any, count: int, timeout_s: float = 600.0) -> list[int]:
    """The ids of ``grid``'s nodes once ``count`` are registered. Errors: RuntimeError after
    ``timeout_s`` seconds."""
    deadline = time.monotonic() + timeout_s
    while True:
        nodes = sorted(int(n) for n in grid.get_node_ids())
        if len(nodes) >= count:
            return nodes
        if time.monotonic() > deadline:
            raise RuntimeError(f"{len(nodes)} of {count} nodes registered after {timeout_s} s")
        time.sleep(0.1)


def degree_and_threshold(sites: int) -> tuple[int, int]:
    """secure_fl's SecAgg+ degree ``k`` and threshold for ``sites`` sites (dropout rate 0.1)."""
    from secure_fl.rounds import AggregationSpec, plan_round

    spec = AggregationSpec(protocol="secagg+", active=False, dropout_rate=DROPOUT_RATE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = plan_round(
            spec, dict.fromkeys(range(1, sites + 1), 1.0), vector_length=1, round_id=1
        )
    if plan.secagg is None or plan.secagg.k is None:  # pragma: no cover - secagg+ always has k
        raise RuntimeError("the SecAgg+ plan has no degree")
    return int(plan.secagg.k), int(plan.secagg.threshold)
