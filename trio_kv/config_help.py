"""One sentence per ``Config`` field, with its unit, for ``--help`` and docs/API.md.

Kept apart from ``config.py`` so that adding a field and describing it are separate edits;
a test checks that every field is described.
"""

from __future__ import annotations

HELP: dict[str, str] = {
    "node_id": "This node's id (an integer); it finds its own address in the view by it.",
    "host": "Address to listen on (IP or host name).",
    "port": "TCP port to listen on.",
    "cluster_secret": "Shared secret (text) that PUT /view and /internal/ routes require in "
    "X-KV-Secret; empty means none.",
    "max_value_bytes": "Largest value accepted, in bytes of UTF-8; larger gets 413.",
    "max_key_bytes": "Longest key accepted, in bytes of UTF-8; longer gets 400.",
    "max_request_bytes": "Largest request body accepted, in bytes; larger gets 413.",
    "max_header_bytes": "Largest request head (request line and headers), in bytes; larger "
    "gets 431.",
    "max_token_deps": "Most dependencies one causal-metadata token may hold, in or out (a "
    "count); more gets 400.",
    "max_token_bytes": "Largest causal-metadata token, in bytes of encoded JSON, in or out; "
    "larger gets 400.",
    "max_clock_skew": "How far a timestamp may run ahead of this node's wall clock, in "
    "seconds; further gets 400 (from a client) or is refused (from a peer).",
    "max_peer_message_bytes": "Largest /internal/ request or peer answer, in bytes.",
    "max_view_nodes": "Most nodes (and shards) one view may name (a count).",
    "wait_deadline": "Longest a request waits for causal dependencies, a view change or "
    "forwarding retries, in seconds; then 503.",
    "max_waiting": "Most requests parked in waits at once (a count); more get 503.",
    "retry_interval": "Retry period towards an unreachable peer, in seconds (formerly "
    "gossip_interval, still accepted as --gossip-interval and KV_GOSSIP_INTERVAL).",
    "heartbeat_interval": "Period of the idle summary exchange between replicas, in seconds.",
    "replication_linger": "Least time between two pushes to one peer under load, in seconds; "
    "the push then goes with the node's next input, or this long again at the latest.",
    "replication_report_interval": "Least time between a push to one peer and a push that "
    "carries no entries, only how far this node has seen each replica's writes (peers learn "
    "from it which writes every replica holds, so tokens shrink), in seconds.",
    "batch_entries": "Most entries in one replication batch (a count).",
    "batch_bytes": "Most bytes of entries in one replication batch, in bytes.",
    "peer_transport": "How this node calls its peers: channel (one persistent connection per "
    "peer on its own port, many calls in flight on it; a peer without it is called over HTTP) "
    "or http (one HTTP request per call).",
    "channel_max_in_flight": "Most frames one incoming peer channel has served at once (a "
    "count); the channel reads no more until one is answered.",
    "channel_send_linger": "Longest a peer frame waits for this node to have nothing else to "
    "run before it is sent anyway, in seconds (frames go out when the node goes idle, each "
    "peer's together; 0 sends them at the end of every pass of the event loop).",
    "channel_stall_timeout": "Longest the kernel may keep resending what this node wrote to a "
    "peer channel with no acknowledgement, in seconds (at least three of the path's base "
    "retransmission timeouts): the network is dropping it (a partition), so the channel is "
    "reset, its calls fail and the next call reconnects. Checked four times as often while "
    "calls are in flight; 0 turns it off, else at least 0.5. Calls over HTTP (peer_transport "
    "http, or to an older peer) wait out their timeout.",
    "connect_timeout": "Longest wait to open a connection to a peer, in seconds.",
    "peer_timeout": "Longest one replication or handoff call may take, in seconds.",
    "forward_attempt_timeout": "Longest one forwarded request to one replica may take, in "
    "seconds.",
    "forward_concurrency": "Most forwarded requests in flight from this node (a count).",
    "forward_retry_after": "How long a replica that failed a forward is tried last, in "
    "seconds.",
    "max_hops": "Most forwards of one request between nodes that disagree on the view (a "
    "count).",
    "dedup_entries": "Answers to forwarded writes remembered to deduplicate retries (a count).",
    "vnodes": "Virtual nodes per shard on the hash ring (a count); every node must agree.",
    "view_change_deadline": "Longest a view change waits for handoffs and pulls before it "
    "serves the new view, in seconds.",
    "put_view_timeout": "Longest a PUT /view waits for the change before answering 503, in "
    "seconds.",
    "handoff_batch_bytes": "Most bytes of entries in one handoff batch or pull page, encoded, "
    "in bytes.",
    "handoff_batch_entries": "Most entries in one handoff or pull page (a count).",
    "handoff_later_wait": "Longest a handoff waits for a new replica that said it would pull "
    "the keys itself before offering them again (it must then take them or hold them), in "
    "seconds; at most a quarter of view_change_deadline.",
    "handoff_retry_interval": "Longest pause between retries of unfinished handoffs and pulls, "
    "in seconds.",
    "fence_probe_interval": "While fenced, how often to ask the fencing shard which view it "
    "serves, in seconds.",
    "crossdeps_interval": "Least time between two rounds of asking other shards which "
    "dependencies of stored values on their keys are stable, in seconds.",
    "crossdeps_queue": "Most local keys waiting to have their dependencies on other shards' "
    "keys proven stable (a count); more wait until there is room.",
    "stable_query_deps": "Most dependencies asked about in one /internal/stable query, sent "
    "or received (a count); at least max_token_deps.",
    "keep_alive_timeout": "How long an idle client connection is kept open, in seconds.",
    "read_timeout": "Longest a client may take to send a request body, in seconds; then the "
    "connection is dropped.",
    "shutdown_grace": "How long in-flight requests may finish after SIGTERM, in seconds.",
    "log_level": "Least severity logged: debug, info, warning or error.",
    "log_format": "Log lines as json (one object per line), text, or auto (text on a "
    "terminal, JSON otherwise).",
    "access_log": "Log one line per HTTP request (method, path, status, seconds, request "
    "id): true or false.",
    "max_page_items": "Most items one page of GET /data?limit= may ask for (a count).",
    "max_request_id_bytes": "Longest X-Request-Id accepted from a client, in bytes; longer "
    "gets 400.",
    "data_dir": "Directory for this node's data file (kv.sqlite); empty keeps everything in "
    "memory (a restart starts empty).",
    "durability": "With a data dir: always (one fsync before each answer), batch (concurrent "
    "writes share one fsync, each answered after it) or none (memory only).",
    "max_commit_seconds": "Longest one disk commit may take, in seconds; past it the disk is "
    "taken to be stuck and the node stops (exit 3), as on a write error.",
    "tombstone_grace": "Least age of a delete before it may be forgotten, in seconds; a "
    "dependency older than this on an absent key counts as that delete.",
    "tombstone_interval": "How often stable deletes are looked for and forgotten, in seconds.",
    "gc_gen0_threshold": "Allocations between young-generation garbage collections (a count; "
    "0 keeps Python's 700).",
}


def describe(name: str) -> str:
    return HELP.get(name, f"The {name.replace('_', ' ')} setting.")
