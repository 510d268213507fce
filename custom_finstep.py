"""custom_finstep: Finstep's chat API served as OpenAI's chat completions and Responses, as
Anthropic's Messages, as AG-UI, and as an MCP tool.

One file, standard library only, Python 3.8 or newer. Finstep answers one `query` per
request as a stream of status events; clients speak OpenAI's or Anthropic's APIs, AG-UI or MCP.
This proxy translates, forwarding every answer token the moment the upstream sends it.

Run:
    python custom_finstep.py --demo           # a built-in stand-in upstream, no key needed, port 4001
    python custom_finstep.py --help           # every setting, with its default
    python -m custom_finstep                  # the same (a script restarts itself as this module)

Settings (SETTINGS; each environment variable has a flag that overrides it, and --help and
the README give each its default, which Config holds once): FINSTEP_API_KEY, PROXY_API_KEY,
FINSTEP_ORIGINS, FINSTEP_API_URL, HOST, PORT, FINSTEP_USER_ID, FINSTEP_REASONING,
FINSTEP_MODELS, FINSTEP_TIMEOUT, FINSTEP_MAX_BODY, FINSTEP_BODY_BUDGET, FINSTEP_SESSIONS,
FINSTEP_SYSTEM, FINSTEP_SESSION_CACHE, FINSTEP_SESSION_MEMORY, FINSTEP_MAX_QUERY,
FINSTEP_HEARTBEAT, FINSTEP_MAX_STREAMS, FINSTEP_DRAIN_SECONDS, FINSTEP_UPSTREAM_IDLE,
FINSTEP_PREWARM, FINSTEP_PAGE, FINSTEP_TASKS, FINSTEP_SIGNING_KEY, FINSTEP_REDIS_URL,
FINSTEP_REDIS_PREFIX, FINSTEP_REDIS_TIMEOUT, LOG_LEVEL, LOG_FORMAT.

Endpoints: the route table, ROUTES, is the one list.

A request's way through this file, each step with its (section):

  ProxyServer.accept_connections       accepted by the thread that serves it, within the
                                       connection limit (The server)
  ProxyHandler.handle_one_request      an Exchange, the request's state to its log line (The HTTP handler)
    split_head, HeadReader             the head, whole or line by line, bounded (HTTP/1.1 framing)
    Headers, request_framing           its fields, and how its body is framed (HTTP/1.1 framing)
    Routing.dispatch                   routed by the server's RouteTable (Routes):
      check_browser                    the page's origin and Host: BrowserPolicy (Callers and browsers)
      endpoint, RouteTable.find        its Route: the key where needed, the method, the endpoint
    Endpoints.answer                   a route's `answer` (Endpoints; the others answer alone):
      authenticate, caller_of          the Caller, before the body (Callers and browsers)
      BodyReader                       the body, within the body budget (HTTP/1.1 framing)
      WireFormat.parse                 an AnswerRequest, or a DirectAnswer sent as it is (Wire formats)
      Cancellable                      held while it runs, should another request cancel it (Endpoints)
      AnswerPipeline.run               a stream slot, then (The answer pipeline):
        WireFormat.recall, plan_turn   the caller's memory: continue, fold, name (Conversations)
        KeyPool.order, UpstreamCall    the upstream, key after key, on a pooled connection
                                       (Keys; Upstream; Shared memory)
        AnswerRouter                   each read's events: text, reasoning, steps; limits, stops (Answers)
        WireFormat.render              the events as the client's bytes (Wire formats)
        ResponseSink                   written at once, one chunk a read; heartbeats (The HTTP handler)
        remember_turn, answered        the turn remembered for its next one (Conversations)
    RequestLog.log_summary             one log line, keys hidden (Logs); Metrics

    Also: the Watchdog (heartbeats, departed clients, slow heads), the demo upstream, main(),
    and, last, the page at / and its assets.

Hooks a WireFormat may override (one class a format; its `name` is what routes name):
    parse(body, headers)          the AnswerRequest the pipeline answers, or a DirectAnswer
                                  the format answers itself, without Finstep
    recall(request, caller)       what the format remembers for the caller (a response id)
    answered(turn, key, answer)   remember its own handles after a complete answer
    opening(), render(events), closing(answer)   the stream's bytes; failure(error) after its head
    document(answer)              the whole answer as one JSON body, when not streaming
    error_status(error), error_body(error)       an error before the head: its status and shape
    heartbeat                     the keep-alive's bytes (a property where they change: MCP's progress)
    handle, cancels               set by parse(): what a client may cancel this request by, and
                                  which of its caller's requests this one cancels
    opens_at_once, ends_cleanly_after_failure    class attributes

Standard-library internals relied upon, and why:
    BaseHTTPRequestHandler._headers_buffer   an event stream's head is held and leaves with its
                                             first body bytes, in one write
    BaseHTTPRequestHandler.rfile             swapped for a HeadReader while the head is read, to
                                             bound it (64 KB in all) and check each line
    HTTPServer.server_bind                   skipped for TCPServer's: it resolves the host's FQDN
    BaseServer.serve_forever, shutdown       replaced: threads accept their own connections; the
                                             per-connection steps (get_request, finish_request,
                                             shutdown_request) are socketserver's
    BaseHTTPRequestHandler.parse_request     replaced: the same checks and answers, without email
    urllib.request.ProxyHandler, Request._tunnel_host   the environment's proxies, read the way
                                             urllib reads them, once: where upstream requests go
    socket.socket.recv on an SSLSocket       peek the TCP stream under TLS: is an idle one closed?
    subprocess._args_from_interpreter_flags  a script restarting as a module keeps -X, -W, -O
"""

from __future__ import annotations  # annotations name classes defined further down

__version__ = "1.2.0"

import os
import sys


# --- Start-up: run as a module, even when started as a script -----------------------

def restart_as_module() -> None:
    """Replace this process (same PID, same arguments) by one that imports this file as a
    module and calls main(). `python custom_finstep.py` keeps the syntax tree of the whole
    file in memory for as long as the script runs, which for a server is always; an imported
    module frees it after compiling, and Python caches the bytecode for the next start.
    Returns only where this cannot be done: then the script simply runs as it is."""
    name = os.path.splitext(os.path.basename(__file__))[0]
    if __spec__ is not None or os.name != "posix" or not name.isidentifier() or not sys.executable:
        return  # run by `python -m` already, or no way to restart
    try:
        import subprocess  # the interpreter's own options (-X, -W, -O ...) carry over
        options = subprocess._args_from_interpreter_flags()
    except (ImportError, AttributeError):
        return
    folder = os.path.dirname(os.path.abspath(__file__))
    # sys.path as a script has it: this file's folder first, not the working directory. The
    # script's path stays on the command line, so `ps` and `pkill -f custom_finstep.py` find it.
    code = ("import sys; '' in sys.path and sys.path.remove(''); sys.path.insert(0, %r); "
            "import %s; sys.exit(%s.main(sys.argv[2:]))" % (folder, name, name))
    try:
        os.execv(sys.executable, [sys.executable] + options + ["-c", code] + sys.argv)
    except OSError:
        pass


if __name__ == "__main__":
    restart_as_module()  # before the imports below, which would otherwise be done twice


import base64
import bisect
import collections
import dataclasses
import datetime
import errno
import email.utils
import functools
import hashlib
import hmac
import http.client
import io
import ipaddress
import json
import logging
import math
import re
import select
import selectors
import signal
import socket
import socketserver
import ssl
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from http.server import ThreadingHTTPServer
from typing import Dict
from typing import Iterator
from typing import List
from typing import Mapping
from typing import NamedTuple
from typing import Optional
from typing import Sequence
from typing import Tuple
from typing import Union

log = logging.getLogger("custom_finstep")


# --- Configuration ------------------------------------------------------------------------

DEFAULT_UPSTREAM = "https://product-backend.finstep.cn/chat/api/chat/v2/completion"
REASONING_MODES = ("reasoning", "think", "content", "drop")
SESSION_MODES = ("auto", "fold")


SYSTEM_MODES = ("fold", "drop")
TASK_MODES = ("local", "forward")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
LOG_FORMATS = ("text", "json")


class ConfigError(ValueError):
    """A setting has a value that cannot work; the message names it."""


@dataclasses.dataclass(frozen=True)
class Config:
    api_keys: Tuple[str, ...] = ()
    proxy_keys: Tuple[str, ...] = ()
    origins: Tuple[str, ...] = ()  # () = pages on loopback origins and the proxy's own page
    upstream_url: str = DEFAULT_UPSTREAM
    host: str = "0.0.0.0"
    port: int = 4001
    user_id: str = "12345679"
    reasoning: str = "reasoning"
    models: Tuple[str, ...] = ("finstep-proxy",)
    timeout: float = 300.0
    max_body: int = 8388608
    body_budget: int = 67108864
    sessions: str = "auto"
    system: str = "fold"
    tasks: str = "local"
    session_cache: int = 10000
    session_memory: int = 67108864
    max_query: int = 20000
    heartbeat: float = 15.0
    max_streams: int = 256
    drain_seconds: float = 8.0
    upstream_idle: float = 30.0
    prewarm: bool = False
    page: bool = True
    redis_url: str = ""
    redis_prefix: str = "finstep:"
    redis_timeout: float = 0.25
    signing_key: str = ""
    log_level: str = "INFO"
    log_format: str = "text"
    demo: bool = False
    # Not user settings: fixed by the product, shrunk by the tests.
    connect_timeout: float = 10.0
    client_timeout: float = 10.0  # a client must send its request head and body within this
    session_ttl: float = 86400.0  # a remembered conversation is forgotten after this
    max_connections: int = 0  # open client connections; 0 = 4 x max_streams + 64

    @property
    def default_model(self) -> str:
        """The model a request names when it names none: the first FINSTEP_MODELS lists."""
        return self.models[0]

    @property
    def connection_limit(self) -> int:
        return self.max_connections or 4 * self.max_streams + 64


def _text(raw: str) -> str:
    value = raw.strip()
    if not value:
        raise ValueError("must not be empty")
    return value


def _keys(raw: str) -> Tuple[str, ...]:
    keys = tuple(part.strip() for part in raw.split(","))
    if not all(keys):
        raise ValueError("must be one key or several separated by commas, none empty")
    if any(ord(c) < 33 or ord(c) == 127 for key in keys for c in key):
        raise ValueError("must not contain spaces or control characters")
    if any(ord(c) > 255 for key in keys for c in key):
        raise ValueError("must be characters an HTTP header can carry (Latin-1)")
    return keys


def _number(raw: str, kind=int):
    try:
        return kind(raw.strip())
    except ValueError:
        raise ValueError("is not a number") from None


def _port(raw: str) -> int:
    value = _number(raw)
    if not 0 <= value <= 65535:
        raise ValueError("must be from 0 to 65535")
    return value


def _positive_float(raw: str) -> float:
    value = _number(raw, float)
    if not (value > 0 and math.isfinite(value)):
        raise ValueError("must be a positive number of seconds")
    return value


def _positive_int(raw: str) -> int:
    value = _number(raw)
    if value < 1:
        raise ValueError("must be a positive whole number")
    return value


def _switch(raw: str) -> bool:
    value = raw.strip().lower()
    if value not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
        raise ValueError("must be 1 or 0 (also true/false, yes/no, on/off)")
    return value in ("1", "true", "yes", "on")


def _redis_url(raw: str) -> str:
    value = raw.strip()
    if parse_redis_url(value) is None:
        raise ValueError("must be redis://[user:password@]host[:port][/db] or rediss://… (TLS)")
    return value


def _url(raw: str) -> str:
    value = raw.strip()
    parts = urllib.parse.urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http:// or https:// URL")
    return value


def _choice(choices: Sequence[str], fold=str.lower):
    def convert(raw: str) -> str:
        value = fold(raw.strip())
        if value not in choices:
            raise ValueError("must be one of " + ", ".join(choices))
        return value
    return convert


def _origins(raw: str) -> Tuple[str, ...]:
    origins = tuple(part.strip() for part in raw.split(",") if part.strip())
    if not origins:
        raise ValueError("must list at least one origin, or *")
    for origin in origins:
        if any(ord(c) < 33 or ord(c) > 126 for c in origin):
            raise ValueError("must not contain spaces or control characters")
        parts = urllib.parse.urlsplit(origin)
        if parts.scheme in ("http", "https") and (parts.path not in ("", "/") or parts.query or not parts.hostname):
            raise ValueError("takes origins like https://chat.example.com:8443, without a path")
    return tuple(normal_origin(origin) for origin in origins)


def _secret(raw: str) -> str:
    value = raw.strip()
    if len(value) < 16 or any(ord(c) < 33 or ord(c) == 127 for c in value):
        raise ValueError("must be at least 16 characters, no spaces or control characters")
    return value


def _models(raw: str) -> Tuple[str, ...]:
    ids = tuple(part.strip() for part in raw.split(",") if part.strip())
    if not ids:
        raise ValueError("must list at least one model id")
    return ids


Setting = collections.namedtuple("Setting", "field env flag convert help")

# Every setting once: its Config field (and default), environment variable, flag, converter
# and help. --help and load_config() are made from this table, and the README's table is
# tested against it, so none of them can disagree.
SETTINGS = (
    Setting("api_keys", "FINSTEP_API_KEY", "--api-key", _keys,
            "upstream Finstep key, or several separated by commas (new conversations rotate over them); "
            "when unset, the client's 'Authorization: Bearer <key>' is passed through"),
    Setting("proxy_keys", "PROXY_API_KEY", "--proxy-key", _keys,
            "key(s) clients must present as 'Authorization: Bearer <key>' or x-api-key (comma-separated); "
            "requires FINSTEP_API_KEY"),
    Setting("origins", "FINSTEP_ORIGINS", "--origins", _origins,
            "web origins (scheme://host[:port], comma-separated, * for any) whose pages may call a proxy "
            "that holds FINSTEP_API_KEY and asks no PROXY_API_KEY; others get 403. Unset: http and https on "
            "localhost, 127.0.0.1 and [::1], any port, and the proxy's own page. With a key to present, any "
            "origin may call"),
    Setting("upstream_url", "FINSTEP_API_URL", "--upstream", _url, "upstream endpoint"),
    Setting("host", "HOST", "--host", _text, "listen address"),
    Setting("port", "PORT", "--port", _port, "listen port (0 picks a free one)"),
    Setting("user_id", "FINSTEP_USER_ID", "--user-id", _text, "userId sent upstream"),
    Setting("reasoning", "FINSTEP_REASONING", "--reasoning", _choice(REASONING_MODES),
            "where deepthink text goes: reasoning (reasoning_content field), think (<think> block in "
            "content), content (plain content), drop"),
    Setting("models", "FINSTEP_MODELS", "--models", _models, "comma-separated model ids listed by /v1/models"),
    Setting("timeout", "FINSTEP_TIMEOUT", "--timeout", _positive_float,
            "seconds the upstream may stay silent before the request fails"),
    Setting("max_body", "FINSTEP_MAX_BODY", "--max-body", _positive_int, "largest request body in bytes"),
    Setting("body_budget", "FINSTEP_BODY_BUDGET", "--body-budget", _positive_int,
            "bytes all request bodies together may take in memory, parsed form included; a request that "
            "does not fit gets 503 with Retry-After"),
    Setting("sessions", "FINSTEP_SESSIONS", "--sessions", _choice(SESSION_MODES),
            "auto: continue the upstream session when the history matches an earlier answer, else fold "
            "the history into the query; fold: always a new session with the folded history"),
    Setting("system", "FINSTEP_SYSTEM", "--system", _choice(SYSTEM_MODES),
            "the client's system and developer messages: fold (into the first query of a new upstream "
            "session) or drop (never sent upstream; the first query is the question alone)"),
    Setting("tasks", "FINSTEP_TASKS", "--tasks", _choice(TASK_MODES),
            "chat UIs' background tasks (Open WebUI's titles, tags, follow-ups and search queries, LobeChat's "
            "and Cherry Studio's topic titles): local (answered here in the form they ask for, without "
            "Finstep) or forward (asked of Finstep like any question)"),
    Setting("session_cache", "FINSTEP_SESSION_CACHE", "--session-cache", _positive_int,
            "conversations remembered in memory for continuation, least recently used evicted"),
    Setting("session_memory", "FINSTEP_SESSION_MEMORY", "--session-memory", _positive_int,
            "bytes the remembered conversations and responses may take in memory, least recently used "
            "evicted"),
    Setting("max_query", "FINSTEP_MAX_QUERY", "--max-query", _positive_int,
            "longest folded query in characters; the oldest turns are dropped first"),
    Setting("heartbeat", "FINSTEP_HEARTBEAT", "--heartbeat", _positive_float,
            "longest silence in seconds a streaming client sees; ': keep-alive' comments fill it"),
    Setting("max_streams", "FINSTEP_MAX_STREAMS", "--max-streams", _positive_int,
            "concurrent upstream requests; above it clients get 503 with Retry-After"),
    Setting("drain_seconds", "FINSTEP_DRAIN_SECONDS", "--drain-seconds", _positive_float,
            "on SIGTERM, seconds streams in flight may take to finish"),
    Setting("upstream_idle", "FINSTEP_UPSTREAM_IDLE", "--upstream-idle", _positive_float,
            "seconds an unused upstream connection stays open for the next request"),
    Setting("prewarm", "FINSTEP_PREWARM", "--prewarm", _switch,
            "on: keep upstream connections open at all times, as many as the last ten minutes' peak of "
            "requests needs (at least one), so even the first requests after a quiet spell skip the TCP "
            "and TLS handshakes"),
    Setting("page", "FINSTEP_PAGE", "--page", _switch,
            "on: GET / serves a page to try the proxy and see its status; off: / is a 404"),
    Setting("redis_url", "FINSTEP_REDIS_URL", "--redis-url", _redis_url,
            "redis://[user:password@]host:port/db or rediss://… (TLS): conversations, response ids and key "
            "cool-downs shared by every replica; unset: each process remembers on its own"),
    Setting("redis_prefix", "FINSTEP_REDIS_PREFIX", "--redis-prefix", _text,
            "prefix of every Redis key the proxy writes"),
    Setting("redis_timeout", "FINSTEP_REDIS_TIMEOUT", "--redis-timeout", _positive_float,
            "seconds a Redis call may take in all before the request goes on without it"),
    Setting("signing_key", "FINSTEP_SIGNING_KEY", "--signing-key", _secret,
            "secret that signs the thinking blocks of Anthropic's Messages API, the same on every replica; "
            "unset: one random secret shared through FINSTEP_REDIS_URL, else one per process"),
    Setting("log_level", "LOG_LEVEL", "--log-level", _choice(LOG_LEVELS, str.upper),
            "DEBUG, INFO, WARNING or ERROR"),
    Setting("log_format", "LOG_FORMAT", "--log-format", _choice(LOG_FORMATS),
            "text, or json for one JSON object per line"),
)


def default_text(field: str) -> str:
    """A setting's default as written in --help and the README: "" when unset."""
    value = Config.__dataclass_fields__[field].default
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, tuple):
        return ",".join(value)
    if isinstance(value, float):
        return "%g" % value
    return str(value)


def build_arg_parser() -> "argparse.ArgumentParser":
    import argparse  # here, not above: a start without flags (the usual one) needs none of it
    parser = argparse.ArgumentParser(
        prog="custom_finstep.py",
        description="Serve Finstep's chat API as an OpenAI-compatible API. "
                    "Every flag overrides the environment variable named beside it.")
    for setting in SETTINGS:
        parser.add_argument(setting.flag, dest=setting.field, metavar=setting.env, help="[env %s] %s (default: %s)" % (
            setting.env, setting.help, default_text(setting.field) or "unset"))
    parser.add_argument("--demo", action="store_true",
                        help="serve a built-in stand-in for the upstream (no key needed) to try the proxy")
    parser.add_argument("--version", action="version", version="%(prog)s " + __version__)
    return parser


def load_config(environ: Mapping[str, str], argv: Sequence[str]) -> Config:
    """Build the configuration from the environment and the command line.

    Flags override environment variables; an empty variable counts as unset.
    Raises ConfigError naming the bad setting (argparse exits on bad flags)."""
    flags = vars(build_arg_parser().parse_args(list(argv))) if argv else {}
    values = {"demo": flags.get("demo", False)}
    for setting in SETTINGS:
        from_flag = flags.get(setting.field)
        raw = from_flag if from_flag is not None else environ.get(setting.env, "")
        if from_flag is None and not raw.strip():
            continue
        try:
            values[setting.field] = setting.convert(raw)
        except ValueError as exc:
            shown = "" if setting.field.endswith(("_keys", "_key")) else ", got %r" % raw
            raise ConfigError("%s (%s) %s%s" % (setting.env, setting.flag, exc, shown)) from None
    if values.get("body_budget", Config.body_budget) < values.get("max_body", Config.max_body):
        raise ConfigError("FINSTEP_BODY_BUDGET (--body-budget) must be at least FINSTEP_MAX_BODY (--max-body): "
                          "a body of the largest size allowed could never be read")
    if values.get("proxy_keys") and not values.get("api_keys"):
        raise ConfigError("PROXY_API_KEY (--proxy-key) is set but FINSTEP_API_KEY (--api-key) is not: "
                          "with PROXY_API_KEY, clients' keys are never sent upstream, so no request could work")
    return Config(**values)


# --- Logs: keys hidden, control characters escaped, one line a request --------------------

def mask_key(key: Optional[str]) -> str:
    """A key as it may appear in a log: short keys hidden whole, long ones by all but the last 4
    (escaped: a pass-through key's tail is a client's text)."""
    if not key:
        return "-"
    return "****" if len(key) < 12 else "****" + printable(key[-4:])


KEY_RUN = 8  # no run of this many characters of a key may be shown
MAX_KEY_LENGTH = 256  # a pass-through key longer than any real key is refused before it is remembered


@functools.lru_cache(maxsize=1024)  # at most 1024 x (MAX_KEY_LENGTH + 100) bytes: about 0.4 MB
def key_digest(key: str) -> str:
    """What the proxy remembers of a key, in memory and in Redis: never the key itself."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:32]


@functools.lru_cache(maxsize=64)  # at most 64 x MAX_KEY_LENGTH runs of 8 characters: about 1 MB
def key_runs(key: str) -> Tuple[str, ...]:
    """Every KEY_RUN-character run of a key, lower-cased, each once: a position of a text then
    begins at most one of them, whatever the key repeats. A shorter key has none: hiding it
    would mangle ordinary words ("k" in "key"), and no upstream echoes a key that short."""
    key = key.lower()
    return tuple(dict.fromkeys(key[start:start + KEY_RUN] for start in range(len(key) - KEY_RUN + 1)))


@functools.lru_cache(maxsize=64)  # as key_runs: a few keys' runs each
def any_key_run(keys: Tuple[str, ...]):
    """One search for every run of `keys` (key_runs) in lower-cased text, or None if they have none."""
    runs = sorted({run for key in keys for run in key_runs(key)})
    return re.compile("|".join(map(re.escape, runs))).search if runs else None


def holds_key(text: str, keys: Sequence[str]) -> bool:
    """Whether `text` holds a run of a key (what hide_keys hides): one search for them all."""
    search = any_key_run(tuple(keys))
    return search is not None and search(text.lower()) is not None


def hide_keys(text: str, keys: Sequence[str]) -> str:
    """`text` with every stretch that holds KEY_RUN or more characters of a key in a row, in
    any letter case, replaced by `****`: a key echoed whole, cut short or upper-cased alike."""
    if not holds_key(text, keys):  # as nearly always: one search instead of one per run
        return text
    lowered, spans = text.lower(), []
    for key in keys:
        for run in key_runs(key):
            start = lowered.find(run)
            while start >= 0:
                spans.append((start, start + len(run)))
                start = lowered.find(run, start + 1)
    if not spans:
        return text
    out, shown = [], 0
    for start, end in sorted(spans):
        if start > shown:
            out.append(text[shown:start] + "****")
        elif not out:
            out.append("****")
        shown = max(shown, end)
    return "".join(out) + text[shown:]


# C0 and C1 controls and DEL (terminal escapes, backspaces), and the characters that break a
# line or reorder the text shown (line separators, bidirectional overrides).
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def _escape(match) -> str:
    code = ord(match.group())
    return "\\x%02x" % code if code < 256 else "\\u%04x" % code


def printable(text: str, lines: bool = False) -> str:
    """`text` with every control character escaped (ESC as \\x1b), line feeds kept when
    `lines`: what a client sent may reach a log line, never as a terminal's escape sequence."""
    if not _UNPRINTABLE.search(text):
        return text
    if lines:
        return "\n".join(_UNPRINTABLE.sub(_escape, line) for line in text.split("\n"))
    return _UNPRINTABLE.sub(_escape, text)


class KeyFilter(logging.Filter):
    """Every line the proxy logs passes here: upstream keys hidden (the configured ones, and
    the key a record names as its `secret`, a client's pass-through key), and control
    characters escaped, since much of a line is what clients sent (a method, a path, the
    tail of a key). Installed by each server."""

    def __init__(self, keys: Sequence[str]):
        super().__init__()
        self.keys = tuple(keys)

    def hide(self, text: str, secret: Optional[str] = None) -> str:
        """`text` with the configured keys and `secret` hidden: for log lines and for every
        error message a client is sent."""
        return hide_keys(text, self.keys_with(secret))

    def keys_with(self, secret: Optional[str]) -> Tuple[str, ...]:
        return self.keys + (secret,) if secret else self.keys

    def filter(self, record: logging.LogRecord) -> bool:
        secret = getattr(record, "secret", None)
        hiding = self.keys or secret
        message = record.getMessage()
        # The line as shown, once: the formatter takes it as it is (no second % of the arguments).
        shown = printable(self.hide(message, secret) if hiding else message)
        record.msg, record.args = shown, ()
        if record.exc_info and not record.exc_text:  # a traceback is text too
            text = logging.Formatter().formatException(record.exc_info)
            record.exc_text = printable(self.hide(text, secret) if hiding else text, lines=True)
        fields = getattr(record, "fields", None)
        if fields:
            texts = [value for value in fields.values() if isinstance(value, str)]
            # Part of a line that needed no cleaning, a text needs none: a request's fields are
            # pieces of its line (client, path, note ...), so this is one look, not a search.
            clean = shown == message and all(text in message for text in texts)
            if not clean and self.to_clean(texts, secret):
                record.fields = {name: printable(self.hide(value, secret) if hiding else value)
                                 if isinstance(value, str) else value for name, value in fields.items()}
        return True

    def to_clean(self, texts: List[str], secret: Optional[str]) -> bool:
        """Whether any of `texts` holds a control character or a key: one look at them all,
        joined by a space (printable) for the controls, by NUL (in no key) for the keys."""
        return bool(_UNPRINTABLE.search(" ".join(texts))) or holds_key("\x00".join(texts), self.keys_with(secret))


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = "-"
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, request_id, message, and the request's fields."""

    def format(self, record: logging.LogRecord) -> str:
        moment = datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc)
        entry = {"time": moment.isoformat(timespec="milliseconds"), "level": record.levelname,
                 "request_id": getattr(record, "request_id", "-"), "message": record.getMessage()}
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(config: Config) -> None:
    # What no line of the proxy shows is not gathered for every record: the caller's file and
    # line (a walk up the stack), thread and process (the logging HOWTO's "Optimization").
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_RequestIdFilter())
    handler.setFormatter(JsonFormatter() if config.log_format == "json" else
                         logging.Formatter("%(asctime)s %(levelname)s [%(request_id)s] %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(config.log_level)


class RequestLog:
    """One line a request, from its Exchange, once it is answered; a dropped connection's line
    at DEBUG. Every line passes the KeyFilter: keys hidden, control characters escaped."""

    def log(self, level: int, message: str, *args, fields: Optional[dict] = None) -> None:
        # The upstream key in use is kept out of sight too: a client's own, when passed through.
        exchange = self.exchange
        log.log(level, message, *args, extra={"request_id": exchange.request_id, "fields": fields or {},
                                              "secret": exchange.upstream.key if exchange.upstream else None})

    def log_summary(self) -> None:
        exchange = self.exchange
        seconds = time.monotonic() - exchange.started
        route = exchange.route  # the route found for its path: its label needs no second look
        label = (route.label or route.path) if route is not None else self.server.routes.label(self.path or "-")
        self.server.metrics.request(label, exchange.status, seconds)
        level = logging.DEBUG if route is not None and route.quiet and exchange.status == 200 else logging.INFO
        if not log.isEnabledFor(level):
            return
        path = self.logged_path()
        upstream_status = exchange.upstream.status if exchange.upstream else None
        note = exchange.note
        self.log(level, "%s %s %s %s %.1fms upstream=%s chunks=%d%s", self.client_address[0], self.command or "-",
                 path, exchange.status, seconds * 1000, upstream_status or "-", exchange.chunks, note,
                 fields={"client": self.client_address[0], "method": self.command or "-", "path": path,
                         "status": exchange.status, "duration_ms": round(seconds * 1000, 1),
                         "upstream_status": upstream_status, "chunks": exchange.chunks, "note": note.strip(),
                         "session": exchange.session, "conn": exchange.conn, "cut": exchange.cut,
                         "error": exchange.error})

    def logged_path(self) -> str:
        return printable((self.path or "-").split("?", 1)[0][:200])

    def log_drop(self) -> None:
        # Routine: an idle keep-alive connection (a partial request is answered 408 and logged).
        self.log(logging.DEBUG, "%s closed: %s", self.client_address[0], self.exchange.dropped)

    def log_request(self, code="-", size="-") -> None:
        self.exchange.status = int(code)  # the summary line is written once the request is over

    def log_message(self, format: str, *args) -> None:
        self.log(logging.INFO, "%s %s", self.client_address[0], format % args)

    def log_error(self, format: str, *args) -> None:
        # Whatever http.server still reports on its own; every request has its summary line.
        self.log(logging.DEBUG, "%s %s", self.client_address[0], format % args)


# --- Errors: raised anywhere, answered in one place ---------------------------------------

_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                429: "rate_limit_error", 502: "upstream_error", 504: "timeout_error"}


class ProxyError(Exception):
    """A failure with its OpenAI-format answer: raised anywhere, answered in one place."""

    def __init__(self, status: int, message: str, code: Optional[str] = None,
                 param: Optional[str] = None, type_: Optional[str] = None,
                 headers: Optional[Dict[str, str]] = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.type = type_ or _ERROR_TYPES.get(
            status, "invalid_request_error" if status < 500 else "server_error")
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.type, self.code, self.param)


def error_body(message: str, type_: str, code: Optional[str] = None, param: Optional[str] = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def status_phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "HTTP %d" % status


def _invalid(message: str, param: Optional[str]) -> ProxyError:
    return ProxyError(400, message, code="invalid_request", param=param)


def _unsupported(message: str, param: str) -> ProxyError:
    return ProxyError(400, message, code="unsupported_parameter", param=param)


# --- HTTP/1.1 framing: request heads and bodies, chunked responses, the memory bodies take ---

# Request framing (RFC 9112): what a front proxy and this proxy must read the same way.
MAX_HEAD = 65536  # a request line and all its header lines together
TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


FIELD_VALUE = rb"[\t\x20-\x7e\x80-\xff]*"  # a header value: no line breaks, no other control characters
_HEADER_LINE = re.compile(TOKEN.pattern.encode("ascii") + rb":" + FIELD_VALUE + rb"\r?\n")
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,16})[\t ]*(?:;[^\r\n]*)?")
NO_BODY, LENGTH, CHUNKED = "none", "length", "chunked"  # how a body is framed: (kind, declared length)


def header_line_ok(line: bytes) -> bool:
    """A header field line as RFC 9112 allows it: a token, a colon, a value; no space before
    the colon, no line folding, no control characters."""
    return _HEADER_LINE.fullmatch(line) is not None


def parse_chunk_size(line: bytes) -> Optional[int]:
    """The size of a chunk from its size line (without the line ending), or None: hex digits
    only (no sign, prefix or underscore), then optional extensions."""
    match = _CHUNK_SIZE.fullmatch(line)
    return int(match.group(1), 16) if match else None


def request_framing(headers, version: str, max_body: int) -> Tuple[str, int]:
    """How a request's body is framed: (NO_BODY, 0), (LENGTH, n) or (CHUNKED, 0). Framing a
    front proxy could read differently is refused: differing Content-Length values, a length
    that is not ASCII digits, a transfer coding other than chunked. With both headers,
    chunked wins (the caller closes the connection after the response)."""
    codings = [c.strip().lower() for value in headers.get_all("Transfer-Encoding") or () for c in value.split(",")]
    if codings:
        if version == "HTTP/1.0" or codings[-1] != "chunked":
            raise _invalid("Transfer-Encoding must end with chunked (and needs HTTP/1.1)", None)
        if codings != ["chunked"]:
            raise ProxyError(501, "Transfer codings other than chunked are not supported", code="not_implemented")
        return CHUNKED, 0
    lengths = {v.strip() for value in headers.get_all("Content-Length") or () for v in value.split(",")}
    if not lengths:
        return NO_BODY, 0
    if len(lengths) > 1:
        raise _invalid("Content-Length values differ", None)
    length = lengths.pop()
    if not (length.isascii() and length.isdigit()):
        raise _invalid("Content-Length is not a number", None)
    if int(length) > max_body:
        raise ProxyError(413, "Request body of %s bytes is larger than the limit of %d bytes" % (length, max_body),
                         code="request_too_large")
    return LENGTH, int(length)


# Python 3.8's JSON decoder holds some 90 bytes per \\u escape while it parses; later ones do not.
ESCAPES_COST = sys.version_info < (3, 9)


def parse_cost(body: bytes) -> int:
    """An upper estimate of the memory a JSON request body takes while it is parsed and its
    text kept: three bytes a byte (the decoded text, the parsed strings), and 96 bytes for
    each JSON value, which follows a comma or a colon or opens an object or array. Measured
    on hostile shapes (8 MB of `[{},...]` parses into 200 MB) and on real text alike."""
    values = body.count(b",") + body.count(b":") + body.count(b"{") + body.count(b"[") + 1
    if ESCAPES_COST:
        values += body.count(b"\\")
    return 3 * len(body) + 96 * values


class HeadTooLong(ValueError):
    """A request head past MAX_HEAD bytes, or a header line past MAX_HEAD_LINE."""


MAX_HEAD_FIELDS = 100  # header fields in a request head, as http.server allows
MAX_HEAD_LINE = 65536


def header_field(line: bytes) -> Optional[Tuple[str, str]]:
    """A header line as (name, value): the name as sent, the value without the whitespace
    around it; None for a line that is no field (HeadReader has marked it malformed)."""
    name, colon, value = line.decode("latin-1").partition(":")
    if not colon or not name or name[0] in " \t" or name[-1] in " \t":
        return None
    return name, value.strip(" \t\r\n")


_NO_NAMES = frozenset()


class Headers:
    """A request's header fields in their order, looked up without regard to case: `get`
    gives the first of a name (as email.message does, which http.server would have used),
    `get_all` each of them."""

    __slots__ = ("fields", "first", "repeated")

    def __init__(self, fields: Sequence[Tuple[str, str]] = ()):
        self.fields = fields = list(fields)
        self.first = first = {name.lower(): value for name, value in reversed(fields)}  # the first wins
        # Names (lower case) sent more than once: only they need a search.
        self.repeated = _NO_NAMES
        if len(first) < len(fields):
            names = collections.Counter(name.lower() for name, _ in fields)
            self.repeated = frozenset(name for name, count in names.items() if count > 1)

    def get(self, name: str, default=None):
        return self.first.get(name.lower(), default)

    def __getitem__(self, name: str) -> Optional[str]:
        return self.first.get(name.lower())

    def __contains__(self, name: str) -> bool:
        return name.lower() in self.first

    def get_all(self, name: str, default=None):
        name = name.lower()
        if name not in self.repeated:
            value = self.first.get(name)
            return default if value is None else [value]
        return [value for field, value in self.fields if field.lower() == name]

    def items(self) -> List[Tuple[str, str]]:
        return list(self.fields)

    def __len__(self) -> int:
        return len(self.fields)


def fields_of(lines: Sequence[bytes], checked: bool = False) -> Headers:
    """Headers from a head's field lines, those that are fields; OverflowError past
    MAX_HEAD_FIELDS lines, as http.server counts them, fields or not. `checked`: split_head
    found every line a field (_HEADER_BLOCK matched them: a token, a colon, a value of no
    control character but tab), so none is skipped and only the blanks around a value go."""
    if len(lines) > MAX_HEAD_FIELDS:
        raise OverflowError("more than %d header fields" % MAX_HEAD_FIELDS)
    if checked:  # one comprehension, no call or check per line
        return Headers([(name, value.strip(" \t")) for name, _, value in
                        [line.decode("latin-1").partition(":") for line in lines]])
    return Headers(filter(None, map(header_field, lines)))  # a line that is no field gives None


def read_headers(rfile) -> Headers:
    """The header fields of a request head, read line by line up to its blank line;
    HeadTooLong for a line past MAX_HEAD_LINE, OverflowError past MAX_HEAD_FIELDS lines."""
    lines = []
    while len(lines) <= MAX_HEAD_FIELDS:  # one line more is enough for fields_of to refuse
        line = rfile.readline(MAX_HEAD_LINE + 1)
        if len(line) > MAX_HEAD_LINE:
            raise HeadTooLong("header line")
        if line in (b"\r\n", b"\n", b""):
            break
        lines.append(line)
    return fields_of(lines)


_HEADER_BLOCK = re.compile(rb"(?:" + TOKEN.pattern.encode("ascii") + rb":" + FIELD_VALUE + rb"\r\n)*")


class WholeHead(NamedTuple):
    """A request head found whole in what a connection has buffered (split_head)."""
    request_line: bytes  # with its CRLF, as readline would have returned it
    field_lines: List[bytes]  # without their CRLF
    size: int  # bytes of the head, its blank line included
    malformed: bool  # a field line HeadReader would have refused


def whole_head_end(buffered: bytes) -> int:
    """Where a head at the start of `buffered` ends (its blank line's index), when all of it
    is there within MAX_HEAD with CRLF line ends only; else -1, and it is read line by line,
    which comes to the same. For request heads and the upstream's response heads alike."""
    end = buffered.find(b"\r\n\r\n")
    if end < 0 or end + 4 > MAX_HEAD or buffered.count(b"\n", 0, end) != buffered.count(b"\r\n", 0, end):
        return -1  # not all there, too long, or a bare LF somewhere
    return end


def split_head(buffered: bytes) -> Optional[WholeHead]:
    """The request head at the start of `buffered`, if whole_head_end finds it all there;
    None otherwise (it is then read line by line, with the same outcome). One search and
    one match instead of a readline and a check per line."""
    end = whole_head_end(buffered)
    if end < 0 or buffered.startswith(b"\r\n"):  # a stray line end first: as http.server reads it
        return None
    line_end = buffered.find(b"\r\n") + 2
    malformed = line_end < end + 2 and _HEADER_BLOCK.fullmatch(buffered, line_end, end + 2) is None
    fields = buffered[line_end:end].split(b"\r\n") if line_end < end + 2 else []
    return WholeHead(buffered[:line_end], fields, end + 4, malformed)


class HeadReader:
    """The client's stream while a request head is read: MAX_HEAD bytes for the request line
    and all header lines together (http.server alone would take 100 lines of 64 KB each),
    and every header line checked as it arrives."""

    def __init__(self, stream):
        self.stream, self.left = stream, MAX_HEAD
        self.lines = 0
        self.malformed = False
        self.cut = False  # the connection was dropped: what still arrives is no request

    def readline(self, limit: int = -1) -> bytes:
        line = self.stream.readline(self.left + 1 if limit < 0 else min(limit, self.left + 1))
        if self.cut and self.lines:
            return b""
        self.left -= len(line)
        self.lines += 1
        if self.left < 0:
            raise HeadTooLong("request head over %d bytes" % MAX_HEAD)
        if self.lines > 1 and line not in (b"\r\n", b"\n", b"") and not header_line_ok(line):
            self.malformed = True
        return line


class MemoryBudget:
    """A number of bytes shared by all connections: taken before memory is used, given back
    after."""

    def __init__(self, limit: int):
        self.limit, self.used = limit, 0
        self.lock = threading.Lock()

    def take(self, size: int) -> bool:
        with self.lock:
            if self.used + size > self.limit:
                return False
            self.used += size
            return True

    def give(self, size: int) -> None:
        if size:
            with self.lock:
                self.used -= size


class BodyReader:
    """A request's body, read by its framing within the memory all bodies may take
    (FINSTEP_BODY_BUDGET): a declared length is taken from the budget before a byte is read,
    a chunked body counts as it arrives and is decoded into one buffer, and a body once read
    holds what parsing it takes until the request ends (release). An error about the body
    leaves the rest of it unread, so the connection cannot carry another request."""

    def __init__(self, framing: Tuple[str, int], max_body: int, budget: MemoryBudget):
        self.framing, self.max_body, self.budget = framing, max_body, budget
        self.reserved = 0  # bytes of the budget this request holds
        self.broken = False  # an error left the body unread

    @property
    def unfinished(self) -> bool:
        """A body was announced and is not read: the connection cannot carry another request."""
        kind, _ = self.framing
        return self.broken or kind != NO_BODY

    def read(self, rfile) -> bytes:
        kind, length = self.framing
        if kind == NO_BODY:
            raise self.error(411, "A request body with Content-Length is required", "length_required")
        if kind == CHUNKED:
            body = self.read_chunked(rfile)
        else:
            self.reserve(length)
            body = self.read_exactly(rfile, length)
        self.framing = NO_BODY, 0  # read
        self.reserve(parse_cost(body))  # what parsing it takes, held until the request ends
        return body

    def reserve_declared(self) -> None:
        """Take a declared length from the budget before the client is told to send it."""
        kind, length = self.framing
        if kind == LENGTH:
            self.reserve(length)

    def reserve(self, total: int) -> None:
        """Hold `total` bytes of the budget until the request ends, or refuse the request:
        503 while others hold the budget, 413 if it could never fit."""
        more, budget = total - self.reserved, self.budget
        if more <= 0:
            return
        if total > budget.limit:
            raise self.error(413, "Request body needs about %d bytes of memory, more than the %d bytes "
                                  "of FINSTEP_BODY_BUDGET" % (total, budget.limit), "request_too_large")
        if not budget.take(more):
            self.broken = True
            raise ProxyError(503, "Too many request bodies in memory; retry shortly", code="server_busy",
                             headers={"Retry-After": "1"})
        self.reserved = total

    def release(self) -> None:
        self.budget.give(self.reserved)
        self.reserved = 0

    def error(self, status: int, message: str, code: str) -> ProxyError:
        """An error about the body: the rest of it is unread."""
        self.broken = True
        return ProxyError(status, message, code=code)

    def read_exactly(self, rfile, size: int) -> bytes:
        try:
            body = rfile.read(size)
        except (socket.timeout, TimeoutError, ConnectionError):
            body = None
        if body is None or len(body) < size:
            raise self.error(408, "The request body did not arrive in full", "request_timeout")
        return body

    def read_line(self, rfile, limit: int) -> bytes:
        try:
            line = rfile.readline(limit)
        except (socket.timeout, TimeoutError, ConnectionError):
            line = b""
        if not line.endswith(b"\n"):
            if len(line) < limit:
                raise self.error(408, "The request body did not arrive in full", "request_timeout")
            raise self.malformed_chunks()
        return line

    def malformed_chunks(self) -> ProxyError:
        return self.error(400, "Malformed chunked request body", "invalid_request")

    def read_chunked(self, rfile) -> bytearray:
        """A chunked body, decoded into one buffer (no object kept per chunk), its size held
        in the budget as it grows; trailer fields are read and dropped."""
        body, max_body = bytearray(), self.max_body
        while True:
            line = self.read_line(rfile, 1026)
            size = parse_chunk_size(line[:-2]) if line.endswith(b"\r\n") else None
            if size is None:
                raise self.malformed_chunks()
            if size == 0:
                break
            need = len(body) + size
            if need > max_body:
                raise self.error(413, "Request body is larger than the limit of %d bytes" % max_body,
                                 "request_too_large")
            if need > self.reserved:
                self.reserve(max(need, min(self.reserved + 65536, max_body)))
            body += self.read_exactly(rfile, size)
            if self.read_exactly(rfile, 2) != b"\r\n":
                raise self.malformed_chunks()
        trailers = MAX_HEAD
        while True:
            line = self.read_line(rfile, trailers + 1)
            if line == b"\r\n":
                return body
            trailers -= len(line)
            if not header_line_ok(line) or trailers < 0:
                raise self.malformed_chunks()


# --- Routes -------------------------------------------------------------------------------

@dataclasses.dataclass(eq=False, repr=False)  # no more than __init__: every class costs memory for good
class Route:
    """One row of the route table. `endpoint` names the ProxyHandler method that answers
    (`answer`: a request in the `wire` format, answered through the pipeline or by the format
    itself); `wire` also shapes the route's errors. GET routes answer HEAD with GET's head."""
    path: str  # the path, or with `prefix` what the paths begin with
    methods: Tuple[str, ...]
    endpoint: str
    wire: str = "chat"  # a WireFormat.name
    open: bool = False  # answered without PROXY_API_KEY: it holds no data (the page asks for the key itself)
    prefix: bool = False
    label: str = ""  # its metrics label, when not its path: a prefix's template
    body: bool = False  # it reads a body for a caller: the caller is known first, before 100 Continue
    setting: str = ""  # the Config switch that serves it, where one can turn it off
    quiet: bool = False  # a 200 is logged at DEBUG: container health checks would drown the log


# The one route table: a new endpoint is one row here (and one WireFormat class where it
# speaks a format of its own).
ROUTES = (
    Route("/v1/chat/completions", ("POST",), "answer", "chat", body=True),
    Route("/chat/completions", ("POST",), "answer", "chat", body=True),
    Route("/v1/responses", ("POST",), "answer", "responses", body=True),
    Route("/responses", ("POST",), "answer", "responses", body=True),
    Route("/v1/messages", ("POST",), "answer", "messages", body=True),
    Route("/messages", ("POST",), "answer", "messages", body=True),
    Route("/v1/messages/count_tokens", ("POST",), "answer", "count_tokens", body=True),
    Route("/messages/count_tokens", ("POST",), "answer", "count_tokens", body=True),
    Route("/mcp", ("POST",), "answer", "mcp", body=True),
    Route("/agui", ("POST",), "answer", "agui", body=True),
    Route("/v1/agui", ("POST",), "answer", "agui", body=True),
    Route("/v1/models", ("GET",), "list_models"),
    Route("/models", ("GET",), "list_models"),
    Route("/v1/models/", ("GET",), "retrieve_model", prefix=True, label="/v1/models/{id}"),
    Route("/models/", ("GET",), "retrieve_model", prefix=True, label="/models/{id}"),
    Route("/status", ("GET",), "show_status"),
    Route("/metrics", ("GET",), "metrics"),
    Route("/health", ("GET",), "health", open=True, quiet=True),
    # Nothing there, said plainly without a key: MCP clients look for OAuth metadata after a 401.
    Route("/.well-known/", ("GET",), "not_found", open=True, prefix=True, label="/.well-known/{path}"),
    Route("/register", ("GET", "POST"), "not_found", open=True),  # OAuth's defaults, for the same clients
    Route("/authorize", ("GET", "POST"), "not_found", open=True),
    Route("/token", ("GET", "POST"), "not_found", open=True),
    Route("/", ("GET",), "show_page", open=True, setting="page"),
)


def route_path(path: str) -> str:
    """A request's path as routes know it: no query, no trailing slash."""
    return path.split("?", 1)[0].rstrip("/") or "/"


class RouteTable:
    """The routes a server answers, found by path: exact paths first, then prefixes."""

    def __init__(self, routes: Sequence[Route]):
        self.exact = {route.path: route for route in routes if not route.prefix}
        self.prefixes = tuple(route for route in routes if route.prefix)

    def find(self, path: str) -> Optional[Route]:
        """The route of a path as route_path() gives it, or None."""
        route = self.exact.get(path)
        if route is None:
            route = next((route for route in self.prefixes if path.startswith(route.path)), None)
        return route

    def label(self, path: str) -> str:
        """A request path as a metrics label: a known route's path (a prefix's template), else
        "other", so that clients cannot multiply the series."""
        route = self.find(route_path(path))
        return "other" if route is None else route.label or route.path


def build_routes(config: Config) -> RouteTable:
    """The routes a server with `config` answers: those whose setting is on (FINSTEP_PAGE)."""
    return RouteTable([route for route in ROUTES if not route.setting or getattr(config, route.setting)])


class Routing:
    """Routing a request by the server's route table: the browser policy first, then the key
    where the route needs it, the method, and the endpoint; the route's wire format, which
    parses its requests and shapes its errors. CORS preflights are answered here."""

    allowed_headers = ("Authorization, Content-Type, Accept, X-Api-Key, X-Request-Id, X-Session-Id, "
                       "MCP-Protocol-Version, Mcp-Session-Id, Mcp-Method, Mcp-Name")

    def do_GET(self) -> None:
        self.dispatch()

    do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_GET

    def do_OPTIONS(self) -> None:
        try:
            self.check_browser()
        except ProxyError as exc:
            self.fail(exc)  # a preflight from a page that may not call is not granted
            return
        self.send_response(204)
        self.send_header("Access-Control-Allow-Methods", "GET, POST, OPTIONS")
        requested = [name.strip() for name in (self.headers.get("Access-Control-Request-Headers") or "").split(",")]
        self.send_header("Access-Control-Allow-Headers", ", ".join(
            [self.allowed_headers] + [name for name in requested if TOKEN.fullmatch(name)]))
        self.send_header("Access-Control-Max-Age", "86400")
        if (self.headers.get("Access-Control-Request-Private-Network") or "").lower() == "true":
            self.send_header("Access-Control-Allow-Private-Network", "true")  # a public page to this address
        self.send_header("Content-Length", "0")
        self.end_headers()

    def dispatch(self) -> None:
        path = self.route_path()
        try:
            try:
                self.check_browser()
                getattr(self, self.endpoint(path))(path)
            except ProxyError as exc:
                if self.exchange.interrupted == "cancelled":
                    # Answered no more, but the HTTP message ends properly: a client still reading
                    # it (MCP's first revisions do) takes a connection cut short for a failure.
                    if self.sink.started:
                        self.sink.end(b"")
                    else:
                        self.sink.document(202, b"", ())
                    return
                if self.exchange.interrupted == "client_gone":
                    raise ClientGone() from None
                if self.exchange.interrupted == "shutdown":
                    exc = shutting_down()
                self.fail(exc)
        except ClientGone:
            self.close_connection = True
            self.exchange.client_left = True
            if self.exchange.status is None:
                self.exchange.status = 499  # as nginx logs a client that closed before its answer

    def route_path(self) -> str:
        return route_path(self.path)

    def route(self) -> Optional[Route]:
        exchange = self.exchange
        if exchange.route is None and self.path is not None:
            exchange.route = self.server.routes.find(self.route_path())
        return exchange.route

    def wire_format(self) -> WireFormat:
        """The wire format of this request's route, which also shapes its errors (chat
        completions' for a path no route knows)."""
        exchange = self.exchange
        if exchange.wire is None:
            route = self.route()
            exchange.wire = WireFormat.formats[route.wire if route else "chat"](
                self.server.config, self.server.sessions, self.server.signer)
        return exchange.wire

    def check_browser(self) -> None:
        """Refuse, before anything else, a web page that may not use the key this proxy holds
        (BrowserPolicy), and set the CORS headers of the answer."""
        policy = self.server.browser
        if policy.guarded:
            origin = self.headers.get("Origin")
            refusal = policy.refusal(origin, self.headers.get("Host"))
            if refusal is not None:
                raise refusal
            self.exchange.cors = policy.headers(origin)

    def endpoint(self, path: str) -> str:
        """The endpoint (a method name) for this request, once its key is checked where the
        route needs it; raises ProxyError: 401, 404, 405."""
        route = self.route()
        if (route is None or not route.open) and self.server.config.proxy_keys:
            self.authenticate()
        if route is None:
            raise ProxyError(404, "Unknown path: %s %s" % (self.command, path[:200]), code="unknown_url")
        methods = route.methods + (("HEAD",) if "GET" in route.methods else ())  # HEAD: GET's head alone
        if self.command not in methods:
            allowed = ", ".join(sorted(methods)) + ", OPTIONS"
            raise ProxyError(405, "Method %s is not allowed on %s" % (self.command, path[:200]),
                             code="method_not_allowed", headers={"Allow": allowed})
        return route.endpoint

    def authenticate(self) -> Caller:
        """The request's caller (see Caller), from its headers alone; raises ProxyError(401)."""
        exchange = self.exchange
        if exchange.caller is None:
            exchange.caller = caller_of(self.server.config, self.headers, self.server.deployment)
        return exchange.caller


# --- Callers and browsers: who may use the proxy, and what each may see -------------------

def client_key(headers: Mapping[str, str]) -> Optional[str]:
    """The key a client sent: `Authorization: Bearer <key>` (or a bare key), else `x-api-key`."""
    scheme, _, rest = (headers.get("Authorization") or "").strip().partition(" ")
    value = rest.strip() if scheme.lower() == "bearer" else scheme
    return value or (headers.get("x-api-key") or "").strip() or None


PROXY_KEY, PASS_THROUGH, DEPLOYMENT = "proxy-key", "pass-through", "deployment"


class Caller(NamedTuple):
    """Who a request is for. Everything the proxy remembers (conversations, their names,
    response ids, claims) is scoped by `id`, a digest, never a key: one caller never sees,
    continues or uses up another's. The caller is the proxy key a request presented; else the
    pass-through key it brought; else the deployment itself, named by its upstream keys (one
    operator: a proxy that holds the key and asks none)."""
    kind: str  # PROXY_KEY, PASS_THROUGH or DEPLOYMENT
    id: str
    keys: Tuple[str, ...]  # the upstream keys its requests may use


def deployment_caller(config: Config) -> Optional[Caller]:
    """The caller of every request to a proxy that holds its keys and asks none."""
    if not config.api_keys or config.proxy_keys:
        return None
    return Caller(DEPLOYMENT, "d:" + key_digest("\n".join(sorted(config.api_keys))), config.api_keys)


BEARER = {"WWW-Authenticate": "Bearer"}  # a 401 says how to authenticate (RFC 9110): no OAuth here


def caller_of(config: Config, headers: Mapping[str, str], deployment: Optional[Caller] = None) -> Caller:
    """The caller a request's headers prove; raises ProxyError(401). Only the headers are
    read: nothing is remembered, claimed or parsed before this."""
    if deployment is not None:
        return deployment
    presented = client_key(headers)
    if config.proxy_keys:
        given = (presented or "").encode("utf-8")
        matched = [key for key in config.proxy_keys if hmac.compare_digest(given, key.encode("utf-8"))]
        if not matched:
            raise ProxyError(401, "Invalid or missing API key for this proxy: send "
                                  "'Authorization: Bearer <PROXY_API_KEY>'", code="invalid_api_key",
                             headers=BEARER)
        return Caller(PROXY_KEY, "p:" + key_digest(matched[0]), config.api_keys)
    if config.api_keys:
        return deployment_caller(config)
    if not presented:
        raise ProxyError(401, "No API key: set FINSTEP_API_KEY on the proxy or send "
                              "'Authorization: Bearer <Finstep key>'", code="missing_api_key", headers=BEARER)
    if len(presented) > MAX_KEY_LENGTH or not all("!" <= c <= "~" for c in presented):
        raise ProxyError(401, "That is not a Finstep key: a key is at most %d visible ASCII characters"
                         % MAX_KEY_LENGTH, code="invalid_api_key", headers=BEARER)
    return Caller(PASS_THROUGH, "c:" + key_digest(presented), (presented,))


def normal_origin(origin: str) -> str:
    """A web origin as compared: lower case, no trailing slash, no default port."""
    origin = origin.strip().lower().rstrip("/")
    for scheme, port in (("http://", ":80"), ("https://", ":443")):
        if origin.startswith(scheme) and origin.endswith(port):
            return origin[:-len(port)]
    return origin


def host_of(authority: str) -> str:
    """The host of a `Host` header or an origin's authority: no port, no brackets, lower case."""
    authority = authority.strip().lower()
    if authority.startswith("["):
        end = authority.find("]")
        return authority[1:end] if end > 0 else authority
    if authority.count(":") == 1:  # host:port (a bare IPv6 address has several colons)
        authority = authority.split(":", 1)[0]
    return authority.rstrip(".")


LOOPBACK_NAMES = frozenset(("localhost", "127.0.0.1", "::1"))  # the usual ones, known without parsing


def loopback_name(host: str) -> bool:
    """localhost, a name under .localhost, or a loopback address: names no DNS answer can
    point elsewhere (RFC 6761), so no page on another site can take them over."""
    if host in LOOPBACK_NAMES or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


class BrowserPolicy:
    """Which web pages may call the proxy, and which Host names it answers to.

    A browser sends a page's requests with the user's network position: to a proxy that
    holds the Finstep key and asks none, any page the user opens could spend that key, with
    a "simple" request that needs no preflight, or read the answer through a DNS name it
    rebinds to the proxy's address. So, for such a proxy only, a request whose `Origin` is
    not allowed is refused before anything else, and when the proxy listens on loopback only,
    so is a `Host` that is not a loopback name (as Ollama does). Where callers present a key,
    the key is what protects, and any origin may call. Requests without `Origin` (SDKs,
    curl, servers) are unaffected."""

    def __init__(self, config: Config):
        self.guarded = bool(config.api_keys) and not config.proxy_keys
        self.any_origin = not self.guarded or "*" in config.origins
        self.origins = frozenset(config.origins) if config.origins else None  # None: loopback origins
        # Names an operator gave in FINSTEP_ORIGINS are answered to, behind a reverse proxy too.
        self.hosts = frozenset(host_of(urllib.parse.urlsplit(origin).netloc) for origin in config.origins
                               if "://" in origin)
        listens = host_of(config.host)
        self.check_host = self.guarded and not self.any_origin and loopback_name(listens)
        self.static_headers = (("Access-Control-Allow-Origin", "*"),) if self.any_origin else ()

    def describe(self) -> str:
        """The policy in force, for the start-up log."""
        if not self.guarded:
            return "any web origin may call: every caller presents a key"
        if self.any_origin:
            return "FINSTEP_ORIGINS=*: pages on any web origin may spend the key this proxy holds"
        allowed = ", ".join(sorted(self.origins)) if self.origins is not None else \
            "http(s)://localhost, 127.0.0.1 and [::1] on any port"
        host = "; Host names other than loopback ones are refused" if self.check_host else ""
        return "the key is held and none asked: only pages on %s and the proxy's own page may call%s" % (
            allowed, host)

    def refusal(self, origin: Optional[str], host: Optional[str]) -> Optional[ProxyError]:
        """The 403 for a request from a page that may not use the held key, else None."""
        if not self.guarded:
            return None
        name = host_of(host) if host else ""
        if self.check_host and name and not loopback_name(name) and name not in self.hosts:
            return ProxyError(403, "Host %r is not a loopback name: this proxy holds its Finstep key, listens "
                                   "on loopback and answers only to loopback names, so that no web page can "
                                   "reach it through a DNS name. Name this host in FINSTEP_ORIGINS, or set "
                                   "PROXY_API_KEY" % printable(host[:100]), code="host_not_allowed")
        if origin is not None and not self.allows(origin, host):
            return ProxyError(403, "Web origin %r may not use this proxy: it holds its Finstep key and asks "
                                   "none, so only pages on FINSTEP_ORIGINS (default: localhost) may call it. "
                                   "Add the origin to FINSTEP_ORIGINS, or set PROXY_API_KEY and send it"
                              % printable(origin[:100]), code="origin_not_allowed")
        return None

    def allows(self, origin: str, host: Optional[str]) -> bool:
        if self.any_origin:
            return True
        origin = normal_origin(origin)
        if self.origins is not None:
            if origin in self.origins:
                return True
        else:
            parts = urllib.parse.urlsplit(origin)
            if parts.scheme in ("http", "https") and loopback_name(host_of(parts.netloc)):
                return True
        # The proxy's own page: its origin is the very address the request came to, and that is
        # an address, which, unlike a name, no other site can rebind to this proxy.
        if not host or not (ip_literal(host_of(host)) or loopback_name(host_of(host))):
            return False
        return origin in (normal_origin("http://" + host), normal_origin("https://" + host))

    def headers(self, origin: Optional[str]) -> Tuple[Tuple[str, str], ...]:
        """The Access-Control-Allow-Origin of an answer, for an origin already allowed."""
        if self.any_origin:
            return self.static_headers
        if origin is None:
            return (("Vary", "Origin"),)
        return (("Access-Control-Allow-Origin", origin), ("Vary", "Origin"))


# --- Wire formats: a request body in, the pipeline's events out as bytes ------------------

# Not frozen, though nothing changes a request once parsed (replace() makes another): a frozen
# dataclass's __init__ sets each field through object.__setattr__, 5 us a request here, not 1.
@dataclasses.dataclass
class AnswerRequest:
    """What the pipeline needs of a request, whatever its wire format."""
    messages: Tuple[Tuple[str, str], ...]  # (role, text), in order; at least one user message has text
    stream: bool
    user: Optional[str] = None  # keeps one caller's conversations apart from another's
    conversation: Optional[str] = None  # a conversation the client named (X-Session-Id, threadId)
    max_output: Optional[int] = None  # output tokens (as estimated) the answer may take
    stops: Tuple[str, ...] = ()  # the answer ends before the first of these in its text
    resume: Optional["SessionRef"] = None  # the session the wire format knows this turn continues
    fold: bool = False  # the wire format knows the conversation, and that its session cannot continue it
    marks: Tuple[Tuple[str, str], ...] = ()  # (name, value) the log line adds: what the format saw
    task: Optional[str] = None  # a client's background task (a chat's title, say), not a turn of the chat
    local: Optional[str] = None  # the answer, when the format gives it itself, without Finstep
    dropped: int = 0  # messages of the conversation the format could not even offer to fold

    @property
    def history(self) -> Tuple[Tuple[str, str], ...]:
        """The messages up to and including the last user message, which ends it. System
        messages after it (mid-conversation system messages, as Claude Code sends them) come
        just before it: system text like any other, and the question stays last."""
        messages = self.messages
        last = last_user(messages)
        after = tuple((role, text) for role, text in messages[last + 1:] if role in ("system", "developer"))
        if not after:
            return messages[:last + 1]
        return messages[:last] + after + messages[last:last + 1]

    @property
    def question(self) -> str:
        _, text = self.history[-1]
        return text

    @property
    def title(self) -> str:
        """The conversation's first user message in the user's own words (user_words), else
        its first user message as it is."""
        users = [text for role, text in self.messages if role == "user" and text and not text.isspace()]
        return session_title(next((words for words in map(user_words, users) if words), users[0]))


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def _children(value):
    return iter(value.items()) if isinstance(value, dict) else enumerate(value)


def _surrogate_in(value) -> bool:
    """Whether a string, or an object's field name, holds a lone surrogate."""
    if isinstance(value, str):
        return _SURROGATE.search(value) is not None
    return isinstance(value, dict) and any(_SURROGATE.search(name) for name in value)


def lone_surrogate_at(payload) -> Optional[str]:
    """Where in a parsed JSON value a string holds a lone surrogate (text no encoding can
    carry): its path, like messages[0].content; "" for the top level or a field's name. One
    walk, depth first, holding only the path to where it is: no string made per value."""
    if _surrogate_in(payload):
        return ""
    if not isinstance(payload, (dict, list)):
        return None
    steps, stack = [], [_children(payload)]
    while stack:
        for step, item in stack[-1]:
            if _surrogate_in(item):
                steps.append(step)
                return "".join("[%d]" % step if isinstance(step, int) else ("." if at else "") + step
                               for at, step in enumerate(steps))
            if isinstance(item, (dict, list)):
                steps.append(step)
                stack.append(_children(item))
                break
        else:
            stack.pop()
            if steps:
                steps.pop()
    return None


def json_object(body: bytes) -> dict:
    """A request body as a JSON object; raises ProxyError(400) saying what is wrong."""
    payload = json_value(body)
    if not isinstance(payload, dict):
        raise _invalid("Request body must be a JSON object", None)
    return payload


def json_value(body: bytes):
    """A request body as JSON; raises ProxyError(400) saying what is wrong."""
    try:
        payload = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError:
        raise _invalid("Request body is not valid UTF-8", None) from None
    except (ValueError, RecursionError) as exc:
        raise _invalid("Request body is not valid JSON: %s" % exc, None) from None
    # Raw UTF-8 cannot hold a lone surrogate, so only an escape can bring one in: a pair
    # makes one character, a lone one is text that can be neither logged nor sent on.
    if _SURROGATE_ESCAPE.search(body):
        path = lone_surrogate_at(payload)
        if path is not None:
            raise _invalid("Request body holds text that cannot be encoded (a lone UTF-16 surrogate) in %s"
                           % (path or "a field name"), path or None)
    return payload


def message_text(content, param: str) -> str:
    """The text of a message's content: a string, or a list of parts whose text parts are joined."""
    if content is None or isinstance(content, str):
        return content or ""
    if not isinstance(content, list):
        raise _invalid("%s must be a string or a list of content parts" % param, param)
    texts = []
    for index, part in enumerate(content):
        if isinstance(part, str):
            texts.append(part)
            continue
        kind = part.get("type") if isinstance(part, dict) else None
        field = {"text": "text", "input_text": "text", "output_text": "text", "refusal": "refusal"}.get(kind)
        if field is None:
            raise _invalid("Only text content is supported: %s[%d] is of type %r"
                           % (param, index, kind), "%s[%d]" % (param, index))
        if not isinstance(part.get(field), str):
            raise _invalid("%s[%d] has no %r string" % (param, index, field), "%s[%d]" % (param, index))
        texts.append(part[field])
    return "\n".join(texts)


def read_messages(raw_messages: list, roles: Optional[Sequence[str]] = None) -> Tuple[Tuple[str, str], ...]:
    """(role, text) of each message, keeping only `roles` when given (the others are skipped
    unread); refused unless a user message comes last among them with text."""
    messages = []
    for index, message in enumerate(raw_messages):
        role = message.get("role") if isinstance(message, dict) else None
        if not isinstance(role, str):
            param = "messages[%d]" % index
            raise _invalid("%s must be an object with a string 'role'" % param, param)
        if roles is None or role in roles:
            content = message.get("content")  # a string mostly: no call, no parameter name made
            text = content if isinstance(content, str) else message_text(content, "messages[%d].content" % index)
            messages.append((role, text))
    require_question(messages)
    return tuple(messages)


def last_user(messages: Sequence[Tuple[str, str]]) -> int:
    """The index of the last user message among (role, text) pairs, or -1: looked for from
    the end, where it nearly always is."""
    for index in range(len(messages) - 1, -1, -1):
        role, _ = messages[index]
        if role == "user":
            return index
    return -1


def require_question(messages: Sequence[Tuple[str, str]]) -> None:
    """Refuse `messages` (as listed in the body's `messages`) unless a user message with text
    comes last among the user messages: the question the upstream is asked."""
    last = last_user(messages)
    if last < 0:
        raise _invalid("'messages' must contain a user message", "messages")
    _, text = messages[last]
    if not text or text.isspace():
        raise _invalid("The last user message has no text", "messages[%d].content" % last)


MAX_STOPS = 16
MAX_STOP_LENGTH = 256


def read_limit(payload: dict, *names: str) -> Optional[int]:
    """The smallest of the output limits given under `names`, each a positive whole number."""
    limits = []
    for name in names:
        value = payload.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise _invalid("'%s' must be a positive whole number of tokens" % name, name)
        limits.append(value)
    return min(limits) if limits else None


def read_stops(value, name: str) -> Tuple[str, ...]:
    """Stop sequences: a string or a list of strings, none empty."""
    if value is None:
        return ()
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not all(isinstance(stop, str) and stop for stop in values):
        raise _invalid("'%s' must be a non-empty string or a list of non-empty strings" % name, name)
    if len(values) > MAX_STOPS or any(len(stop) > MAX_STOP_LENGTH for stop in values):
        raise _invalid("'%s' takes at most %d sequences of at most %d characters each"
                       % (name, MAX_STOPS, MAX_STOP_LENGTH), name)
    return tuple(dict.fromkeys(values))


def refuse_unsupported(payload: dict) -> None:
    """400 for a chat parameter that asks for what Finstep cannot give, saying what can be done
    instead. Parameters that only tune sampling are accepted and ignored (docs/apis.md)."""
    n = payload.get("n")
    if n is not None and (isinstance(n, bool) or n != 1):
        raise _unsupported("'n' must be 1: Finstep gives one answer per request; for several answers, "
                           "send several requests", "n")
    if payload.get("logprobs") not in (None, False):
        raise _unsupported("'logprobs' is not available: Finstep does not report token probabilities; "
                           "leave it out or false", "logprobs")
    if payload.get("top_logprobs") is not None:
        raise _unsupported("'top_logprobs' is not available: Finstep does not report token probabilities; "
                           "leave it out", "top_logprobs")
    response_format = payload.get("response_format")
    if response_format is not None and response_format != {"type": "text"}:
        raise _unsupported("'response_format' other than {\"type\": \"text\"} is not available: Finstep "
                           "answers in prose and cannot guarantee JSON. Ask for the format in the prompt and "
                           "parse the answer leniently, or leave response_format out", "response_format")
    tool_choice = payload.get("tool_choice")
    if tool_choice not in (None, "auto", "none"):
        raise _unsupported("'tool_choice' must be \"auto\" or \"none\": Finstep cannot call tools, it always "
                           "answers with text; tools may be sent, they are not used", "tool_choice")


def read_model_and_stream(payload: dict, default_model: str) -> Tuple[str, bool]:
    model = payload.get("model")
    if model is None:
        model = default_model
    if not isinstance(model, str):
        raise _invalid("'model' must be a string", "model")
    stream = payload.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise _invalid("'stream' must be true or false", "stream")
    return model, bool(stream)


SESSION_TITLE_LIMIT = 50
_WORDS = re.compile(r"\S+")


# User messages that are a coding agent's context, not the user's words: Codex sends a
# project's AGENTS.md as one.
AGENT_CONTEXT = ("# AGENTS.md instructions for ",)


def user_words(text: str) -> str:
    """A user message without the context clients wrap in tags before the user's words
    (`<system-reminder>…</system-reminder>`, `<environment_context>…</environment_context>`);
    "" when all of it is context. One pass: each block's end is looked for once."""
    position, size = 0, len(text)
    while True:
        while position < size and text[position].isspace():
            position += 1
        if text.startswith(AGENT_CONTEXT, position):
            return ""
        match = _OPENING_TAG.match(text, position)
        if match is None:
            return text[position:]
        end = text.find("</%s>" % match.group(1), match.end())
        if end < 0:
            return text[position:]  # not a block: the user's own text begins with a tag
        position = end + len(match.group(1)) + 3


_OPENING_TAG = re.compile(r"<([A-Za-z][\w-]{0,63})(?:\s[^<>]{0,1024})?>")


def session_title(text: str, limit: int = SESSION_TITLE_LIMIT) -> str:
    """A session title from a message: whitespace collapsed, cut to `limit` characters. Only
    the words the title needs are looked at, however long the message."""
    if len(text) <= 4 * limit:  # short, as most are: split at once (str.split's whitespace is \s)
        title = " ".join(text.split())
    else:
        words, size = [], -1
        for match in _WORDS.finditer(text):
            words.append(match.group())
            size += len(words[-1]) + 1
            if size > limit:
                break
        title = " ".join(words)
    return title if len(title) <= limit else title[:limit - 1] + "…"


# The pipeline's events: (kind, value) pairs, handed to a wire format a batch per upstream read.
TEXT = "text"  # answer text
REASONING = "reasoning"  # thinking, where FINSTEP_REASONING=reasoning keeps it apart from the answer


STEP = "step"  # the upstream entered a phase; value: its name
STEP_END = "step_end"  # the upstream left its phase
_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
_json_string = json.encoder.encode_basestring  # what _dumps does with a str, without its type checks


PLACEHOLDER = "\x00"


class _RandomBytes(threading.local):
    """Bytes from the operating system's random source, drawn 4 KB at a time by each thread."""
    buffer, used = b"", 0


_random_bytes = _RandomBytes()


def random_hex(size: int) -> str:
    """`size` random bytes as hex digits: one system call for hundreds of ids."""
    state = _random_bytes
    used = state.used
    if used + size > len(state.buffer):
        state.buffer, used = os.urandom(4096), 0
    state.used = used + size
    return state.buffer[used:used + size].hex()


def new_id() -> str:
    """32 random hex digits, as uuid4().hex has them, for a fraction of its cost."""
    return random_hex(16)


def format_sse(payload) -> bytes:
    """One SSE event: `data: <json>` and a blank line."""
    return b"data: " + _dumps(payload).encode("utf-8") + b"\n\n"


def named_sse(kind: str, payload: dict) -> bytes:
    """One SSE event with its `event:` line, as the Responses and Messages APIs frame them."""
    return b"event: " + kind.encode("ascii") + b"\n" + format_sse(payload)


def sse_frame(payload: dict) -> Tuple[bytes, bytes]:
    """The bytes of an SSE event split around its one PLACEHOLDER string, so that each text
    is framed by two concatenations instead of encoding the whole event again."""
    head, tail = format_sse(payload).split(b'"\\u0000"')
    return head, tail


@dataclasses.dataclass(eq=False, repr=False)
class DirectAnswer:
    """What a wire format answers by itself, without asking Finstep (count_tokens, say): a
    JSON document, or bytes of another `content_type`, with headers of its own."""
    payload: Union[dict, bytes]
    status: int = 200
    headers: Tuple[Tuple[str, str], ...] = ()
    content_type: str = "application/json"  # of a bytes payload ("": none, for no body); a dict is JSON
    marks: Tuple[Tuple[str, str], ...] = ()  # (name, value) the log line adds, as AnswerRequest.marks


class WireFormat:
    """One API's dialect, for one request: parse() reads the body into the pipeline's input
    (or answers it at once, with a DirectAnswer) and keeps what rendering needs; the pipeline
    then asks for bytes. Errors before the stream's head are answered as JSON in
    error_body()'s shape, with error_status(); after it, failure() ends the stream.

    Each subclass has a `name`, which the route table uses: defining the class registers it.

    The head is held until the upstream answers or a heartbeat is due, so a quick upstream
    error keeps its HTTP status; failure() may then follow the head without opening(). A
    format whose failure event needs its opening sets opens_at_once: its stream starts as
    soon as the request is accepted, and every later failure is an event."""

    name = ""
    formats = {}  # type: Dict[str, type]  # name -> class, filled as each format is defined
    heartbeat = b": keep-alive\n\n"
    opens_at_once = False
    # After failure(), end the HTTP message properly, or cut it off: a truncated transfer is
    # the one sign of failure that a client reading only a format's success events cannot miss.
    ends_cleanly_after_failure = True
    # Set by parse(): what the client may name this request by to cancel it from another
    # request, and the caller's requests this one cancels (MCP's notifications/cancelled).
    handle = None  # type: Optional[str]
    cancels = ()  # type: Tuple[str, ...]

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if cls.name:
            WireFormat.formats[cls.name] = cls

    def __init__(self, config: Config, memory: "SessionStore", signer: Optional["ThinkingSigner"] = None):
        self.config = config
        self.memory = memory  # what the proxy remembers of conversations, shared by every format
        self.signer = signer or ThinkingSigner(os.urandom(32))  # the deployment's: see ThinkingSigner

    def parse(self, body: bytes, headers: Mapping[str, str]):
        """The pipeline's input (an AnswerRequest), or a DirectAnswer; raises ProxyError."""
        raise NotImplementedError

    def recall(self, request: AnswerRequest, caller: str) -> AnswerRequest:
        """The request with what this format remembers for `caller` (a Caller.id), once the
        caller is known and a stream slot is held: a format with its own conversation handles
        looks them up here, never in parse()."""
        return request

    def answered(self, turn: "Turn", key: str, answer: "AnswerRouter") -> None:
        """After a complete answer: what a format with its own conversation handles remembers."""

    @staticmethod
    def named_by_header(request: AnswerRequest, headers: Mapping[str, str]) -> AnswerRequest:
        """The request as its X-Session-Id header names its conversation, if it has the header,
        or Open WebUI's chat id header (sent with ENABLE_FORWARD_USER_INFO_HEADERS)."""
        named = (headers.get("X-Session-Id") or headers.get("X-OpenWebUI-Chat-Id") or "").strip()
        return dataclasses.replace(request, conversation=named) if named else request

    def error_status(self, error: ProxyError) -> int:
        """The HTTP status of an error answered before the stream's head."""
        return error.status

    def error_body(self, error: ProxyError) -> dict:
        return error.body()

    def opening(self) -> bytes:
        return b""

    def render(self, events: List[Tuple[str, str]]) -> bytes:
        """The bytes of one batch of events; on the hot path, so per-event work stays small."""
        raise NotImplementedError

    def closing(self, answer: AnswerRouter) -> bytes:
        raise NotImplementedError

    def failure(self, error: ProxyError) -> bytes:
        raise NotImplementedError

    def document(self, answer: AnswerRouter) -> dict:
        """The whole answer as one JSON body, for a request that did not ask to stream."""
        raise NotImplementedError


# --- Wire formats: OpenAI's chat completions ----------------------------------------------

@dataclasses.dataclass
class ChatRequest(AnswerRequest):
    model: str = ""
    include_usage: bool = False


# Chat UIs ask their model, in the background, for a chat's title, its tags, follow-up
# questions, search queries: a slow, paid Finstep answer each, in prose where they parse JSON.
# Recognised by their own templates (Open WebUI's "### Task:" with the <chat_history>, the
# topic naming of LobeChat and Cherry Studio), they are answered here (FINSTEP_TASKS=local).
TASK_REPLIES = (  # (marker in an Open WebUI task's template, the task, the JSON answered but for a title)
    ('{ "title":', "title", None), ('{ "tags":', "tags", {"tags": []}),
    ('"follow_ups"', "follow_ups", {"follow_ups": []}), ('"queries"', "queries", {"queries": []}),
    ("autocompletion system", "autocomplete", {"text": ""}),
)
_QUOTES = re.compile("['`\u2018\u2019]")  # Open WebUI's page turns these into " before parsing its JSON


def first_question(text: str, start: str, stop: str) -> str:
    """The first user message in a chat transcript a template carries: from the first line
    that begins with `start` to the next that begins with `stop`."""
    lines, found = [], False
    for line in text.split("\n"):
        if not found and line.startswith(start):
            found, line = True, line[len(start):]
        elif found and line.startswith(stop):
            break
        if found:
            lines.append(line)
    return "\n".join(lines)


def recognise_task(messages: Sequence[Tuple[str, str]]) -> Optional[Tuple[str, str]]:
    """(task, its answer) when a chat request is a chat UI's background task, else None."""
    _, text = messages[-1]
    role, opening = messages[0]
    if text.startswith("### Task:") and "<chat_history>" in text:  # Open WebUI
        for marker, task, reply in TASK_REPLIES:
            if marker in text:
                if reply is None:
                    question = first_question(text.split("<chat_history>", 1)[1], "USER: ", "ASSISTANT: ")
                    reply = {"title": _QUOTES.sub("", session_title(question or "Finstep"))}
                return task, json.dumps(reply, ensure_ascii=False)
        return None
    if text.startswith("<task>\nGenerate a concise title"):  # LobeChat, parsed as JSON
        question = text.split("<user>\n", 1)[1].split("\n</user>", 1)[0] if "<user>\n" in text else ""
        return "title", json.dumps({"title": session_title(question or "Finstep")}, ensure_ascii=False)
    if role == "system" and opening.startswith("You are a professional conversation summarizer"):  # LobeChat
        return "title", session_title(first_question(text, "user: ", "assistant: ") or "Finstep")
    if role == "system" and opening.startswith("Summarize the conversation into a title"):  # Cherry Studio
        try:
            question = next((item.get("mainText") for item in json.loads(text)
                             if isinstance(item, dict) and item.get("role") == "user"), "")
        except (ValueError, TypeError, RecursionError):
            question = ""
        return "title", session_title(question if isinstance(question, str) and question else "Finstep")
    return None


def parse_chat_request(body: bytes, default_model: str, tasks: str = "local") -> ChatRequest:
    """Validate a /v1/chat/completions body; raises ProxyError(400) saying what is wrong. A
    chat UI's background task is marked, and with `tasks` "local" given its answer."""
    payload = json_object(body)
    raw_messages = payload.get("messages")
    if not isinstance(raw_messages, list) or not raw_messages:
        raise _invalid("'messages' must be a non-empty list", "messages")
    messages = read_messages(raw_messages)
    task, local = recognise_task(messages) or (None, None)
    model, stream = read_model_and_stream(payload, default_model)
    options = payload.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise _invalid("'stream_options' must be an object", "stream_options")
    session_id = payload.get("session_id")
    if session_id is not None and not (isinstance(session_id, str) and session_id.strip()):
        raise _invalid("'session_id' must be a non-empty string", "session_id")
    if task is None or tasks != "local":  # answered here, a task gets the JSON its response_format asks
        refuse_unsupported(payload)
    user = payload.get("user")
    return ChatRequest(model=model, messages=messages, stream=stream,
                       include_usage=bool(options and options.get("include_usage") is True),
                       user=user if isinstance(user, str) else None, conversation=session_id,
                       max_output=read_limit(payload, "max_tokens", "max_completion_tokens"),
                       stops=read_stops(payload.get("stop"), "stop"), task=task,
                       local=local if tasks == "local" else None, marks=(("task", task),) if task else ())


def build_chunk(completion_id: str, created: int, model: str, delta: dict,
                finish_reason: Optional[str] = None) -> dict:
    return {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}


def build_completion(completion_id: str, created: int, model: str, answer: AnswerRouter,
                     usage: dict) -> dict:
    message = {"role": "assistant", "content": "".join(answer.content)}
    if answer.reasoning:
        message["reasoning_content"] = "".join(answer.reasoning)
    return {"id": completion_id, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": message, "logprobs": None,
                         "finish_reason": chat_finish_reason(answer)}],
            "usage": usage}


def chat_finish_reason(answer: AnswerRouter) -> str:
    return "length" if answer.cut == "length" else "stop"


SSE_DONE = b"data: [DONE]\n\n"
DELTA_FIELDS = {TEXT: "content", REASONING: "reasoning_content"}


def chunk_parts(finish_reason: Optional[str]) -> Tuple[bytes, ...]:
    """The bytes of build_chunk's event around what differs between completions and chunks:
    (before the id, between id and created, between created and model, between model and
    delta, after the delta). Split once, from build_chunk itself, so that the fast path
    cannot drift from the slow one."""
    marked = format_sse(build_chunk(PLACEHOLDER, 0, PLACEHOLDER, PLACEHOLDER, finish_reason))
    start, middle, before_delta, after_delta = marked.split(b'"\\u0000"')
    before_created, before_model = middle.split(b'"created":0')
    return start, before_created + b'"created":', before_model, before_delta, after_delta


CHUNK_PARTS = {reason: chunk_parts(reason) for reason in (None, "stop", "length")}
ROLE_DELTA = _dumps({"role": "assistant", "content": ""}).encode("utf-8")
DELTA_FIELDS_JSON = {kind: b'{"' + field.encode("ascii") + b'":' for kind, field in DELTA_FIELDS.items()}


class ChunkFormatter:
    """Formats one completion's chunks. Chunks differ only in their delta (and the last in
    its finish_reason): the bytes around the delta are joined once per request from
    CHUNK_PARTS, and each chunk encodes only its delta."""

    fields = DELTA_FIELDS_JSON

    def __init__(self, completion_id: str, created: int, model: str):
        self.completion_id, self.created, self.model = completion_id, created, model
        start, before_created, before_model, before_delta, self.tail = CHUNK_PARTS[None]
        self.head = b"".join((start, _json_string(completion_id).encode("utf-8"), before_created,
                              b"%d" % created, before_model, _json_string(model).encode("utf-8"), before_delta))

    def delta(self, kind: str, text: str) -> bytes:
        return self.head + self.fields[kind] + _json_string(text).encode("utf-8") + b"}" + self.tail

    def first(self) -> bytes:
        """The first chunk, which gives the role."""
        return self.head + ROLE_DELTA + self.tail

    def chunk(self, delta: dict, finish_reason: Optional[str] = None) -> bytes:
        if finish_reason in CHUNK_PARTS:
            return self.head + (_dumps(delta).encode("utf-8") if delta else b"{}") + CHUNK_PARTS[finish_reason][-1]
        return format_sse(build_chunk(self.completion_id, self.created, self.model, delta, finish_reason))

    def usage(self, usage: dict) -> bytes:
        return format_sse({"id": self.completion_id, "object": "chat.completion.chunk",
                           "created": self.created, "model": self.model, "choices": [], "usage": usage})


class ChatCompletionsFormat(WireFormat):
    """POST /v1/chat/completions: chat.completion.chunk events ending with data: [DONE].

    Its protocol has no failure event (our `data: {"error": ...}` is a convention that
    clients reading only `choices` skip), so a stream that fails is also cut off."""

    name = "chat"

    ends_cleanly_after_failure = False

    def parse(self, body: bytes, headers: Mapping[str, str]) -> AnswerRequest:
        chat = parse_chat_request(body, self.config.default_model, self.config.tasks)
        self.include_usage = chat.include_usage
        self.chunks = ChunkFormatter("chatcmpl-" + new_id(), int(time.time()), chat.model)
        return self.named_by_header(chat, headers)

    def opening(self) -> bytes:
        return self.chunks.first()

    def render(self, events: List[Tuple[str, str]]) -> bytes:
        delta, fields = self.chunks.delta, self.chunks.fields
        return b"".join([delta(kind, text) for kind, text in events if kind in fields])

    def closing(self, answer: AnswerRouter) -> bytes:
        tail = [self.chunks.chunk({}, chat_finish_reason(answer))]
        if self.include_usage:
            tail.append(self.chunks.usage(answer.usage()))
        tail.append(SSE_DONE)
        return b"".join(tail)

    def failure(self, error: ProxyError) -> bytes:
        return format_sse({"error": {"message": error.message, "type": error.type, "code": error.code}}) + SSE_DONE

    def document(self, answer: AnswerRouter) -> dict:
        chunks = self.chunks
        return build_completion(chunks.completion_id, chunks.created, chunks.model, answer, answer.usage())


# --- Wire formats: AG-UI ------------------------------------------------------------------

AGUI_ROLES = ("user", "assistant", "system", "developer")  # tool, reasoning, activity: not conversation


@dataclasses.dataclass
class AguiRequest(AnswerRequest):
    thread_id: str = ""
    run_id: str = ""


def parse_agui_input(body: bytes) -> AguiRequest:
    """Validate an AG-UI RunAgentInput body; raises ProxyError(400) saying what is wrong.
    state, tools, context, forwardedProps, parentRunId, resume and protocolVersion are
    accepted and ignored: Finstep has no use for them."""
    payload = json_object(body)
    thread_id, run_id = payload.get("threadId"), payload.get("runId")
    if not (isinstance(thread_id, str) and thread_id.strip()):
        raise _invalid("'threadId' must be a non-empty string", "threadId")
    if not isinstance(run_id, str):
        raise _invalid("'runId' must be a string", "runId")
    raw_messages = payload.get("messages")
    if not isinstance(raw_messages, list):
        raise _invalid("'messages' must be a list", "messages")
    return AguiRequest(messages=read_messages(raw_messages, AGUI_ROLES), stream=True,
                       conversation=thread_id, thread_id=thread_id, run_id=run_id)


def agui_event(kind: str, **fields) -> bytes:
    return format_sse(dict(type=kind, **fields))


class AguiFormat(WireFormat):
    """POST /agui: an AG-UI 1.0 run. RUN_STARTED as soon as the request is accepted; each
    Finstep phase a step; reasoning and answer text as messages, each closed before anything
    else opens; then RUN_FINISHED, or RUN_ERROR after closing whatever was open."""

    name = "agui"

    opens_at_once = True

    def parse(self, body: bytes, headers: Mapping[str, str]) -> AnswerRequest:
        run = parse_agui_input(body)
        self.thread_id, self.run_id = run.thread_id, run.run_id
        self.open_kind = None  # STEP, REASONING or TEXT: the one thing open
        self.open_id = ""  # its stepName or messageId
        self.frame = (b"", b"")  # the open message's content event, around its delta
        return run

    def opening(self) -> bytes:
        return agui_event("RUN_STARTED", threadId=self.thread_id, runId=self.run_id)

    def render(self, events: List[Tuple[str, str]]) -> bytes:
        out = []
        for kind, value in events:
            if kind == self.open_kind and kind != STEP:  # more of the open message
                head, tail = self.frame
                out.append(head + _dumps(value).encode("utf-8") + tail)
            elif kind == STEP_END:
                if self.open_kind == STEP:
                    out.append(self.close())
            else:
                out.append(self.close() + self.begin(kind, value))
        return b"".join(out)

    def begin(self, kind: str, value: str) -> bytes:
        """Open a step, or a message with its first delta."""
        self.open_kind = kind
        if kind == STEP:
            self.open_id = value
            return agui_event("STEP_STARTED", stepName=value)
        message_id = self.open_id = "msg-" + new_id()
        if kind == TEXT:
            start = agui_event("TEXT_MESSAGE_START", messageId=message_id, role="assistant")
            content = "TEXT_MESSAGE_CONTENT"
        else:
            start = (agui_event("REASONING_START", messageId=message_id)
                     + agui_event("REASONING_MESSAGE_START", messageId=message_id, role="reasoning"))
            content = "REASONING_MESSAGE_CONTENT"
        self.frame = head, tail = sse_frame({"type": content, "messageId": message_id, "delta": PLACEHOLDER})
        return start + head + _dumps(value).encode("utf-8") + tail

    def close(self) -> bytes:
        kind, self.open_kind = self.open_kind, None
        if kind == STEP:
            return agui_event("STEP_FINISHED", stepName=self.open_id)
        if kind == TEXT:
            return agui_event("TEXT_MESSAGE_END", messageId=self.open_id)
        if kind == REASONING:
            return (agui_event("REASONING_MESSAGE_END", messageId=self.open_id)
                    + agui_event("REASONING_END", messageId=self.open_id))
        return b""

    def closing(self, answer: AnswerRouter) -> bytes:
        return self.close() + agui_event("RUN_FINISHED", threadId=self.thread_id, runId=self.run_id)

    def failure(self, error: ProxyError) -> bytes:
        return self.close() + agui_event("RUN_ERROR", message=error.message, code=error.code or error.type)


# --- Wire formats: OpenAI's Responses API -------------------------------------------------

RESPONSES_ROLES = ("user", "assistant", "system", "developer")


RESPONSES_ECHO = ("instructions", "metadata", "parallel_tool_calls", "tool_choice", "tools", "temperature",
                  "top_p", "max_output_tokens", "store", "user", "truncation", "reasoning", "service_tier")


@dataclasses.dataclass
class ResponsesRequest(AnswerRequest):
    model: str = ""
    new_input: Tuple[Tuple[str, str], ...] = ()  # this request's own input items, as (role, text)
    previous_response_id: Optional[str] = None
    echo: Tuple[Tuple[str, object], ...] = ()  # request fields the response object repeats


REFERENCE = "reference"  # an item_reference in a Responses input: (REFERENCE, item id) until resolved


def read_response_input(raw) -> Tuple[Tuple[str, str], ...]:
    """(role, text) of a Responses `input`: a string, or message items (`type` "message" or
    none), and item references to earlier output, as (REFERENCE, id), which the format
    resolves; other items (function calls and their outputs, reasoning) are skipped."""
    if isinstance(raw, str):
        return (("user", raw),)
    if not isinstance(raw, list):
        raise _invalid("'input' must be a string or a list of input items", "input")
    messages = []
    for index, item in enumerate(raw):
        param = "input[%d]" % index
        if not isinstance(item, dict):
            raise _invalid("%s must be an object" % param, param)
        if item.get("type") == "item_reference":
            item_id = item.get("id")
            if not (isinstance(item_id, str) and 0 < len(item_id) <= MAX_RECORD_ID):
                raise _invalid("%s.id must be the id of an output item" % param, param + ".id")
            messages.append((REFERENCE, item_id))
            continue
        if item.get("type", "message") != "message":
            continue
        if item.get("role") not in RESPONSES_ROLES:
            raise _invalid("%s.role must be one of %s" % (param, ", ".join(RESPONSES_ROLES)), param + ".role")
        messages.append((item["role"], message_text(item.get("content"), param + ".content")))
    return tuple(messages)


def parse_responses_request(body: bytes, default_model: str) -> ResponsesRequest:
    """Validate a /v1/responses body; raises ProxyError(400) saying what is wrong. The history
    behind `previous_response_id` is the wire format's to add: it is not in the body."""
    payload = json_object(body)
    new_input = read_response_input(payload.get("input"))
    users = [text for role, text in new_input if role == "user"]
    if not users or not users[-1].strip():
        raise _invalid("'input' must end its user messages with one that has text", "input")
    instructions = payload.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise _invalid("'instructions' must be a string", "instructions")
    model, stream = read_model_and_stream(payload, default_model)
    previous = payload.get("previous_response_id")
    if previous is not None and not (isinstance(previous, str) and previous.strip()):
        raise _invalid("'previous_response_id' must be a non-empty string", "previous_response_id")
    conversation = payload.get("conversation")
    if isinstance(conversation, dict):
        conversation = conversation.get("id")
    if conversation is not None and not (isinstance(conversation, str) and conversation.strip()):
        raise _invalid("'conversation' must be a non-empty string or an object with an 'id'", "conversation")
    if conversation is not None and previous is not None:
        raise _invalid("'conversation' and 'previous_response_id' cannot be used together", "conversation")
    refuse_unsupported(payload)
    text = payload.get("text")
    if isinstance(text, dict) and text.get("format") not in (None, {"type": "text"}):
        raise _unsupported("'text.format' other than {\"type\": \"text\"} is not available: Finstep answers in "
                           "prose and cannot guarantee JSON. Ask for the format in the instructions and parse "
                           "the answer leniently, or leave text.format out", "text.format")
    if payload.get("background") is True:
        raise _unsupported("'background' is not available: the proxy answers while the request is open; "
                           "leave it out and stream instead", "background")
    user = payload.get("user")
    system = (("system", instructions),) if instructions else ()
    return ResponsesRequest(messages=system + new_input, stream=stream, model=model,
                            user=user if isinstance(user, str) else None, conversation=conversation,
                            max_output=read_limit(payload, "max_output_tokens"), new_input=new_input,
                            previous_response_id=previous,
                            echo=tuple((name, payload[name]) for name in RESPONSES_ECHO if name in payload))


def responses_usage(answer: AnswerRouter) -> dict:
    usage = answer.usage()
    return {"input_tokens": usage["prompt_tokens"], "input_tokens_details": {"cached_tokens": 0,
                                                                            "cache_write_tokens": 0},
            "output_tokens": usage["completion_tokens"],
            "output_tokens_details": usage["completion_tokens_details"],
            "total_tokens": usage["total_tokens"]}


def output_item(kind: str, item_id: str, text: Optional[str], status: str) -> dict:
    """A reasoning or message output item; `text` None for one just added, still empty. The
    reasoning is its summary, where the AI SDK and OpenAI's own reasoning models put it, and
    its content too, where readers of open models look."""
    if kind == REASONING:
        if text is None:
            return {"id": item_id, "type": "reasoning", "summary": [], "status": status, "content": []}
        return {"id": item_id, "type": "reasoning", "summary": [{"type": "summary_text", "text": text}],
                "status": status, "content": [{"type": "reasoning_text", "text": text}]}
    return {"id": item_id, "type": "message", "role": "assistant", "status": status,
            "content": [] if text is None else [{"type": "output_text", "text": text, "annotations": []}]}


def content_part(kind: str, text: str) -> dict:
    """A message's content part, or a reasoning item's summary part."""
    if kind == REASONING:
        return {"type": "summary_text", "text": text}
    return {"type": "output_text", "text": text, "annotations": []}


MAX_RESPONSE_CHAIN = 500  # turns of a previous_response_id chain folded into a forked session


class ResponsesFormat(WireFormat):
    """POST /v1/responses: OpenAI's Responses API. A response id is the conversation handle:
    each completed response is remembered (its sessionId, key, parent and turn), so a request
    naming it in `previous_response_id` continues its session with only the new input; a
    second continuation of the same response (a fork) starts a new session with the history
    folded in. Streamed as `event:` + `data:` pairs with increasing `sequence_number`; one
    output item open at a time (reasoning, then the message), each added and done."""

    name = "responses"

    def parse(self, body: bytes, headers: Mapping[str, str]) -> AnswerRequest:
        request = parse_responses_request(body, self.config.default_model)
        if request.conversation is None and request.previous_response_id is None:
            request = self.named_by_header(request, headers)
        self.request = request
        self.response_id, self.created = "resp_" + new_id(), int(time.time())
        self.sequence, self.opened = 0, False
        self.items = []  # type: List[dict]  # output items done, in order
        self.open_kind = None  # type: Optional[str]  # REASONING or TEXT: the item open
        self.open_id, self.open_text = "", []  # type: Tuple[str, List[str]]
        self.frame = (b"", b"")
        # A response that is not streamed has at most these two items, named before it is answered.
        self.document_ids = {REASONING: "rs_" + new_id(), TEXT: "msg_" + new_id()}
        return request

    def recall(self, request: AnswerRequest, caller: str) -> AnswerRequest:
        """The request with the history its previous response stands for, and how its session
        goes on: resumed the first time that response is continued, folded afresh after. Only
        the caller's own responses are found: another's id is as unknown as a made-up one."""
        self.caller = caller
        if any(role == REFERENCE for role, _ in request.new_input):
            request = self.resolve(request, caller)
            self.request = request
        previous = request.previous_response_id
        if previous is None:
            return request
        entry = self.memory.get(memory_name("resp", caller, previous), ResponseRecord)
        if entry is None:
            raise ProxyError(400, "Previous response with id %r not found: it is unknown here, or older than "
                             "the proxy remembers (24 hours, FINSTEP_SESSION_CACHE entries)" % previous[:100],
                             code="previous_response_not_found", param="previous_response_id")
        # Only what a folded query could keep: the newest turns, FINSTEP_MAX_QUERY characters of them.
        history, ancestor, size = [], entry, 0
        while ancestor is not None and ancestor.question is not None and len(history) < 2 * MAX_RESPONSE_CHAIN:
            size += len(ancestor.question) + len(ancestor.answer)
            if size > self.config.max_query:
                break
            history += [("assistant", ancestor.answer), ("user", ancestor.question)]
            ancestor = (self.memory.get(memory_name("resp", caller, ancestor.parent), ResponseRecord)
                        if ancestor.parent else None)
        history.reverse()
        system = request.messages[:len(request.messages) - len(request.new_input)]
        messages = system + tuple(history) + request.new_input
        if ancestor is not None:  # older turns than a fold could keep: at least a question and its answer
            request = dataclasses.replace(request, dropped=2)
        if self.memory.claim(memory_name("continued", caller, previous)):
            resumed = dataclasses.replace(request, messages=messages, resume=SessionRef(entry.session_id, entry.key))
        else:
            resumed = dataclasses.replace(request, messages=messages, fold=True)
        self.request = resumed
        return resumed

    def resolve(self, request: ResponsesRequest, caller: str) -> ResponsesRequest:
        """The request with its item references replaced by what they stand for: a message
        of an earlier response of this caller's by its text (as a conversation counts it), a
        reasoning item by nothing (thinking is no turn); an unknown reference refused."""
        resolved = []
        for role, text in request.new_input:
            if role != REFERENCE:
                resolved.append((role, text))
                continue
            item = self.memory.get(memory_name("item", caller, text), ItemRef)
            record = self.memory.get(memory_name("resp", caller, item.response), ResponseRecord) if item else None
            if record is None:
                raise ProxyError(400, "Item %r in 'input' (an item_reference) not found: it is not an item of a "
                                      "response this proxy remembers for you (24 hours, FINSTEP_SESSION_CACHE "
                                      "entries); send the item itself" % text[:100],
                                 code="item_not_found", param="input")
            if item.kind == TEXT:
                resolved.append(("assistant", record.answer))
        new_input = tuple(resolved)
        system = request.messages[:len(request.messages) - len(request.new_input)]
        return dataclasses.replace(request, new_input=new_input, messages=system + new_input)

    def output_ids(self, answer: AnswerRouter) -> List[Tuple[str, str]]:
        """(id, kind) of this response's output items."""
        if not self.request.stream:
            kinds = (REASONING, TEXT) if answer.reasoning else (TEXT,)
            return [(self.document_ids[kind], kind) for kind in kinds]
        ids = [(item["id"], REASONING if item["type"] == "reasoning" else TEXT) for item in self.items]
        return ids + ([(self.open_id, self.open_kind)] if self.open_kind else [])

    def answered(self, turn: "Turn", key: str, answer: AnswerRouter) -> None:
        for item_id, kind in self.output_ids(answer):  # item references name them in later requests
            self.memory.put(memory_name("item", self.caller, item_id), ItemRef(self.response_id, kind))
        question = next(text for role, text in reversed(self.request.new_input) if role == "user").strip()
        text = strip_think_blocks("".join(answer.content)).strip()
        if len(question) + len(text) > self.config.max_query:
            question, text = None, ""  # longer than a fold keeps: a fork folds from the next turn on
        self.memory.put(memory_name("resp", self.caller, self.response_id),
                        ResponseRecord(turn.session_id, key_digest(key), self.request.previous_response_id or "",
                                       question, text))
        if answer.cut:  # not the upstream's whole answer: a continuation folds, as with fingerprints
            self.memory.claim(memory_name("continued", self.caller, self.response_id))

    def event(self, kind: str, **fields) -> bytes:
        fields["type"], fields["sequence_number"] = kind, self.sequence
        self.sequence += 1
        return named_sse(kind, fields)

    def response(self, status: str, output: List[dict], answer: Optional[AnswerRouter] = None,
                 error: Optional[ProxyError] = None) -> dict:
        body = {"id": self.response_id, "object": "response", "created_at": self.created, "status": status,
                "model": self.request.model, "output": output, "error": None, "incomplete_details": None,
                "instructions": None, "metadata": {}, "parallel_tool_calls": True, "tool_choice": "auto",
                "tools": [], "previous_response_id": self.request.previous_response_id,
                "text": {"format": {"type": "text"}}, "usage": None}
        body.update(self.request.echo)
        if answer is not None:
            body["usage"] = responses_usage(answer)
            if status != "in_progress":
                body["completed_at"] = int(time.time())
        if status == "incomplete":
            body["incomplete_details"] = {"reason": "max_output_tokens"}
        if error is not None:
            body["error"] = {"code": "rate_limit_exceeded" if error.status == 429 else "server_error",
                             "message": error.message, "type": error.code or error.type}
        return body

    def opening(self) -> bytes:
        self.opened = True
        started = self.response("in_progress", [])
        return self.event("response.created", response=started) + self.event("response.in_progress",
                                                                            response=started)

    def render(self, events: List[Tuple[str, str]]) -> bytes:
        out = []
        for kind, text in events:
            if kind == self.open_kind:  # more of the open item
                self.open_text.append(text)
                head, tail = self.frame
                out.append(head + _dumps(text).encode("utf-8") + tail + str(self.sequence).encode() + b"}\n\n")
                self.sequence += 1
            elif kind in (TEXT, REASONING):
                out.append(self.close("completed") + self.begin(kind))
                out.append(self.render([(kind, text)]))
        return b"".join(out)

    def begin(self, kind: str) -> bytes:
        """Add an output item, and its one part, still empty: a message's content part, a
        reasoning item's summary part."""
        self.open_kind, self.open_text = kind, []
        self.open_id = ("rs_" if kind == REASONING else "msg_") + new_id()
        index = len(self.items)
        if kind == REASONING:
            event, part_added = "response.reasoning_summary_text.delta", "response.reasoning_summary_part.added"
            fields = {"type": event, "item_id": self.open_id, "output_index": index, "summary_index": 0}
            where = {"summary_index": 0}
        else:
            event, part_added = "response.output_text.delta", "response.content_part.added"
            fields = {"type": event, "item_id": self.open_id, "output_index": index, "content_index": 0,
                      "logprobs": []}
            where = {"content_index": 0}
        head = b"event: %s\ndata: %s" % (event.encode("ascii"), _dumps(fields).encode("utf-8")[:-1])
        self.frame = (head + b',"delta":', b',"sequence_number":')
        return (self.event("response.output_item.added", output_index=index,
                           item=output_item(kind, self.open_id, None, "in_progress"))
                + self.event(part_added, item_id=self.open_id, output_index=index, part=content_part(kind, ""),
                             **where))

    def close(self, status: str) -> bytes:
        """Finish the open item, if any: its text done, its part done, the item done."""
        kind, self.open_kind = self.open_kind, None
        if kind is None:
            return b""
        text, index, item_id = "".join(self.open_text), len(self.items), self.open_id
        item = output_item(kind, item_id, text, status)
        self.items.append(item)
        if kind == REASONING:
            done = (self.event("response.reasoning_summary_text.done", item_id=item_id, output_index=index,
                               summary_index=0, text=text)
                    + self.event("response.reasoning_summary_part.done", item_id=item_id, output_index=index,
                                 summary_index=0, part=content_part(kind, text)))
        else:
            done = (self.event("response.output_text.done", item_id=item_id, output_index=index,
                               content_index=0, text=text, logprobs=[])
                    + self.event("response.content_part.done", item_id=item_id, output_index=index,
                                 content_index=0, part=content_part(kind, text)))
        return done + self.event("response.output_item.done", output_index=index, item=item)

    def closing(self, answer: AnswerRouter) -> bytes:
        status = "incomplete" if answer.cut == "length" else "completed"
        done = self.close(status)
        return done + self.event("response." + status, response=self.response(status, self.items, answer))

    def failure(self, error: ProxyError) -> bytes:
        # After a heartbeat carried the head, the upstream may fail before the opening went out.
        start = b"" if self.opened else self.opening()
        done = self.close("incomplete")
        return start + done + self.event("response.failed", response=self.response("failed", self.items,
                                                                                  error=error))

    def document(self, answer: AnswerRouter) -> dict:
        status = "incomplete" if answer.cut == "length" else "completed"
        output = []
        if answer.reasoning:
            output.append(output_item(REASONING, self.document_ids[REASONING], "".join(answer.reasoning), "completed"))
        output.append(output_item(TEXT, self.document_ids[TEXT], "".join(answer.content), status))
        return self.response(status, output, answer)


# --- Wire formats: Anthropic's Messages API -----------------------------------------------

ANTHROPIC_SKIPPED_BLOCKS = ("thinking", "redacted_thinking", "tool_use", "tool_result", "server_tool_use",
                            "web_search_tool_result")


@dataclasses.dataclass
class MessagesRequest(AnswerRequest):
    model: str = ""
    thinking: Tuple[Tuple[str, str], ...] = ()  # (text, signature) of the thinking blocks sent back


def anthropic_text(content, param: str) -> str:
    """The text of an Anthropic message's content or system: a string, or blocks whose `text`
    blocks are joined; thinking and tool blocks are skipped, others (images, documents) refused."""
    if isinstance(content, list):
        content = [block for block in content
                   if not (isinstance(block, dict) and block.get("type") in ANTHROPIC_SKIPPED_BLOCKS)]
    return message_text(content, param)


def parse_messages_request(body: bytes, default_model: str, counting: bool = False) -> MessagesRequest:
    """Validate an Anthropic /v1/messages body (`counting`: a count_tokens body, which has no
    max_tokens); raises ProxyError(400) saying what is wrong."""
    payload = json_object(body)
    raw_messages = payload.get("messages")
    if not isinstance(raw_messages, list) or not raw_messages:
        raise _invalid("messages: must be a non-empty list", "messages")
    messages, thinking = [], []
    for index, message in enumerate(raw_messages):
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ("user", "assistant", "system"):  # system: a mid-conversation system message
            param = "messages[%d]" % index
            raise _invalid("%s: must be an object with role 'user', 'assistant' or 'system'" % param,
                           param + ".role")
        content = message.get("content")  # a string mostly: no call, no parameter name made
        if isinstance(content, str):
            messages.append((role, content))
            continue
        messages.append((role, anthropic_text(content, "messages[%d].content" % index)))
        if role == "assistant" and isinstance(content, list):
            thinking.extend((block.get("thinking"), block.get("signature")) for block in content
                            if isinstance(block, dict) and block.get("type") == "thinking"
                            and isinstance(block.get("thinking"), str) and isinstance(block.get("signature"), str))
    require_question(messages)
    if "max_tokens" not in payload and not counting:
        raise _invalid("max_tokens: Field required", "max_tokens")
    model, stream = read_model_and_stream(payload, default_model)
    system = anthropic_text(payload.get("system"), "system")
    tool_choice = payload.get("tool_choice")
    if isinstance(tool_choice, dict) and tool_choice.get("type") not in (None, "auto", "none"):
        raise _unsupported("tool_choice: only 'auto' or 'none': Finstep cannot call tools, it always answers "
                           "with text; tools may be sent, they are not used", "tool_choice")
    metadata = payload.get("metadata")
    user = metadata.get("user_id") if isinstance(metadata, dict) else None
    return MessagesRequest(messages=((("system", system),) if system.strip() else ()) + tuple(messages),
                           stream=stream, model=model, user=user if isinstance(user, str) else None,
                           max_output=read_limit(payload, "max_tokens"),
                           stops=read_stops(payload.get("stop_sequences"), "stop_sequences"), thinking=tuple(thinking))


class ThinkingSigner:
    """Signs the thinking blocks the proxy streams, as Anthropic signs its own: an HMAC of the
    thinking text under a secret of the deployment (FINSTEP_SIGNING_KEY, else one random secret
    shared by the replicas through Redis, else one per process). Clients that demand a
    signature (pydantic-ai) then keep a thinking block a thinking block, and the blocks that
    come back can be told apart, the proxy's own or not; none is ever sent upstream."""

    prefix = "fs1_"

    def __init__(self, secret):
        """`secret`: bytes, or a function giving them, called once, when first needed (so a
        proxy that never signs never asks Redis for it)."""
        self._secret, self._lock = secret, threading.Lock()

    @property
    def secret(self) -> bytes:
        if callable(self._secret):
            with self._lock:
                if callable(self._secret):
                    self._secret = self._secret()
        return self._secret

    def start(self):
        """A signature to be made of text given a piece at a time (update(); finish())."""
        return hmac.new(self.secret, digestmod=hashlib.sha256)

    def finish(self, mac) -> str:
        return self.prefix + base64.urlsafe_b64encode(mac.digest()).decode("ascii").rstrip("=")

    def sign(self, text: str) -> str:
        mac = self.start()
        mac.update(text.encode("utf-8", "surrogatepass"))
        return self.finish(mac)

    def verify(self, text: str, signature: str) -> bool:
        return hmac.compare_digest(self.sign(text), signature)


ANTHROPIC_ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
                         413: "request_too_large", 429: "rate_limit_error", 500: "api_error", 502: "api_error",
                         503: "overloaded_error", 504: "timeout_error", 529: "overloaded_error"}


def anthropic_event(kind: str, **fields) -> bytes:
    return named_sse(kind, dict(type=kind, **fields))


class MessagesFormat(WireFormat):
    """POST /v1/messages: Anthropic's Messages API. Every frame an `event:` line and a
    `data:` line; thinking and text as content blocks, one open at a time; `ping` frames keep
    the stream alive; after the head, a failure is the protocol's own `error` frame."""

    name = "messages"

    heartbeat = anthropic_event("ping")

    def parse(self, body: bytes, headers: Mapping[str, str]) -> AnswerRequest:
        request = self.named_by_header(parse_messages_request(body, self.config.default_model), headers)
        if request.thinking:  # skipped either way; the log line says whose they were
            ours = sum(self.signer.verify(text, signature) for text, signature in request.thinking)
            request = dataclasses.replace(request, marks=request.marks + (
                ("thinking", "%d/%d" % (ours, len(request.thinking))),))
        self.model, self.message_id = request.model, "msg_" + new_id()
        self.mac = None  # the open thinking block's signature, as it is made
        self.prompt_tokens = 0
        self.index = -1  # the open content block's, when one is open
        self.open_kind = None  # type: Optional[str]
        self.frame = (b"", b"")
        return request

    def error_body(self, error: ProxyError) -> dict:
        kind = ANTHROPIC_ERROR_TYPES.get(error.status, "invalid_request_error" if error.status < 500 else "api_error")
        return {"type": "error", "error": {"type": kind, "message": error.message}}

    def message(self, answer: Optional[AnswerRouter], content: List[dict]) -> dict:
        usage = answer.usage() if answer is not None else {"prompt_tokens": 0, "completion_tokens": 0}
        stop_reason = None
        if answer is not None:
            stop_reason = {"length": "max_tokens", "stop": "stop_sequence"}.get(answer.cut, "end_turn")
        return {"id": self.message_id, "type": "message", "role": "assistant", "model": self.model,
                "content": content, "stop_reason": stop_reason,
                "stop_sequence": answer.stop_sequence if answer is not None else None,
                "usage": {"input_tokens": usage["prompt_tokens"], "output_tokens": usage["completion_tokens"]}}

    def opening(self) -> bytes:
        return anthropic_event("message_start", message=self.message(None, []))

    def render(self, events: List[Tuple[str, str]]) -> bytes:
        out = []
        for kind, text in events:
            if kind != self.open_kind:
                if kind not in (TEXT, REASONING):
                    continue
                out.append(self.close() + self.begin(kind))
            if kind == REASONING:
                self.mac.update(text.encode("utf-8", "surrogatepass"))
            head, tail = self.frame
            out.append(head + _dumps(text).encode("utf-8") + tail)
        return b"".join(out)

    def begin(self, kind: str) -> bytes:
        self.open_kind, self.index = kind, self.index + 1
        if kind == REASONING:
            self.mac = self.signer.start()
            block, delta_type, field = {"type": "thinking", "thinking": "", "signature": ""}, "thinking_delta", "thinking"
        else:
            block, delta_type, field = {"type": "text", "text": ""}, "text_delta", "text"
        self.frame = sse_frame({"type": "content_block_delta", "index": self.index,
                                "delta": {"type": delta_type, field: PLACEHOLDER}})
        head, tail = self.frame
        self.frame = (b"event: content_block_delta\n" + head, tail)
        return anthropic_event("content_block_start", index=self.index, content_block=block)

    def close(self) -> bytes:
        kind, self.open_kind = self.open_kind, None
        if kind is None:
            return b""
        signature = b""
        if kind == REASONING:  # a thinking block ends with its signature, as Anthropic's do
            signature = anthropic_event("content_block_delta", index=self.index,
                                        delta={"type": "signature_delta", "signature": self.signer.finish(self.mac)})
        return signature + anthropic_event("content_block_stop", index=self.index)

    def closing(self, answer: AnswerRouter) -> bytes:
        final = self.message(answer, [])
        return (self.close()
                + anthropic_event("message_delta", delta={"stop_reason": final["stop_reason"],
                                                          "stop_sequence": final["stop_sequence"]},
                                  usage=final["usage"])  # message_start's usage is 0: this is what counts
                + anthropic_event("message_stop"))

    def failure(self, error: ProxyError) -> bytes:
        return anthropic_event("error", error=self.error_body(error)["error"])

    def document(self, answer: AnswerRouter) -> dict:
        content = []
        if answer.reasoning:
            thinking = "".join(answer.reasoning)
            content.append({"type": "thinking", "thinking": thinking, "signature": self.signer.sign(thinking)})
        content.append({"type": "text", "text": "".join(answer.content)})
        return self.message(answer, content)


def count_tokens(body: bytes, default_model: str) -> dict:
    """POST /v1/messages/count_tokens: the input estimate of a Messages body, as usage counts it."""
    request = parse_messages_request(body, default_model, counting=True)
    return {"input_tokens": estimate_tokens(fold_query(transcript(request.messages), 10 ** 9))}


class CountTokensFormat(MessagesFormat):
    """POST /v1/messages/count_tokens: a Messages body counted, answered without Finstep; its
    errors in Anthropic's shape."""

    name = "count_tokens"

    def parse(self, body: bytes, headers: Mapping[str, str]) -> DirectAnswer:
        return DirectAnswer(count_tokens(body, self.config.default_model))


# --- Wire formats: MCP, Finstep as a tool -------------------------------------------------

# Both generations of the Model Context Protocol's Streamable HTTP transport: the handshake
# revisions (`initialize` first) and the stateless one (every request carries its version in
# its `_meta` and in headers). The proxy keeps no MCP session: any replica answers any request.
MCP_HANDSHAKE_VERSIONS = ("2025-11-25", "2025-06-18", "2025-03-26")  # newest first
MCP_STATELESS_VERSIONS = ("2026-07-28",)
MCP_VERSIONS = MCP_STATELESS_VERSIONS + MCP_HANDSHAKE_VERSIONS
MCP_META = "io.modelcontextprotocol/"
MCP_TOOL = "ask_finstep"
MCP_HANDLE_LIMIT = 256  # characters of an id, a progress token or a session id
PROGRESS_MESSAGE = 1000  # characters of the answer so far that a progress notification carries
MCP_BATCH_LIMIT = 64  # messages a batch may hold: its answers cost far more memory than its bytes

PARSE_ERROR, INVALID_REQUEST, METHOD_NOT_FOUND, INVALID_PARAMS = -32700, -32600, -32601, -32602
INTERNAL_ERROR, HEADER_MISMATCH, UNSUPPORTED_VERSION = -32603, -32020, -32022
RPC_ERROR_NAMES = {PARSE_ERROR: "parse_error", INVALID_REQUEST: "invalid_request",
                   METHOD_NOT_FOUND: "method_not_found", INVALID_PARAMS: "invalid_params",
                   INTERNAL_ERROR: "internal_error", HEADER_MISMATCH: "header_mismatch",
                   UNSUPPORTED_VERSION: "unsupported_protocol_version"}
# The HTTP status of a JSON-RPC error in the stateless revision (as the official Python SDK
# answers); the handshake revisions answer a request's error with 200 but for unreadable ones.
STATELESS_ERROR_STATUS = {PARSE_ERROR: 400, INVALID_REQUEST: 400, INVALID_PARAMS: 400, HEADER_MISMATCH: 400,
                          UNSUPPORTED_VERSION: 400, METHOD_NOT_FOUND: 404}

MCP_TOOL_DESCRIPTION = (
    "Ask Finstep, a financial research analyst, one question in natural language (Chinese or English): "
    "Chinese and global markets, listed companies and their industries, macroeconomics and policy. "
    "Finstep answers from its own research, in Chinese by default, and an answer takes time (often "
    "tens of seconds). To ask a follow-up in the same conversation, pass the `conversation` of the "
    "previous result.")
MCP_INPUT_SCHEMA = {
    "type": "object",
    "properties": {
        "question": {"type": "string", "description": "The question, as a person would ask it."},
        "conversation": {"type": "string", "description": "The `conversation` of an earlier result: continue "
                                                          "that conversation. Leave out to start a new one."}},
    "required": ["question"], "additionalProperties": False}
MCP_OUTPUT_SCHEMA = {
    "type": "object",
    "properties": {
        "answer": {"type": "string", "description": "Finstep's answer."},
        "reasoning": {"type": "string", "description": "Finstep's reasoning, when the proxy shows it."},
        "conversation": {"type": "string", "description": "Pass it back to ask a follow-up."}},
    "required": ["answer", "conversation"]}
MCP_INSTRUCTIONS = ("ask_finstep consults Finstep, a financial research analyst. Ask it about markets, "
                    "companies and the economy; expect an answer in Chinese, after tens of seconds.")
MCP_PHASES = {"THINKING": "Finstep is thinking", "ORGANIZING": "Finstep is organizing its answer"}


class McpError(ProxyError):
    """A JSON-RPC error: its code, the id of the request it answers (None when that could not
    be read: MCP has no null id, so the member is left out), and its data."""

    def __init__(self, status: int, rpc_code: int, message: str, rpc_id=None, data: Optional[dict] = None):
        super().__init__(status, message, code=RPC_ERROR_NAMES.get(rpc_code, "error"))
        self.rpc_code, self.rpc_id, self.data = rpc_code, rpc_id, data

    def body(self) -> dict:
        error = {"code": self.rpc_code, "message": self.message}
        if self.data is not None:
            error["data"] = self.data
        return rpc_answer(self.rpc_id, error=error)


class McpMessage(NamedTuple):
    """One JSON-RPC message as it came: a request (with an id), a notification, or a response."""
    kind: str  # "request", "notification" or "response"
    rpc_id: object  # a string or a number; None for a notification
    method: str
    params: dict


class McpCall(NamedTuple):
    """The tools/call a request makes: what its answer needs."""
    rpc_id: object
    conversation: str
    progress: Optional[bytes]  # the start of each of its progress notifications: it asked for them


def rpc_answer(rpc_id, result: Optional[dict] = None, error: Optional[dict] = None) -> dict:
    answer = {"jsonrpc": "2.0"}
    if rpc_id is not None:
        answer["id"] = rpc_id
    if error is not None:
        answer["error"] = error
    else:
        answer["result"] = result
    return answer


def rpc_id_ok(value) -> bool:
    """A JSON-RPC id or a progress token MCP allows (and the proxy keeps): a string or a number."""
    if isinstance(value, str):
        return len(value) <= MCP_HANDLE_LIMIT
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def mcp_message(value) -> McpMessage:
    """Classify one JSON-RPC message; raises McpError(-32600) for anything else."""
    if not isinstance(value, dict) or value.get("jsonrpc") != "2.0":
        raise McpError(400, INVALID_REQUEST, "Not a JSON-RPC 2.0 message")
    rpc_id = value.get("id")
    if rpc_id is not None and not rpc_id_ok(rpc_id):
        raise McpError(400, INVALID_REQUEST, "'id' must be a string (at most %d characters) or a number"
                       % MCP_HANDLE_LIMIT)
    method = value.get("method")
    if method is None and rpc_id is not None and ("result" in value or "error" in value):
        return McpMessage("response", rpc_id, "", {})
    if not isinstance(method, str) or not method:
        raise McpError(400, INVALID_REQUEST, "'method' must be a non-empty string", rpc_id)
    params = value.get("params", {})
    if not isinstance(params, dict):
        raise McpError(400, INVALID_REQUEST, "'params' must be an object", rpc_id)
    return McpMessage("notification" if rpc_id is None else "request", rpc_id, method, params)


def header_value(value: Optional[str]) -> Optional[str]:
    """An MCP header's value as the body has it: `=?base64?…?=` decoded (how non-ASCII values
    travel); None when it cannot be decoded."""
    if value is None or not (value.startswith("=?base64?") and value.endswith("?=")):
        return value
    try:
        return base64.b64decode(value[9:-2], validate=True).decode("utf-8")
    except (ValueError, UnicodeDecodeError):
        return None


def tool_arguments_problem(arguments) -> Optional[str]:
    """What is wrong with ask_finstep's arguments, said for the agent that sent them; None if nothing."""
    if not isinstance(arguments, dict):
        return "The arguments must be an object with a 'question'"
    unknown = [name for name in arguments if name not in MCP_INPUT_SCHEMA["properties"]]
    if unknown:
        return ("Unknown argument(s): %s; ask_finstep takes 'question' and 'conversation'"
                % ", ".join(name[:40] for name in unknown[:5]))
    question = arguments.get("question")
    if not isinstance(question, str) or not question.strip():
        return "'question' must be a non-empty string"
    conversation = arguments.get("conversation")
    if conversation is not None and not (isinstance(conversation, str) and conversation.strip()
                                         and len(conversation) <= MCP_HANDLE_LIMIT):
        return "'conversation' must be a non-empty string of at most %d characters" % MCP_HANDLE_LIMIT
    return None


def mcp_tool(version: str) -> dict:
    """ask_finstep as tools/list describes it to a client of `version`."""
    tool = {"name": MCP_TOOL, "description": MCP_TOOL_DESCRIPTION, "inputSchema": MCP_INPUT_SCHEMA,
            "annotations": {"title": "Ask Finstep", "readOnlyHint": True, "destructiveHint": False,
                            "idempotentHint": False, "openWorldHint": True}}
    if version >= "2025-06-18":
        tool.update(title="Ask Finstep", outputSchema=MCP_OUTPUT_SCHEMA)
    return tool


def mcp_server_info(version: str) -> dict:
    info = {"name": "custom_finstep", "version": __version__}
    if version >= "2025-06-18":
        info["title"] = "Finstep"
    if version >= "2025-11-25":
        info["description"] = "Finstep's financial analyst as an MCP tool, through custom_finstep"
    return info


def tool_error(message: str) -> dict:
    """A tools/call result that failed: the agent reads why, and may act on it."""
    return {"content": [{"type": "text", "text": message}], "isError": True}


class McpFormat(WireFormat):
    """POST /mcp: the Model Context Protocol's Streamable HTTP transport, one tool: ask_finstep.

    Answered here: initialize, ping, tools/list, server/discover, notifications (202). A
    tools/call is a question for the pipeline, answered as JSON or as an SSE stream (the
    client's Accept): notifications/progress as the answer comes, when the call asked for
    them (keep-alive comments when not), then the result. A failed answer is a result with
    isError; protocol mistakes are JSON-RPC errors. A call may be cancelled by
    notifications/cancelled (handshake revisions) or by closing its stream."""

    name = "mcp"
    call = None  # type: Optional[McpCall]  # until parse() finds one: errors before are protocol errors
    batch = False

    def parse(self, body: bytes, headers: Mapping[str, str]):
        try:
            message = json_value(body)
        except ProxyError as exc:
            raise McpError(400, PARSE_ERROR, "Parse error: %s" % exc.message) from None
        given = (headers.get("MCP-Protocol-Version") or "").strip()
        session = (headers.get("Mcp-Session-Id") or "").strip()
        self.session = session if len(session) <= MCP_HANDLE_LIMIT and session.isprintable() else ""
        self.sse = "text/event-stream" in (headers.get("Accept") or "")
        self.replies, self.batch = [], isinstance(message, list)  # a batch's answers before its call's
        self.count, self.shown, self.status, self.answering = 0, "", "Finstep has the question", False
        if self.batch:
            return self.parse_batch(message, given)
        params = message.get("params") if isinstance(message, dict) else None
        meta = params.get("_meta") if isinstance(params, dict) else None
        if isinstance(message, dict) and message.get("method") == "initialize":
            self.version, self.stateless = "2025-03-26", False  # until it negotiates one
        elif given in MCP_HANDSHAKE_VERSIONS or (not given and not (isinstance(meta, dict)
                                                                    and MCP_META + "protocolVersion" in meta)):
            self.version, self.stateless = given or "2025-03-26", False  # no header: the first revision's client
        elif given and given not in MCP_STATELESS_VERSIONS:
            rpc_id = message.get("id") if isinstance(message, dict) and rpc_id_ok(message.get("id")) else None
            raise McpError(400, UNSUPPORTED_VERSION, "Unsupported protocol version", rpc_id,
                           {"supported": list(MCP_VERSIONS), "requested": given[:100]})
        else:
            self.version, self.stateless = given or MCP_STATELESS_VERSIONS[0], True
        incoming = mcp_message(message)
        if self.stateless and incoming.kind == "request":
            self.check_headers(incoming, headers)
        return self.answer(incoming)

    def check_headers(self, incoming: McpMessage, headers: Mapping[str, str]) -> None:
        """The stateless revision's headers must say what the body says."""
        meta = incoming.params.get("_meta")
        if not isinstance(meta, dict) or not isinstance(meta.get(MCP_META + "clientCapabilities"), dict) \
                or not isinstance(meta.get(MCP_META + "protocolVersion"), str):
            raise McpError(400, INVALID_PARAMS, "params._meta must carry %sprotocolVersion and %sclientCapabilities"
                           % (MCP_META, MCP_META), incoming.rpc_id)
        checks = [("MCP-Protocol-Version", meta[MCP_META + "protocolVersion"]), ("Mcp-Method", incoming.method)]
        if incoming.method == "tools/call":
            checks.append(("Mcp-Name", incoming.params.get("name")))
        for name, wanted in checks:
            given = header_value(headers.get(name))
            if given != wanted:
                raise McpError(400, HEADER_MISMATCH, "Header mismatch: %s %s the body's %s"
                               % (name, "is missing, unlike" if given is None else "does not match",
                                  printable(str(wanted)[:100])), incoming.rpc_id)

    def parse_batch(self, messages: list, given: str):
        """A JSON-RPC batch, which only the 2025-03-26 revision allows: each message answered,
        at most one of them a tools/call (its answer last)."""
        if given not in ("", "2025-03-26"):
            raise McpError(400, INVALID_REQUEST, "JSON-RPC batches are not part of MCP %s" % given[:20])
        if not messages or len(messages) > MCP_BATCH_LIMIT:
            raise McpError(400, INVALID_REQUEST, "A batch holds 1 to %d messages" % MCP_BATCH_LIMIT)
        self.version, self.stateless = "2025-03-26", False
        call = None
        for item in messages:
            try:
                incoming = mcp_message(item)
                if incoming.method == "initialize":
                    raise McpError(200, INVALID_REQUEST, "initialize cannot be part of a batch", incoming.rpc_id)
                if incoming.method == "tools/call" and call is not None:
                    raise McpError(200, INVALID_REQUEST, "One tools/call a batch: send the others apart",
                                   incoming.rpc_id)
                answered = self.answer(incoming)
            except McpError as exc:
                self.replies.append(exc.body())
                continue
            if isinstance(answered, AnswerRequest):
                call = answered
            elif isinstance(answered.payload, dict):
                self.replies.append(answered.payload)
        if call is not None:
            return call
        if not self.replies:  # notifications and responses alone
            return DirectAnswer(b"", 202, content_type="", marks=(("mcp", "batch"),))
        return DirectAnswer(json.dumps(self.replies, ensure_ascii=False).encode("utf-8"), marks=(("mcp", "batch"),))

    def answer(self, incoming: McpMessage):
        """A DirectAnswer, or the AnswerRequest of a tools/call; raises McpError."""
        method, rpc_id = incoming.method, incoming.rpc_id
        marks = (("mcp", method[:40]),)
        if incoming.kind != "request":
            if method == "notifications/cancelled" and rpc_id_ok(incoming.params.get("requestId")):
                self.cancels += (self.name_call(incoming.params["requestId"]),)
            return DirectAnswer(b"", 202, content_type="", marks=marks)
        if method == "tools/call":
            return self.tool_call(rpc_id, incoming.params)
        headers = ()
        if method == "tools/list":
            result = {"tools": [mcp_tool(self.version)]}
            if self.stateless:
                result.update(ttlMs=3600000, cacheScope="public")  # the same tool for every caller
        elif method == "server/discover" and self.stateless:
            result = {"supportedVersions": list(MCP_VERSIONS), "capabilities": {"tools": {}},
                      "instructions": MCP_INSTRUCTIONS, "ttlMs": 3600000, "cacheScope": "public"}
        elif method == "initialize" and not self.stateless:
            asked = incoming.params.get("protocolVersion")
            self.version = asked if asked in MCP_HANDSHAKE_VERSIONS else MCP_HANDSHAKE_VERSIONS[0]
            result = {"protocolVersion": self.version, "capabilities": {"tools": {"listChanged": False}},
                      "serverInfo": mcp_server_info(self.version), "instructions": MCP_INSTRUCTIONS}
            # Only a scope for cancellations, which name a request by its id: remembered nowhere.
            headers = (("Mcp-Session-Id", new_id()),)
        elif method == "ping" and not self.stateless:
            result = {}
        else:
            raise McpError(self.error_status_of(METHOD_NOT_FOUND), METHOD_NOT_FOUND,
                           "Method not found: %s" % printable(method[:100]), rpc_id)
        return DirectAnswer(self.response(rpc_id, result), headers=headers, marks=marks)

    def tool_call(self, rpc_id, params: dict):
        name = params.get("name")
        if name != MCP_TOOL:
            raise McpError(self.error_status_of(INVALID_PARAMS), INVALID_PARAMS,
                           "Unknown tool: %s" % printable(str(name)[:100]), rpc_id)
        meta = params.get("_meta") if isinstance(params.get("_meta"), dict) else {}
        token = meta.get("progressToken")
        if token is not None and not rpc_id_ok(token):
            raise McpError(self.error_status_of(INVALID_PARAMS), INVALID_PARAMS,
                           "'progressToken' must be a string (at most %d characters) or a number"
                           % MCP_HANDLE_LIMIT, rpc_id)
        arguments = params.get("arguments", {})
        problem = tool_arguments_problem(arguments)
        if problem is not None:  # the agent's mistake, which it can mend: a tool error
            return DirectAnswer(self.response(rpc_id, tool_error(problem)), marks=(("mcp", "tools/call"),))
        conversation = arguments.get("conversation") or "finstep-" + new_id()
        progress = None
        if token is not None and self.sse:
            progress = (b'data: {"jsonrpc":"2.0","method":"notifications/progress","params":{"progressToken":'
                        + _dumps(token).encode("utf-8") + b',"progress":')
        self.call = McpCall(rpc_id, conversation, progress)
        self.handle = self.name_call(rpc_id)
        return AnswerRequest(messages=(("user", arguments["question"]),), stream=self.sse,
                             conversation=conversation, marks=(("mcp", "tools/call"),))

    def name_call(self, rpc_id) -> str:
        """What a cancellation names a call by: its id, within the client's session if any."""
        return _dumps([self.session, rpc_id])

    def error_status_of(self, rpc_code: int) -> int:
        return STATELESS_ERROR_STATUS.get(rpc_code, 200) if self.stateless else 200

    def response(self, rpc_id, result: dict) -> dict:
        if self.stateless:
            result = dict(result, resultType="complete",
                          _meta={MCP_META + "serverInfo": mcp_server_info(self.version)})
        return rpc_answer(rpc_id, result)

    def answered_with(self, last: dict):
        """The whole body: the call's answer, after the batch's other answers if it had some."""
        return self.replies + [last] if self.batch else last

    def result(self, answer: AnswerRouter) -> dict:
        text = "".join(answer.content)
        result = {"content": [{"type": "text", "text": text}], "isError": False}
        if self.version >= "2025-06-18":
            structured = {"answer": text, "conversation": self.call.conversation}
            if answer.reasoning:
                structured["reasoning"] = "".join(answer.reasoning)
            result["structuredContent"] = structured
        return result

    # -- errors: a protocol mistake is a JSON-RPC error; a failed call, a tool error

    def error_status(self, error: ProxyError) -> int:
        return error.status if isinstance(error, McpError) or self.call is None else 200

    def error_body(self, error: ProxyError) -> dict:
        if isinstance(error, McpError):
            return error.body()
        if self.call is None:
            return McpError(error.status, INVALID_REQUEST if error.status < 500 else INTERNAL_ERROR,
                            error.message).body()
        return self.answered_with(self.response(self.call.rpc_id, tool_error(error.message)))

    # -- the call's stream

    def opening(self) -> bytes:
        return b"".join(format_sse(reply) for reply in self.replies)

    def render(self, events: List[Tuple[str, str]]) -> bytes:
        if self.call.progress is None:
            return b""  # MCP has no partial results: the answer comes whole, at the end
        moved = False
        for kind, value in events:
            if kind == TEXT or kind == REASONING:
                if kind == TEXT and not self.answering:
                    self.answering, self.shown = True, ""
                shown = self.shown + value
                self.shown = shown if len(shown) <= 2 * PROGRESS_MESSAGE else shown[-PROGRESS_MESSAGE:]
                moved = True
            elif kind == STEP:
                self.status, moved = MCP_PHASES.get(value, "Finstep is working"), True
        return self.progress() if moved else b""

    def progress(self) -> bytes:
        """One progress notification: the answer so far (its end), else what Finstep is doing.
        Called under the stream's lock, so the numbers go out in order."""
        self.count += 1
        shown = self.shown
        message = (shown if len(shown) <= PROGRESS_MESSAGE else "…" + shown[1 - PROGRESS_MESSAGE:]) or self.status
        return self.call.progress + b"%d" % self.count + b',"message":' + _dumps(message).encode("utf-8") + b"}}\n\n"

    @property
    def heartbeat(self) -> bytes:
        if self.call is not None and self.call.progress is not None:
            return self.progress()  # a client that waits on progress keeps waiting
        return WireFormat.heartbeat

    def closing(self, answer: AnswerRouter) -> bytes:
        return format_sse(self.response(self.call.rpc_id, self.result(answer)))

    def failure(self, error: ProxyError) -> bytes:
        return format_sse(self.response(self.call.rpc_id, tool_error(error.message)))

    def document(self, answer: AnswerRouter) -> dict:
        return self.answered_with(self.response(self.call.rpc_id, self.result(answer)))


# --- Conversations: continue the upstream session exactly, or fold ------------------------
#
# Finstep keeps a conversation's history per sessionId and takes one new query a
# turn; OpenAI clients resend the whole history each turn. After an answer, the
# conversation as the client will send it back is remembered (as a fingerprint)
# with its sessionId. A request whose earlier history matches continues that
# session with only its new question; any other request starts a new session
# whose query carries the history folded into text, so nothing is lost or repeated.

NEW, CONTINUED, FOLDED, EXPLICIT = "new", "continued", "folded", "explicit"
_ROLE_LABELS = {"system": "System", "user": "User", "assistant": "Assistant"}


def strip_think_blocks(text: str) -> str:
    """`text` without its <think>…</think> blocks, each from an opening tag to the first
    closing tag after it, as a lazy regular expression would match them, in one scan: the
    search stops at the first opening tag with no closing tag after it, since no later
    opening tag can have one either."""
    start = text.find("<think>")
    if start < 0:
        return text
    kept, position = [], 0
    while start >= 0:
        end = text.find("</think>", start + 7)
        if end < 0:
            break
        kept.append(text[position:start])
        position = end + 8
        start = text.find("<think>", position)
    kept.append(text[position:])
    return "".join(kept)


def transcript(messages: Sequence[Tuple[str, str]]) -> Tuple[Tuple[str, str], ...]:
    """Messages as they count for a conversation: system, user and assistant text, trimmed,
    assistant <think> blocks removed (clients strip them), empty messages left out."""
    out = []
    for role, text in messages:
        if role not in _ROLE_LABELS:
            if role != "developer":
                continue
            role = "system"
        if role == "assistant" and "<think>" in text:
            text = strip_think_blocks(text)
        text = text.strip()
        if text:
            out.append((role, text))
    return tuple(out)


def conversation_fingerprint(key: str, user: Optional[str], turns: Sequence[Tuple[str, str]]) -> str:
    """A digest of a conversation, keyed by caller and `user`, so callers never share one. Only
    its questions and answers count: system text is instructions, which clients change from
    turn to turn (Claude Code's reminders and agent lists, a date in a system prompt)."""
    # _dumps([key, user, turns]) written out, byte for byte: a digest remembered (in Redis too)
    # by an earlier version still matches.
    material = "[%s,%s,[%s]]" % (_json_string(key), "null" if user is None else _json_string(user), ",".join([
        "[%s,%s]" % (_json_string(role), _json_string(text)) for role, text in turns if role != "system"]))
    return hashlib.sha256(material.encode("utf-8")).hexdigest()


def explicit_session_id(key: str, caller: str, name: str) -> str:
    """The upstream sessionId of a conversation a client named: stable across restarts and
    replicas, and different for every upstream key and every caller, so that two callers
    naming their conversations alike never share a session."""
    material = json.dumps([key, caller, name], ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(material.encode("utf-8")).hexdigest()[:32]


def memory_name(kind: str, caller: str, name: str) -> str:
    """Where the proxy remembers `name` (a conversation's name, a response id) for `caller`:
    another caller's lookup of the same name finds nothing."""
    return kind + ":" + hashlib.sha256(("%s\n%s" % (caller, name)).encode("utf-8")).hexdigest()


def fold_query(turns: Sequence[Tuple[str, str]], limit: int) -> str:
    query, _ = fold(turns, limit)
    return query


def fold(turns: Sequence[Tuple[str, str]], limit: int) -> Tuple[str, int]:
    """One query carrying a conversation, and how many of its messages it had to leave out:
    system text first, then each turn with its role label, ending with the last user
    message. Over `limit` characters, the oldest turns go first; the system text and the
    last user message always stay. Turns are measured from the newest back, and only those
    kept are written out."""
    if not turns:
        return "", 0
    _, question = turns[-1]
    if len(turns) < 2:
        return question, 0
    system = "\n\n".join(text for role, text in turns[:-1] if role == "system")
    head = ["System: " + system] if system else []
    tail = ["User: " + question]
    middle = [(role, text) for role, text in turns[:-1] if role != "system"]
    size = sum(len(part) + 2 for part in head + tail) - 2
    start = 0
    for index in range(len(middle) - 1, -1, -1):
        role, text = middle[index]
        size += len(_ROLE_LABELS[role]) + len(text) + 4  # "Label: text" and the blank line after it
        if size > limit:  # this turn does not fit: keep from the first user message after it
            start = next((i for i, (role, _) in enumerate(middle[index + 1:], index + 1) if role == "user"),
                         len(middle))
            break
    kept = ["%s: %s" % (_ROLE_LABELS[role], text) for role, text in middle[start:]]
    return "\n\n".join(head + kept + tail), start


class SessionRef(NamedTuple):
    """An upstream session the proxy remembers: the one a conversation continues in, or the
    latest of a named conversation."""
    session_id: str
    key: str  # the digest of the upstream key the session belongs to


class ResponseRecord(NamedTuple):
    """A Responses API response, remembered: its session, which a continuation resumes, and
    its turn as a conversation counts it (trimmed, <think> blocks removed), which a fork folds.
    `question` is None when the turn alone is longer than a folded query keeps
    (FINSTEP_MAX_QUERY): a fork folds nothing from there back, as the fold would drop it."""
    session_id: str
    key: str
    parent: str  # the id of the response it continued, "" for none
    question: Optional[str]
    answer: str


class ItemRef(NamedTuple):
    """An output item of a Responses API response, remembered for the item references that
    name it: the response, and what the item is (TEXT for a message, REASONING)."""
    response: str
    kind: str


CLAIM = "claimed"  # what a claim() leaves: the name is taken
MAX_RECORD_ID = 128  # a session id, key digest or response id read back longer than this is not ours


def encode_record(record) -> str:
    """A record as Redis keeps it: a JSON array (the same shape since 1.2.0)."""
    if isinstance(record, SessionRef):
        return _dumps([record.session_id, record.key])
    if isinstance(record, ItemRef):
        return _dumps(["item", record.response, record.kind])
    return _dumps(["response", record.session_id, record.key, record.parent, record.question, record.answer])


def decode_record(raw):
    """A record read back from Redis, or None for anything the proxy could not have written."""
    try:
        value = json.loads(raw)
    except (ValueError, TypeError, RecursionError):
        return None
    if not isinstance(value, list):
        return None
    ids = all(isinstance(item, str) and len(item) <= MAX_RECORD_ID for item in value[:4])
    if len(value) == 2 and ids:
        session_id, key = value
        return SessionRef(session_id, key)
    if len(value) == 3 and ids:
        tag, response, kind = value
        return ItemRef(response, kind) if tag == "item" and kind in (TEXT, REASONING) else None
    if len(value) == 6 and ids:
        kind, session_id, key, parent, question, answer = value
        if kind == "response" and isinstance(question, (str, type(None))) and isinstance(answer, str):
            return ResponseRecord(session_id, key, parent, question, answer)
    return None


# What one entry costs besides its strings: the dictionary slot and ordering node, the entry
# and its time (measured with tracemalloc, rounded up); its record is counted by its size.
ENTRY_OVERHEAD = 256


def entry_size(name: str, value) -> int:
    """An upper estimate of the bytes an entry takes in a SessionStore."""
    fields = value if isinstance(value, tuple) else ()
    return ENTRY_OVERHEAD + sys.getsizeof(name) + sys.getsizeof(value) + sum(map(sys.getsizeof, fields))


StoreEntry = collections.namedtuple("StoreEntry", "value stored size")


class SessionStore:
    """What the proxy remembers, in this process: name -> a SessionRef, a ResponseRecord or a
    claim. Thread-safe; at most `max_entries` entries taking at most `max_bytes` bytes (least
    recently used evicted first), each for at most `ttl` seconds."""

    def __init__(self, max_entries: int, ttl: float, max_bytes: int = Config.session_memory,
                 clock=time.monotonic):
        self.max_entries, self.ttl, self.max_bytes, self.clock = max_entries, ttl, max_bytes, clock
        self.bytes = 0  # the sizes of the entries held, as entry_size() estimates them
        self._entries = collections.OrderedDict()  # name -> StoreEntry, least recently used first
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, name: str, kind=None, consume: bool = False):
        """The record remembered under `name` (None unless it is a `kind`, when given);
        `consume` forgets it (single use)."""
        with self._lock:
            entry = self._entries.pop(name, None)
            if entry is None:
                return None
            expired = self.clock() - entry.stored > self.ttl
            if consume or expired:
                self.bytes -= entry.size
            else:
                self._entries[name] = entry
        if expired or (kind is not None and not isinstance(entry.value, kind)):
            return None
        return entry.value

    def claim(self, name: str) -> bool:
        """Remember `name` unless it is remembered already: True for the one caller that did."""
        with self._lock:
            entry = self._entries.get(name)
            if entry is not None and self.clock() - entry.stored <= self.ttl:
                return False
            self._store(name, CLAIM)
            return True

    def put(self, name: str, value) -> None:
        with self._lock:
            self._store(name, value)

    def _store(self, name: str, value) -> None:
        """put(), with the lock held."""
        now, size, entries = self.clock(), entry_size(name, value), self._entries
        old = entries.pop(name, None)
        if old is not None:
            self.bytes -= old.size
        if size > self.max_bytes:
            return
        entries[name] = StoreEntry(value, now, size)
        self.bytes += size
        while entries and (len(entries) > self.max_entries or self.bytes > self.max_bytes
                           or now - next(iter(entries.values())).stored > self.ttl):
            _, gone = entries.popitem(last=False)
            self.bytes -= gone.size


@dataclasses.dataclass
class Turn:
    """How one request reaches the upstream, and what to remember once it is answered."""
    session_id: str  # "" for a named conversation's first turn here: turn_on_key() derives it
    query: str
    path: str  # new, continued, folded or explicit
    turns: Tuple[Tuple[str, str], ...]  # the conversation up to its question, as it counts
    asked: Tuple[Tuple[str, str], ...]  # `turns` as a folded query carries them (FINSTEP_SYSTEM)
    caller: str  # whose conversation it is (Caller.id)
    key: Optional[str] = None  # the digest of the key its session belongs to, tried first; None: any
    user: Optional[str] = None  # the request's `user`, which keeps its fingerprints apart too
    remember: bool = False  # an unnamed conversation: remembered by its fingerprint once answered
    name: Optional[str] = None  # a conversation the client named: its session depends on the key
    mark: Optional[str] = None  # where a named conversation's latest session is remembered
    dropped: int = 0  # messages a folded query left out, over FINSTEP_MAX_QUERY
    unoffered: int = 0  # messages the wire format could not even offer to a fold (a long Responses chain)


def named_mark(caller: str, name: str) -> str:
    return memory_name("named", caller, name)


def plan_turn(store: SessionStore, mode: str, max_query: int, caller: str, request: AnswerRequest,
              system: str = "fold") -> Turn:
    """Decide the upstream sessionId, query and preferred key of a request (rules in
    docs/conversations.md); turn_on_key() settles them for the key the request is finally sent with.

    `caller` is the Caller.id whose memory the request sees, and no other. With `system`
    "drop", system text never reaches the upstream; conversations are recognised as before."""
    history = request.history
    turns = transcript(history)  # ends with the last user message, which has text
    asked = turns if system == "fold" else tuple((role, text) for role, text in turns if role != "system")
    _, question = history[-1]
    common = dict(turns=turns, asked=asked, caller=caller, unoffered=request.dropped)

    def folded(**fields) -> Turn:
        query, dropped = fold(asked, max_query)
        return Turn(query=query, dropped=dropped + request.dropped, **dict(common, **fields))
    if request.resume is not None:  # the wire format's own conversation handle (a response id)
        return Turn(session_id=request.resume.session_id, query=question, path=CONTINUED, key=request.resume.key,
                    **common)
    if mode == "fold" or request.fold:
        return folded(session_id=new_id(), path=FOLDED if len(asked) > 1 else NEW)
    name = request.conversation
    if name is not None and request.task is None:  # a client's background task stays out of the chat
        mark = named_mark(caller, name)
        latest = store.get(mark, SessionRef)  # the session of its last answer here
        if latest is None:
            return folded(session_id="", path=EXPLICIT, name=name, mark=mark)
        return Turn(session_id=latest.session_id, query=question, path=EXPLICIT, key=latest.key, name=name,
                    mark=mark, **common)
    common.update(user=request.user, remember=request.task is None)
    if len(asked) == 1:  # the question alone, or with system text that is dropped
        return Turn(session_id=new_id(), query=question, path=NEW, **common)
    if request.task is None:
        entry = store.get(conversation_fingerprint(caller, request.user, turns[:-1]), SessionRef, consume=True)
        if entry is not None:
            return Turn(session_id=entry.session_id, query=question, path=CONTINUED, key=entry.key, **common)
    return folded(session_id=new_id(), path=FOLDED)


def turn_on_key(turn: Turn, key: str, max_query: int) -> Turn:
    """The turn as sent with `key`. A session belongs to the key that created it: a continued
    conversation sent with another key (its own was refused) starts a new session there with
    the history folded in. A named conversation's session is a stable hash of key and name: it
    takes only the new question if its last answer here came from that session, and otherwise
    starts there with the history folded in."""
    if turn.name is not None:
        session_id = explicit_session_id(key, turn.caller, turn.name)
        if session_id == turn.session_id:
            return turn
        query, dropped = fold(turn.asked, max_query)
        return dataclasses.replace(turn, session_id=session_id, query=query, dropped=dropped + turn.unoffered)
    if turn.key is None or turn.key == key_digest(key):
        return turn
    query, dropped = fold(turn.asked, max_query)
    return dataclasses.replace(turn, session_id=new_id(), query=query, path=FOLDED,
                               dropped=dropped + turn.unoffered)


def remember_turn(store: SessionStore, turn: Turn, key: str, answer_content: str, exact: bool = True) -> None:
    """After a complete answer: remember the conversation as the client will send it next.
    Only an `exact` answer (the upstream's whole answer) makes its session continuable."""
    if turn.mark is not None:
        store.put(turn.mark, SessionRef(turn.session_id, key_digest(key)))
    if turn.remember and exact:
        turns = turn.turns + transcript([("assistant", answer_content)])
        store.put(conversation_fingerprint(turn.caller, turn.user, turns), SessionRef(turn.session_id, key_digest(key)))


# --- Keys: rotation and cool-downs --------------------------------------------------------

def stable_index(name: str, size: int) -> int:
    return int(hashlib.sha256(name.encode("utf-8")).hexdigest(), 16) % size


class KeyPool:
    """The upstream keys: new conversations rotate over them, named ones start from a stable
    hash of their name, so replicas agree; a key refused by the upstream (401/403/429) cools
    down and is passed over until it recovers."""

    def __init__(self, keys: Sequence[str], clock=time.monotonic):
        self.keys, self.clock = tuple(keys), clock
        self.announce = None  # tells other replicas of a cool-down (SharedCooldowns)
        self._next = 0
        self._cooling = {}  # type: Dict[str, float]
        self._lock = threading.Lock()

    def order(self, name: Optional[str] = None, prefer: Optional[str] = None) -> List[str]:
        """The keys to try, each once: the key whose digest is `prefer` first, then from the
        hash of `name` on, or in round-robin order without a name; those cooling down are left
        out, and when all are cooling down only the one that recovers soonest remains."""
        if len(self.keys) == 1:  # whatever the name, preference or cool-down: that key
            return list(self.keys)
        with self._lock:
            if name is None:
                start, self._next = self._next, (self._next + 1) % len(self.keys)
            else:
                start = stable_index(name, len(self.keys))
            now, cooling = self.clock(), self._cooling
            rotated = self.keys[start:] + self.keys[:start]
            preferred = tuple(key for key in rotated if key_digest(key) == prefer)
            if preferred:
                rotated = preferred + tuple(key for key in rotated if key not in preferred)
            ready = [key for key in rotated if cooling.get(key, 0.0) <= now]
            return ready or [min(rotated, key=cooling.__getitem__)]

    def cool_down(self, key: str, seconds: float, announce: bool = True) -> None:
        with self._lock:
            self._cooling[key] = max(self._cooling.get(key, 0.0), self.clock() + seconds)
        if announce and self.announce is not None:
            self.announce(key, seconds)

    def cooling(self) -> List[Tuple[str, float]]:
        """(key, seconds until it is tried again, 0 when ready) of every key, in order."""
        with self._lock:
            now = self.clock()
            return [(key, max(0.0, self._cooling.get(key, 0.0) - now)) for key in self.keys]


MAX_COOL_DOWN = 86400.0  # longest a key rests, whatever an upstream or Redis says


def retry_after_seconds(value: Optional[str], default: float = 60.0) -> float:
    """Seconds from a Retry-After header (delay-seconds or an HTTP date), else the default."""
    if value:
        value = value.strip()
        if value.isascii() and value.isdigit():
            return min(MAX_COOL_DOWN, float(value))
        try:
            when = email.utils.parsedate_to_datetime(value)
            return min(MAX_COOL_DOWN, max(0.0, when.timestamp() - time.time()))
        except (TypeError, ValueError, IndexError, OverflowError):
            pass
    return default


# --- Shared memory: Redis, for several replicas -------------------------------------------
#
# With FINSTEP_REDIS_URL, what SessionStore keeps (fingerprints, named conversations, response
# ids) and the keys' cool-downs live in Redis, so any replica continues any conversation and a
# key refused on one rests on all. Redis is never a reason to fail a request: while it cannot
# be reached, each process remembers on its own, as without Redis.

RedisTarget = collections.namedtuple("RedisTarget", "tls host port user password db")


def parse_redis_url(url: str) -> Optional[RedisTarget]:
    """redis://[user:password@]host[:port][/db] or rediss://… as its parts; None when malformed."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("redis", "rediss") or not parts.hostname or parts.query or parts.fragment:
        return None
    try:
        port = parts.port or 6379
    except ValueError:
        return None
    db = parts.path.strip("/")
    if db and not db.isdigit():
        return None
    unquote = urllib.parse.unquote
    return RedisTarget(parts.scheme == "rediss", parts.hostname, port, unquote(parts.username or "") or None,
                       unquote(parts.password) if parts.password is not None else None, int(db or 0))


def redis_reply_limit(max_query: int) -> int:
    """The largest reply the proxy can have written: a response record holds at most
    FINSTEP_MAX_QUERY characters of text, each at most 6 bytes as JSON (\\u0000)."""
    return 65536 + 6 * max_query


class RedisError(Exception):
    """Redis answered a command with an error."""


class RedisUnavailable(Exception):
    """Redis cannot be asked now: unreachable, slow, refusing, or known to be down."""


def resp_command(*args) -> bytes:
    """A command in RESP, Redis' protocol: an array of bulk strings."""
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode("utf-8")
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


MAX_REPLY_DEPTH = 4  # the proxy's commands are answered by flat replies; nesting deeper is not Redis
MAX_REPLY_LINE = 64  # a type line's number (+OK, :1, $5, *2) is short; an error message may be longer


class RedisProtocolError(ValueError):
    """Redis answered with something that is not a reply to what the proxy asked."""


def parse_reply(buffer, start: int = 0, depth: int = 0) -> Optional[Tuple[object, int]]:
    """One RESP2 reply at buffer[start:]: (value, where it ends), or None while incomplete.
    Simple strings come as str, errors as RedisError, integers as int, bulk strings as bytes,
    arrays as lists; a nil bulk string or array as None. Raises RedisProtocolError on
    anything else, arrays nested deeper than MAX_REPLY_DEPTH included."""
    end = buffer.find(b"\r\n", start)
    if end < 0:
        if len(buffer) - start > 4096 and buffer[start:start + 1] not in (b"+", b"-"):
            raise RedisProtocolError("a reply line longer than 4096 bytes")
        return None
    kind, line, position = bytes(buffer[start:start + 1]), bytes(buffer[start + 1:end]), end + 2
    if kind == b"+":
        return line.decode("utf-8", "replace"), position
    if kind == b"-":
        return RedisError(line.decode("utf-8", "replace")), position
    if kind not in (b":", b"$", b"*") or len(line) > MAX_REPLY_LINE:
        raise RedisProtocolError("not a RESP reply: %r" % bytes(buffer[start:start + 20]))
    try:
        number = int(line)
    except ValueError:
        raise RedisProtocolError("not a number: %r" % line[:20]) from None
    if kind == b":":
        return number, position
    if number < 0:
        return None, position
    if kind == b"$":
        if len(buffer) < position + number + 2:
            return None
        return bytes(buffer[position:position + number]), position + number + 2
    if depth >= MAX_REPLY_DEPTH:
        raise RedisProtocolError("arrays nested deeper than %d" % MAX_REPLY_DEPTH)
    items = []
    for _ in range(number):
        parsed = parse_reply(buffer, position, depth + 1)
        if parsed is None:
            return None
        item, position = parsed
        items.append(item)
    return items, position


class RedisConnection:
    """One connection: commands are sent together and their replies read in order, all within
    one deadline and at most `max_reply` bytes of replies: Redis is input like any other."""

    def __init__(self, target: RedisTarget, deadline: float, context: Optional[ssl.SSLContext],
                 max_reply: int = 1048576):
        sock = socket.create_connection((target.host, target.port), max(0.001, deadline - time.monotonic()))
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if context is not None:
                sock = context.wrap_socket(sock, server_hostname=target.host)
        except BaseException:
            sock.close()
            raise
        self.sock, self.buffer, self.max_reply = sock, bytearray(), max_reply
        setup = []
        if target.password is not None:
            setup.append(("AUTH", target.user, target.password) if target.user else ("AUTH", target.password))
        if target.db:
            setup.append(("SELECT", target.db))
        try:
            for reply in self.call(deadline, *setup) if setup else ():
                if isinstance(reply, RedisError):
                    raise reply
        except BaseException:
            self.close()
            raise

    def wait(self, deadline: float) -> None:
        """Let the next send or receive take what is left of the deadline, and no longer."""
        left = deadline - time.monotonic()
        if left <= 0:
            raise socket.timeout("Redis did not answer in time")
        self.sock.settimeout(left)

    def call(self, deadline: float, *commands) -> list:
        self.wait(deadline)
        self.sock.sendall(b"".join(resp_command(*command) for command in commands))
        replies, buffer = [], self.buffer
        while len(replies) < len(commands):
            parsed = parse_reply(buffer)
            if parsed is None:
                self.wait(deadline)
                data = self.sock.recv(65536)
                if not data:
                    raise ConnectionError("Redis closed the connection")
                buffer += data
                if len(buffer) > self.max_reply:
                    raise RedisProtocolError("a reply larger than %d bytes" % self.max_reply)
                continue
            reply, end = parsed
            del buffer[:end]
            replies.append(reply)
        return replies

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


class RedisClient:
    """A few connections to one Redis, reused across requests, each call (connecting
    included) bounded by `timeout` in all. Any trouble marks Redis down: calls then fail at
    once, without waiting on it, and a background check every second brings it back. One log
    line for each change, not one per request; a value that is not one the proxy wrote is a
    miss and an error, with a warning at most once a minute."""

    max_idle = 4
    check_interval = 1.0
    warn_interval = 60.0

    def __init__(self, target: RedisTarget, timeout: float, max_reply: int = 1048576):
        self.target, self.timeout, self.max_reply = target, timeout, max_reply
        self.context = ssl.create_default_context() if target.tls else None
        self.idle = []  # type: List[RedisConnection]
        self.up, self.errors = True, 0
        self.warned = -self.warn_interval  # when a malformed value was last warned of
        self.lock = threading.Lock()
        self.tasks = []  # functions the background thread runs while Redis is up
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self.run, name="redis", daemon=True)
        self.thread.start()

    @property
    def where(self) -> str:
        return "%s:%d/%d" % (self.target.host, self.target.port, self.target.db)

    def connect(self, deadline: float) -> RedisConnection:
        return RedisConnection(self.target, deadline, self.context, self.max_reply)

    def call(self, *commands) -> list:
        """The replies to `commands`, sent together; raises RedisUnavailable."""
        if not self.up:
            raise RedisUnavailable("down")
        deadline = time.monotonic() + self.timeout
        with self.lock:
            conn = self.idle.pop() if self.idle else None
        try:
            if conn is None:
                conn = self.connect(deadline)
            replies = conn.call(deadline, *commands)
        except (OSError, ValueError, RedisError) as exc:
            if conn is not None:
                conn.close()
            self.went_down(exc)
            raise RedisUnavailable(str(exc)) from None
        with self.lock:
            keep = len(self.idle) < self.max_idle
            if keep:
                self.idle.append(conn)
        if not keep:
            conn.close()
        return replies

    def malformed(self, what: str) -> None:
        """A reply in the protocol, but not one the proxy could have been sent: counted as an
        error; a warning at most once a minute."""
        now = time.monotonic()
        with self.lock:
            self.errors += 1
            warn = now - self.warned >= self.warn_interval
            if warn:
                self.warned = now
        log.log(logging.WARNING if warn else logging.DEBUG, "Redis at %s answered %s: taken as nothing "
                "remembered (further such replies within a minute are not logged)", self.where, what)

    def went_down(self, exc: Exception) -> None:
        with self.lock:
            self.errors += 1
            was_up, self.up = self.up, False
            doomed, self.idle = self.idle, []
        for conn in doomed:
            conn.close()
        if was_up:
            log.warning("Redis at %s cannot be reached (%s): each process remembers on its own until it is "
                        "back", self.where, exc.__class__.__name__ if not str(exc) else exc)

    def run(self) -> None:
        while not self.stopped.wait(self.check_interval):
            if not self.up:
                try:
                    self.connect(time.monotonic() + self.timeout).close()
                except (OSError, ValueError, RedisError):
                    continue
                self.up = True
                log.info("Redis at %s is back: memory is shared again", self.where)
            for task in self.tasks:
                try:
                    task()
                except RedisUnavailable:
                    break

    def render_metrics(self) -> List[str]:
        return ["# HELP finstep_proxy_redis_errors_total Redis calls that failed or answered what the proxy "
                "never wrote; the proxy went on without Redis.",
                "# TYPE finstep_proxy_redis_errors_total counter",
                "finstep_proxy_redis_errors_total %d" % self.errors,
                "# HELP finstep_proxy_redis_up Whether Redis is in use (1) or the proxy remembers alone (0).",
                "# TYPE finstep_proxy_redis_up gauge", "finstep_proxy_redis_up %d" % self.up]

    def close(self) -> None:
        self.stopped.set()
        self.thread.join(1.0)
        with self.lock:
            doomed, self.idle = self.idle, []
        for conn in doomed:
            conn.close()


class SharedStore:
    """SessionStore's interface over Redis (records as JSON, expiring with the store's ttl),
    and the process's own SessionStore while Redis is down. A consuming get is one GETDEL
    and a claim one SET NX, so two replicas never both continue the same session. What Redis
    answers is checked like any input: anything the proxy could not have written is a miss."""

    def __init__(self, redis: RedisClient, local: SessionStore, prefix: str):
        self.redis, self.local, self.prefix = redis, local, prefix
        self.ttl = max(1, int(local.ttl))

    def __len__(self) -> int:
        return len(self.local)

    def get(self, name: str, kind=None, consume: bool = False):
        try:
            reply, = self.redis.call(("GETDEL" if consume else "GET", self.prefix + name))
        except RedisUnavailable:
            return self.local.get(name, kind, consume)
        if isinstance(reply, RedisError):
            self.redis.went_down(reply)
            return self.local.get(name, kind, consume)
        if reply is None:
            return None
        record = decode_record(reply) if isinstance(reply, bytes) else None
        if record is None or (kind is not None and not isinstance(record, kind)):
            self.redis.malformed("a value the proxy never wrote under %s" % printable(name[:40]))
            return None
        return record

    def put(self, name: str, value) -> None:
        try:
            self.redis.call(("SET", self.prefix + name, encode_record(value), "EX", self.ttl))
        except RedisUnavailable:
            self.local.put(name, value)

    def claim(self, name: str) -> bool:
        try:
            reply, = self.redis.call(("SET", self.prefix + name, "1", "NX", "EX", self.ttl))
        except RedisUnavailable:
            return self.local.claim(name)
        if reply not in ("OK", None):
            self.redis.malformed("%r to SET NX" % (reply if not isinstance(reply, (bytes, list)) else type(reply)))
        return reply == "OK"


def signing_secret(config: Config, redis: Optional["RedisClient"]) -> bytes:
    """The secret that signs thinking blocks: FINSTEP_SIGNING_KEY; else one the replicas share
    through Redis (the first replica to start writes it); else this process's own."""
    if config.signing_key:
        return config.signing_key.encode("utf-8")
    fresh = os.urandom(32).hex()
    if redis is not None:
        name = config.redis_prefix + "signing-key"
        try:
            _, shared = redis.call(("SET", name, fresh, "NX"), ("GET", name))
        except RedisUnavailable:
            shared = None
        else:
            if isinstance(shared, bytes) and re.fullmatch(rb"[0-9a-f]{64}", shared):
                return bytes.fromhex(shared.decode("ascii"))
            redis.malformed("%r for the signing secret" % type(shared))
        log.warning("Redis gave no signing secret: this replica signs thinking blocks with its own")
    return bytes.fromhex(fresh)


class SharedCooldowns:
    """Key cool-downs through Redis: a key refused on one replica rests on all. Each cool-down
    is written at once (SET … PX under the key's digest); every replica reads them all back
    each second in one round trip."""

    def __init__(self, redis: RedisClient, pool: KeyPool, prefix: str):
        self.redis, self.pool, self.prefix = redis, pool, prefix
        pool.announce = self.publish
        redis.tasks.append(self.sync)

    def name(self, key: str) -> str:
        return self.prefix + "cool:" + key_digest(key)

    def publish(self, key: str, seconds: float) -> None:
        try:
            self.redis.call(("SET", self.name(key), "1", "PX", max(1, int(seconds * 1000))))
        except RedisUnavailable:
            pass

    def sync(self) -> None:
        keys = self.pool.keys
        for key, left in zip(keys, self.redis.call(*[("PTTL", self.name(key)) for key in keys])):
            if not isinstance(left, int) or left > MAX_COOL_DOWN * 1000:
                self.redis.malformed("%r to PTTL" % (left if isinstance(left, int) else type(left)))
            elif left > 0:
                self.pool.cool_down(key, left / 1000.0, announce=False)


# --- Upstream: one request to Finstep on a pooled connection, its events as they arrive ---

class ChunkedDecoder:
    """HTTP/1.1 chunked transfer coding, decoded as bytes arrive. feed() returns the payload
    bytes the data completes; `done` turns true once the last (zero-size) chunk and the
    trailer section after it are in, so a connection read this far is ready for its next
    response; framing that breaks the rules raises ValueError. Bytes fed past the end stay
    in `buffer`: a server that sent them cannot be trusted with another request."""

    def __init__(self):
        self.buffer = b""
        self.left = 0  # payload bytes still due in the current chunk
        self.crlf = False  # the CRLF that ends a chunk's payload is due
        self.trailer = False  # the last chunk is in: trailer fields (of no interest) until a blank line
        self.done = False

    def feed(self, data: bytes) -> bytes:
        buffer = self.buffer + data if self.buffer else data
        out, position, end = [], 0, len(buffer)
        left, crlf, trailer, done = self.left, self.crlf, self.trailer, self.done  # locals: once per event
        find = buffer.find
        if not (left or crlf or trailer or done):
            # Whole chunks, as an upstream writes them (an event each), and the last chunk with
            # no trailer, taken in a short loop; the first that is not (cut off, with an
            # extension or a trailer, malformed) is left to the loop below, which reads anything.
            while True:
                newline = find(b"\n", position)
                if newline < 0:
                    break
                try:
                    size = int(buffer[position:newline], 16)
                except ValueError:
                    break
                after = newline + 1 + size
                if size <= 0 or after + 2 > end or buffer[after:after + 2] != b"\r\n":
                    if size == 0 and buffer[newline + 1:newline + 3] == b"\r\n":  # the last chunk, no trailer
                        self.done, self.buffer = True, buffer[newline + 3:]
                        return b"".join(out)
                    break
                out.append(buffer[newline + 1:after])
                position = after + 2
            if position == end:  # nothing else came: nothing else to look at
                self.buffer = b""
                return b"".join(out)
        while position < end and not done:
            if left:
                take = min(left, end - position)
                out.append(buffer[position:position + take])
                position += take
                left -= take
                crlf = not left
            elif crlf:
                if end - position < 2:
                    break
                if buffer[position:position + 2] != b"\r\n":
                    raise ValueError("chunk not followed by CRLF")
                position += 2
                crlf = False
            else:
                newline = find(b"\n", position)
                if newline < 0:
                    if end - position > 1024:
                        raise ValueError("chunk size or trailer line too long")
                    break
                line = buffer[position:newline]
                position = newline + 1
                if trailer:
                    done = not line.strip()
                    continue
                size = int(line if b";" not in line else line.split(b";", 1)[0], 16)  # int() strips whitespace
                if size < 0:
                    raise ValueError("negative chunk size")
                after = position + size
                if size and after + 2 <= end:  # the whole chunk is here: taken at once
                    if buffer[after:after + 2] != b"\r\n":
                        raise ValueError("chunk not followed by CRLF")
                    out.append(buffer[position:after])
                    position = after + 2
                    continue
                left, trailer = size, size == 0
        self.left, self.crlf, self.trailer, self.done = left, crlf, trailer, done
        self.buffer = buffer[position:]
        return b"".join(out)


def shut(sock: socket.socket) -> None:
    """Shut a socket both ways. Unlike close(), this wakes a read blocked on it in another thread."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def socket_ready(sock: socket.socket, write: bool = False) -> bool:
    """Whether `sock` can be read (or written) without waiting."""
    if hasattr(select, "poll"):
        poller = select.poll()
        poller.register(sock, select.POLLOUT if write else select.POLLIN)
        return bool(poller.poll(0))
    readable, writable, _ = select.select([] if write else [sock], [sock] if write else [], [], 0)
    return bool(readable or writable)


READ_SIZE = io.DEFAULT_BUFFER_SIZE  # the socket reader's buffer: one read takes what it holds
MAX_UPSTREAM_LINE = 8 * 1024 * 1024  # an upstream that never ends its line cannot fill our memory
MAX_SETTLE_BYTES = 65536  # what may follow the answer's end before its connection is given up


class UpstreamBroken(Exception):
    """The upstream stream ended before its response was complete."""


class UpstreamHeadError(OSError):
    """The upstream's response head (or a tunnelling proxy's) broke the rules of HTTP/1.1."""


# Where a connection leads: the scheme, the host it connects to (the origin, or a proxy),
# the origin tunnelled to through that proxy (if any), and the proxy's credentials.
UpstreamRoute = collections.namedtuple("UpstreamRoute", "scheme host tunnel proxy_auth")


class UpstreamTarget(NamedTuple):
    """What every upstream request shares, worked out once: the route its connection takes
    and the request's head up to its two fields of its own (the key and the length)."""
    route: UpstreamRoute
    head: bytes


def upstream_target(url: str, proxies: Mapping[str, str]) -> Optional[UpstreamTarget]:
    """Where requests to `url` go, through the proxy the environment names (urllib's rules:
    no_proxy, a CONNECT tunnel for https, an absolute URL for a plain http proxy); None when
    that takes more than one connection (a proxy of another scheme than the upstream's)."""
    request = urllib.request.Request(url)
    handler = urllib.request.ProxyHandler(proxies)
    open_through_proxy = getattr(handler, request.type + "_open", None)
    if open_through_proxy is not None:
        handler.parent = None  # a proxy of another scheme would open through it: refused below
        try:
            open_through_proxy(request)
        except AttributeError:
            return None
    proxy_auth = request.headers.get("Proxy-authorization")
    route = UpstreamRoute(request.type, request.host, request._tunnel_host, proxy_auth if request._tunnel_host else None)
    origin = urllib.parse.urlsplit(url).netloc.rpartition("@")[2]
    fields = [("Host", origin), ("Content-Type", "application/json"), ("Accept", "text/event-stream"),
              ("Accept-Encoding", "identity"), ("User-Agent", "custom_finstep/" + __version__)]
    if proxy_auth and not request._tunnel_host:  # a plain proxy forwards the request: its credentials go in it
        fields.append(("Proxy-Authorization", proxy_auth))
    head = "POST %s HTTP/1.1\r\n%s" % (request.selector, "".join("%s: %s\r\n" % field for field in fields))
    return UpstreamTarget(route, head.encode("latin-1"))


def split_authority(authority: str, default_port: int) -> Optional[Tuple[str, int]]:
    """`host`, `host:port` or `[v6]:port` as (host, port), or None when the port is no number."""
    colon, bracket = authority.rfind(":"), authority.rfind("]")
    port = default_port
    if colon > bracket:
        digits = authority[colon + 1:]
        authority = authority[:colon]
        if digits:
            if not (digits.isascii() and digits.isdigit()) or int(digits) > 65535:
                return None
            port = int(digits)
    if authority.startswith("[") and authority.endswith("]"):
        authority = authority[1:-1]
    return (authority, port) if authority else None


MAX_RESPONSE_FIELDS = 100  # header fields in an upstream's (or a tunnelling proxy's) response head
_STATUS_LINE = re.compile(rb"HTTP/1\.([01]) ([1-9][0-9]{2})(?: [^\r\n]*)?")


class UpstreamHead(NamedTuple):
    """A response head: its status, whether it is HTTP/1.1, and its fields by lower-case name
    (a repeated field's values joined by commas, as RFC 9110 lets them be)."""
    status: int
    http11: bool
    fields: Dict[str, str]
    in_hand: int = 0  # bytes after the head that came with it, in the reader's buffer (0: none or unknown)

    def tokens(self, name: str) -> List[str]:
        value = self.fields.get(name)
        return [token.strip().lower() for token in value.split(",") if token.strip()] if value else []


def read_head_lines(reader) -> Tuple[List[bytes], int]:
    """The lines of one response head, without their line endings, read within MAX_HEAD
    bytes and MAX_RESPONSE_FIELDS fields: at once when the whole head is in the reader's
    buffer (as it nearly always is), else line by line. With them, how many bytes after the
    head are in the buffer (0 when it was read line by line: not known)."""
    buffered = reader.peek(MAX_HEAD)
    end, in_hand = whole_head_end(buffered), 0
    if end >= 0:
        lines, in_hand = reader.read(end + 4).split(b"\r\n")[:-2], len(buffered) - end - 4
    else:
        lines, left = [], MAX_HEAD
        while True:
            line = reader.readline(left + 1)
            left -= len(line)
            if not line and not lines:
                raise http.client.RemoteDisconnected("the upstream closed the connection without a response")
            if left < 0 or not line.endswith(b"\n"):
                raise UpstreamHeadError("LineTooLong" if left < 0 else "IncompleteHead")
            line = line[:-2] if line.endswith(b"\r\n") else line[:-1]
            if not line and lines:
                break
            lines.append(line)
    if len(lines) > MAX_RESPONSE_FIELDS + 1:
        raise UpstreamHeadError("TooManyHeaders")
    return lines, in_hand


def read_response_head(reader) -> UpstreamHead:
    """The status line and header fields of a response; interim 1xx answers are skipped.
    ConnectionError when the stream ends before the first byte (a kept-alive connection
    the server had closed), UpstreamHeadError when what came is no response head."""
    while True:
        lines, in_hand = read_head_lines(reader)
        match = _STATUS_LINE.fullmatch(lines[0])
        if match is None:
            raise UpstreamHeadError("BadStatusLine")
        fields = {}
        for line in lines[1:]:
            name, colon, value = line.decode("latin-1").partition(":")
            if colon:
                name, value = name.strip().lower(), value.strip()
                fields[name] = fields[name] + ", " + value if name in fields else value
        status = int(match.group(2))
        if status >= 200 or status == 101:
            return UpstreamHead(status, match.group(1) == b"1", fields, in_hand)


class UpstreamConnection:
    """A persistent connection to the upstream (or to the proxy tunnelling to it): its socket,
    the buffered reader its responses are read through, and where it leads."""

    def __init__(self, route: UpstreamRoute, sock: socket.socket):
        self.route, self.sock = route, sock
        self.reader = sock.makefile("rb")
        self.settle = None  # while the last response's end is due: reads it, see UpstreamCall.read_rest

    def close(self) -> None:
        sock, self.sock = self.sock, None
        if sock is not None:
            try:
                self.reader.close()
                sock.close()
            except OSError:
                pass


class UpstreamConnector:
    """Opens upstream connections: TCP, through a CONNECT tunnel where the route has one,
    then TLS for https (certificates checked by `context`).

    Loading the system's CA bundle takes tens of milliseconds (and 1.3 MB): for a `tls`
    upstream it is loaded on a thread of its own from the start, so the port opens without
    waiting for it, and the first connection waits for it if it is not there yet; an http
    upstream never loads it."""

    make_context = staticmethod(ssl.create_default_context)  # the certificates trusted: the system's

    def __init__(self, tls: bool):
        self.tls = tls
        self._context = None  # type: Optional[ssl.SSLContext]
        self._failure = None  # type: Optional[Exception]
        self._lock = threading.Lock()
        self._loaded = threading.Event()
        if tls:  # not a daemon: the interpreter must not finalise OpenSSL under it (a crash)
            threading.Thread(target=self._load, name="tls-setup").start()
        else:
            self._loaded.set()

    def _load(self) -> None:
        context, failure = None, None
        try:
            context = self.make_context()
        except Exception as exc:  # an upstream connection reports it, each time
            failure = exc
            log.error("cannot load the certificates to check the upstream's with: %s", exc)
        with self._lock:
            if not self._loaded.is_set():  # unless one was set meanwhile
                self._context, self._failure = context, failure
                self._loaded.set()

    @property
    def context(self) -> Optional[ssl.SSLContext]:
        """The TLS context of https connections, once loaded (None for an http upstream)."""
        return self.context_within(None)

    @context.setter
    def context(self, context: ssl.SSLContext) -> None:
        with self._lock:
            self._context, self._failure = context, None
            self._loaded.set()

    def context_within(self, timeout: Optional[float]) -> Optional[ssl.SSLContext]:
        """`context`, waiting at most `timeout` seconds for it (OSError after that)."""
        if not self._loaded.wait(timeout):
            raise OSError("the certificates to check the upstream's with did not load within %g seconds" % timeout)
        if self._failure is not None:
            raise OSError("no certificates to check the upstream's with: %s" % self._failure)
        return self._context

    def connect(self, route: UpstreamRoute, timeout: float) -> UpstreamConnection:
        """A new connection to `route`, connected (tunnelled, TLS set up) within `timeout`."""
        https = route.scheme == "https"
        address = split_authority(route.host, 443 if https else 80)
        if address is None:
            raise OSError("no valid host and port in %r" % route.host)
        context = self.context_within(timeout) if https else None
        sock = socket.create_connection(address, timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # the request is one write
            server_name = address[0]
            if route.tunnel:
                server_name = self.tunnel(sock, route)
            if https:
                sock = context.wrap_socket(sock, server_hostname=server_name)
        except BaseException:
            sock.close()
            raise
        return UpstreamConnection(route, sock)

    @staticmethod
    def tunnel(sock: socket.socket, route: UpstreamRoute) -> str:
        """Ask the proxy for a tunnel to the origin; returns the origin's host name."""
        origin = split_authority(route.tunnel, 443)
        if origin is None:
            raise OSError("no valid host and port in %r" % route.tunnel)
        authority = ("[%s]:%d" if ":" in origin[0] else "%s:%d") % origin
        request = "CONNECT %s HTTP/1.1\r\nHost: %s\r\n" % (authority, authority)
        if route.proxy_auth:
            request += "Proxy-Authorization: %s\r\n" % route.proxy_auth
        sock.sendall((request + "\r\n").encode("latin-1"))
        reader = sock.makefile("rb", buffering=0)  # unbuffered: not a byte of the TLS that follows is taken
        try:
            head = read_response_head(_LineReader(reader))
        finally:
            reader.close()
        if not 200 <= head.status < 300:
            raise OSError("Tunnel connection failed: %d" % head.status)
        return origin[0]


class _LineReader:
    """readline on an unbuffered stream, a byte at a time: only for a proxy's short answer to
    CONNECT, after which the stream is TLS and belongs to someone else."""

    def __init__(self, raw):
        self.raw = raw

    @staticmethod
    def peek(size: int) -> bytes:
        return b""  # nothing is buffered: read_head_lines reads line by line

    def readline(self, limit: int) -> bytes:
        line = bytearray()
        while len(line) < limit and not line.endswith(b"\n"):
            byte = self.raw.read(1)
            if not byte:
                break
            line += byte
        return bytes(line)


def idle_connection_closed(sock: Optional[socket.socket]) -> bool:
    """True when an idle connection can carry no request: the server closed or reset it, or
    sent something nobody asked for. A TLS record that carries no data (a session ticket)
    is consumed and leaves the connection usable."""
    if sock is None:
        return True
    try:
        if not socket_ready(sock):  # nothing came, nor the end: the usual answer, in one poll
            return False
    except (OSError, ValueError):  # closed here
        return True
    timeout = sock.gettimeout()  # 0 for a connection in the pool: no system calls to switch it
    try:
        if timeout != 0:
            sock.settimeout(0)
        # The TCP stream itself, under any TLS: is anything (or the end) waiting?
        if not socket.socket.recv(sock, 1, socket.MSG_PEEK):
            return True
        if not isinstance(sock, ssl.SSLSocket) or sock.pending():
            return True
        sock.recv(1)  # a record: data or a close_notify ends the connection's use
        return True
    except (BlockingIOError, InterruptedError, ssl.SSLWantReadError):
        return False
    except OSError:
        return True
    finally:
        if timeout != 0:
            try:
                sock.settimeout(timeout)
            except OSError:
                pass


def connection_ready(conn: UpstreamConnection) -> Optional[bool]:
    """Whether an idle connection can carry the next request: the end of its last response
    has come, and the server has not closed it since; None while that end is still due."""
    if conn.settle is not None:
        settled = conn.settle()
        if settled is not True:
            return settled
        conn.settle = None
    return not idle_connection_closed(conn.sock)


class UpstreamPool:
    """Idle persistent upstream connections, by route. A connection is here only between
    answers, at most `max_idle` of them, each for `idle_timeout` seconds: below the 60-75 s
    servers and load balancers allow, so the proxy closes first and seldom meets a
    connection the server has just closed. One background thread closes the expired ones and
    those the server closed, and keeps connections warm (keep_warm): as many as the recent peak
    of upstream requests in flight needs beside those in flight now, at least one."""

    max_idle = 32
    peak_window = 600.0  # how long a peak of requests in flight is remembered for FINSTEP_PREWARM
    probe_interval = 1.0  # how often idle connections are checked for expiry and a server's close
    settle_seconds = 1.0  # how long the end of a response given back may take to come
    warm_retry = 5.0  # after a failed warm connect

    def __init__(self, idle_timeout: float, clock=time.monotonic):
        self.idle_timeout, self.clock = idle_timeout, clock
        self.warm_margin = min(5.0, idle_timeout / 4)  # a warm connection this close to expiry gets a successor
        self.warm = None  # (the route kept warm, a function opening a connection to it)
        self.idle = collections.OrderedDict()  # connection -> (route, idle since), oldest first
        self.requests = collections.Counter()  # "true"/"false" (reused) -> upstream requests
        self.retries = 0
        self.busy = self.peak = 0  # upstream requests in flight now, and their recent peak
        self.peak_at = clock()
        self.closed = False
        # Requests take the lock itself (a C call); the pool's thread waits on the condition.
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)
        self.thread = threading.Thread(target=self.run, name="upstream-pool", daemon=True)
        self.thread.start()

    def __len__(self) -> int:
        return len(self.idle)

    @property
    def warm_route(self) -> Optional[UpstreamRoute]:
        """The route kept warm, if any."""
        if self.warm is None:
            return None
        route, _ = self.warm
        return route

    def keep_warm(self, route: UpstreamRoute, connect) -> None:
        """Keep idle connections to `route` open at all times; `connect()` opens one."""
        with self.changed:
            self.warm = (route, connect)
            self.changed.notify()

    def demand(self, busy: int) -> None:
        """How many upstream requests are in flight now, when connections are kept warm."""
        if self.warm is None:
            return
        with self.lock:
            now = self.clock()
            self.busy = busy
            if busy >= self.peak or now - self.peak_at > self.peak_window:
                self.peak, self.peak_at = busy, now

    def warm_wanted(self, now: float) -> int:
        """Idle connections to keep warm: the recent peak's beyond those in flight, at least one."""
        peak = self.peak if now - self.peak_at <= self.peak_window else 0
        return min(self.max_idle, max(1, peak - self.busy))

    def take(self, route: UpstreamRoute) -> Optional[UpstreamConnection]:
        """The most recently used idle connection to `route` that still works, or None."""
        while True:
            with self.lock:
                for conn, (idle_route, _) in reversed(self.idle.items()):
                    if idle_route == route:
                        break
                else:
                    return None
                del self.idle[conn]
                if self.warm is not None and route == self.warm_route:
                    self.changed.notify()  # the warm connection taken: open its successor now
            if connection_ready(conn):  # a connection whose end is still due is not waited for
                return conn
            conn.close()

    def give(self, conn: UpstreamConnection) -> None:
        with self.lock:
            if not self.closed:  # not woken: its next look, within probe_interval, sees this one
                self.idle[conn] = (conn.route, self.clock())
                conn = next(iter(self.idle)) if len(self.idle) > self.max_idle else None  # the oldest
                if conn is not None:
                    del self.idle[conn]
        if conn is not None:
            conn.close()

    def count(self, reused: bool, retried: bool = False) -> None:
        with self.lock:
            self.requests["true" if reused else "false"] += 1
            self.retries += retried

    def usable(self, conn: UpstreamConnection, since: float, now: float) -> bool:
        if now - since >= self.idle_timeout:
            return False
        ready = connection_ready(conn)
        if ready is None:  # the end of its last response is still due
            return now - since < self.settle_seconds
        return ready

    def run(self) -> None:
        """Close idle connections that expired or that the server closed; keep the warm one."""
        next_warm = 0.0
        while True:
            with self.changed:
                if self.closed:
                    return
                now = self.clock()
                # Each check is a non-blocking system call or two, for at most max_idle connections.
                doomed = [conn for conn, (_, since) in self.idle.items() if not self.usable(conn, since, now)]
                for conn in doomed:
                    del self.idle[conn]
                # Successors are opened before warm connections expire: never a moment with too few.
                cold = self.warm is not None and now >= next_warm and sum(
                    route == self.warm_route and now - since < self.idle_timeout - self.warm_margin
                    for route, since in self.idle.values()) < self.warm_wanted(now)
            for conn in doomed:
                conn.close()
            if cold:
                try:
                    _, connect = self.warm
                    self.give(connect())
                except OSError as exc:
                    next_warm = self.clock() + self.warm_retry
                    log.debug("warm upstream connection failed: %s", exc)
            with self.changed:
                if not self.closed and not cold:
                    now = self.clock()
                    due = (since + self.idle_timeout - margin - now for _, since in self.idle.values()
                           for margin in (0.0, self.warm_margin))
                    self.changed.wait(min([wait for wait in due if wait > 0] + [self.probe_interval]))

    def close(self) -> None:
        with self.changed:
            self.closed = True
            doomed, self.idle = list(self.idle), collections.OrderedDict()
            self.changed.notify()
        for conn in doomed:
            conn.close()
        self.thread.join(1.0)

    def render_metrics(self) -> List[str]:
        with self.changed:
            return ["# HELP finstep_proxy_upstream_connections_total Upstream requests, by whether they "
                    "reused a kept-alive connection.",
                    "# TYPE finstep_proxy_upstream_connections_total counter"] + [
                'finstep_proxy_upstream_connections_total{reused="%s"} %d' % (reused, self.requests[reused])
                for reused in ("true", "false")] + [
                "# HELP finstep_proxy_upstream_retries_total Requests sent again on a new connection after "
                "a kept-alive one turned out closed before any response byte.",
                "# TYPE finstep_proxy_upstream_retries_total counter",
                "finstep_proxy_upstream_retries_total %d" % self.retries,
                "# HELP finstep_proxy_upstream_idle_connections Upstream connections kept open for reuse.",
                "# TYPE finstep_proxy_upstream_idle_connections gauge",
                "finstep_proxy_upstream_idle_connections %d" % len(self.idle)]


def build_upstream_body(user_id: str, session_id: str, query: str, title: str) -> bytes:
    """The JSON body of an upstream request, as json.dumps writes it, its four strings encoded alone."""
    return ('{"userId": %s, "sessionId": %s, "query": %s, "sessionTitle": %s}' % (
        _json_string(user_id), _json_string(session_id), _json_string(query), _json_string(title))).encode("utf-8")


# Upstream statuses that matter; every other status is progress and is ignored.
RESPONSING = "RESPONSING"
DONE = "DONE"


ERROR = "ERROR"
UpstreamEvent = Tuple[str, Optional[str], Optional[str]]  # (status, type, text or error message)


_decode_json = json.JSONDecoder().raw_decode


def parse_upstream_event(line: bytes) -> Optional[UpstreamEvent]:
    """One upstream SSE line as (status, type, text), or None when it carries nothing usable.

    Finstep ends each event with a single newline, so each `data:` line is one
    event. Lenient as SSE is: `data:` with or without a space, CR before LF,
    other fields and comments skipped, a bad payload skipped on its own."""
    if not line.startswith(b"data:"):
        return None
    try:
        # What json.loads does, without its steps for text that is not UTF-8: a UTF-8 object.
        text = line[5:].decode("utf-8", "surrogatepass").strip(" \t\r\n")
        if text[:1] != "{":
            raise ValueError("not an object")
        event, end = _decode_json(text)
        if end != len(text):
            return None
    except (ValueError, RecursionError):
        try:
            event = json.loads(line[5:])  # another encoding (a BOM, UTF-16), or no object at all
        except (ValueError, RecursionError):
            return None
    status = event.get("status") if isinstance(event, dict) else None
    if not isinstance(status, str):
        return None
    status = status.upper()
    if status == RESPONSING:
        text = event.get("text")
        if not isinstance(text, str) or not text:
            return None
        kind = event.get("type")
        return RESPONSING, kind if isinstance(kind, str) else "text", text
    if status == DONE:
        return DONE, None, None
    if "ERROR" in status or "FAIL" in status:
        return ERROR, None, upstream_error_message(event, "Upstream reported " + status)
    return status, None, None


# The events that carry no text (THINKING, MSG_START, DONE ...) come as the same few lines in
# every answer: each such line is parsed once per process. Only short lines (a status and
# little else: nothing of one caller's answer is kept), at most MAX_KNOWN_LINES of them.
_known_lines = {}  # type: Dict[bytes, UpstreamEvent]
MAX_KNOWN_LINES, MAX_KNOWN_LINE = 64, 64


def upstream_event(line: bytes) -> Optional[UpstreamEvent]:
    """parse_upstream_event(line), a textless event's line remembered once parsed."""
    event = _known_lines.get(line)
    if event is not None:
        return event
    event = parse_upstream_event(line)
    if (event is not None and event[0] not in (RESPONSING, ERROR) and len(line) <= MAX_KNOWN_LINE
            and len(_known_lines) < MAX_KNOWN_LINES):
        _known_lines[line] = event
    return event


def events_of_read(pending: bytes, data: bytes) -> Tuple[List[UpstreamEvent], List[bytes], bytes]:
    """The events of an upstream read `data` that follows `pending` (the start of a line it
    ends): (the events, the `data:` lines that carried none, the start of the line after
    them); UpstreamBroken past MAX_UPSTREAM_LINE bytes of a line."""
    lines = (pending + data).split(b"\n") if pending else data.split(b"\n")
    rest = lines.pop()
    if len(rest) > MAX_UPSTREAM_LINE:
        raise UpstreamBroken("a line longer than %d bytes" % MAX_UPSTREAM_LINE)
    events, skipped = [], []
    for line in lines:
        event = upstream_event(line)
        if event is not None:
            events.append(event)
        elif line.startswith(b"data:"):
            skipped.append(line)
    return events, skipped, rest


def upstream_error_message(payload, fallback: str) -> str:
    """The human message in an upstream error payload (a dict or raw bytes), cut short."""
    if isinstance(payload, bytes):
        try:
            payload = json.loads(payload)
        except (ValueError, RecursionError):
            text = payload.decode("utf-8", "replace").strip()
            return text[:300] if text else fallback
    if isinstance(payload, dict):
        for field in ("message", "msg", "errorMsg", "error_description", "detail", "error", "text"):
            value = payload.get(field)
            if isinstance(value, dict):
                value = value.get("message")
            if isinstance(value, str) and value.strip():
                return value.strip()[:300]
    return fallback


_HEADER_VALUE = re.compile(FIELD_VALUE)


@functools.lru_cache(maxsize=64)  # as key_digest: the same few keys, request after request
def key_as_header_value(key: str) -> Optional[bytes]:
    """A key as the bytes of a header value, or None when a header cannot carry it."""
    try:
        encoded = key.encode("latin-1")
    except UnicodeEncodeError:
        return None
    return encoded if _HEADER_VALUE.fullmatch(encoded) else None


def upstream_request(target: UpstreamTarget, key: str, body: bytes) -> bytes:
    """A whole upstream request, head and body, for one write; the key goes in as one
    header value or not at all (ProxyError 401)."""
    encoded = key_as_header_value(key)
    if encoded is None:
        raise ProxyError(401, "The API key has characters an HTTP header cannot carry", code="invalid_api_key")
    return b"%sAuthorization: %s\r\nContent-Length: %d\r\n\r\n%s" % (target.head, encoded, len(body), body)


def read_up_to(read, limit: int) -> bytes:
    """What `read()` gives, up to `limit` bytes, until its end or an error: an error's body."""
    data = b""
    try:
        while len(data) < limit:
            more = read()
            if not more:
                break
            data += more
    except (OSError, ValueError, UpstreamBroken):
        pass
    return data[:limit]


class ResponseFraming(NamedTuple):
    """How a response's body is framed, and whether its connection may carry another."""
    chunked: bool
    length: Optional[int]  # by Content-Length; None: chunked, or to the end of the stream
    will_close: bool


def response_framing(head: UpstreamHead) -> ResponseFraming:
    """RFC 9112's rules: no body for 1xx, 204 and 304; chunked when the last transfer coding
    is; else one Content-Length; else the body ends with the stream. A connection closes
    after `Connection: close`, an HTTP/1.0 answer not kept alive, or a body that ends with
    the stream."""
    codings, connection = head.tokens("transfer-encoding"), head.tokens("connection")
    will_close = "close" in connection or (not head.http11 and "keep-alive" not in connection)
    if head.status < 200 or head.status in (204, 304):  # never a body, whatever the fields say
        return ResponseFraming(False, 0, will_close)
    if codings:
        chunked = codings[-1] == "chunked"
        return ResponseFraming(chunked, None, will_close or not chunked)
    lengths = set(head.tokens("content-length"))
    length = lengths.pop() if len(lengths) == 1 else ""
    if length.isascii() and length.isdigit():
        return ResponseFraming(False, int(length), will_close)
    return ResponseFraming(False, None, True)  # none, or differing ones: the body ends with the stream


class UpstreamCall:
    """One request to Finstep on a kept-alive connection: open it, iterate its parsed
    events, then recycle it (an answer read to its clean end hands its connection back to
    the pool) or close it (anything else discards the connection).

    `abort()` may be called from any thread: it shuts the socket, which wakes a
    read blocked in the owning thread."""

    def __init__(self, target: Optional[UpstreamTarget], connector: UpstreamConnector, pool: UpstreamPool,
                 key: str, body: bytes, connect_timeout: float, read_timeout: float):
        self.target, self.connector, self.pool = target, connector, pool
        self.key, self.body = key, body
        self.connect_timeout, self.read_timeout = connect_timeout, read_timeout
        self.connection = None  # type: Optional[UpstreamConnection]
        self.reused = self.retried = False
        self.status = None  # type: Optional[int]
        self.chunked = self.will_close = False
        self.left = None  # type: Optional[int]  # body bytes still due by Content-Length; None: to the stream's end
        self.events_seen = 0
        self.in_hand = False  # body bytes came with the head: the first read of the body waits for nothing
        self.before_wait = None  # called before a read of the body that may wait (the pipeline sends what it holds)
        self.last_skipped = b""  # the last `data:` line that was no event: an error, perhaps
        self._read = None  # the body reader, once the body is being read
        self._reader = None  # the connection's buffered reader, once the body is being read
        self._pending = b""  # the start of a line whose end is still to come
        self._ended = False  # the body's end was read: next_events has no more
        self._debug = False  # skipped lines are logged
        self._decoder = None  # type: Optional[ChunkedDecoder]
        self._recycled = False  # the connection went back to the pool: no longer ours to close
        self._rest_budget = MAX_SETTLE_BYTES
        self._sock = None
        self._aborted = False
        self._lock = threading.Lock()

    @property
    def aborted(self) -> bool:
        return self._aborted

    @property
    def conn_note(self) -> str:
        """How the request reached the upstream, for the log line."""
        return "retried" if self.retried else "reused" if self.reused else "new"

    def use(self, conn: UpstreamConnection) -> None:
        """Send this call on `conn`: its reads may take the read timeout, and abort() shuts it."""
        self.connection = conn
        if conn.sock.gettimeout() != self.read_timeout:  # a connection reused has it, mostly
            conn.sock.settimeout(self.read_timeout)
        with self._lock:
            self._sock = conn.sock
            aborted = self._aborted
        if aborted:
            shut(conn.sock)

    def abort(self) -> None:
        with self._lock:
            self._aborted = True
            sock = self._sock
        if sock is not None:
            shut(sock)

    def open(self) -> None:
        """Send the request and wait for the response head; raises ProxyError on any failure."""
        if self.target is None:
            raise ProxyError(502, "The upstream is reached through a proxy of another scheme than its own, "
                                  "which is not supported", code="upstream_unreachable")
        request, route = upstream_request(self.target, self.key, self.body), self.target.route
        conn = self.pool.take(route)
        while True:
            self.reused = conn is not None
            try:
                if conn is None:
                    conn = self.connector.connect(route, self.connect_timeout)
                self.use(conn)
                conn.sock.sendall(request)
            except OSError as exc:
                if conn is not None:
                    conn.close()
                if self.reused and isinstance(exc, ConnectionError) and not self._aborted:
                    conn, self.retried = None, True  # closed while idle: the server saw nothing
                    continue
                self.connection = None
                if isinstance(exc, (socket.timeout, TimeoutError)):
                    raise ProxyError(504, "The upstream did not accept the connection within %g seconds"
                                     % self.connect_timeout, code="upstream_connect_timeout") from None
                raise ProxyError(502, "Cannot reach the upstream: %s" % (exc,), code="upstream_unreachable") from None
            try:
                head = read_response_head(conn.reader)
                break
            except (socket.timeout, TimeoutError):
                self.close()
                raise self.timeout_error() from None
            except ConnectionError as exc:
                # Reset, or the end of the stream, before the status line's first byte: a
                # kept-alive connection the server had closed. It never answered; once more.
                self.close()
                if self.reused and not self._aborted:
                    conn, self.retried = None, True
                    continue
                raise ProxyError(502, "The upstream closed the connection before answering (%s)"
                                 % (exc.__class__.__name__,), code="upstream_unreachable") from None
            except (OSError, UpstreamHeadError) as exc:
                self.close()
                name = str(exc) if isinstance(exc, UpstreamHeadError) else exc.__class__.__name__
                raise ProxyError(502, "The upstream closed the connection before answering (%s)" % name,
                                 code="upstream_unreachable") from None
        self.pool.count(self.reused, self.retried)
        self.status, self.in_hand = head.status, head.in_hand > 0
        self.chunked, self.left, self.will_close = response_framing(head)
        if not 200 <= head.status < 300:
            detail = read_up_to(self.body_reader(), 4096)
            self.close()
            raise upstream_status_error(head.status, detail, head.fields.get("retry-after"))
        content_type = head.fields.get("content-type", "").lower()
        if "json" in content_type or "html" in content_type:  # an error page, not an event stream
            detail = read_up_to(self.body_reader(), 4096)
            self.close()
            message = upstream_error_message(detail, "no message")
            raise ProxyError(502, "The upstream answered %s instead of an event stream: %s"
                             % (content_type.split(";")[0], message), code="upstream_not_streaming")

    def timeout_error(self) -> ProxyError:
        return ProxyError(504, "The upstream sent nothing for %g seconds" % self.read_timeout,
                          code="upstream_timeout")

    def body_reader(self):
        """A function returning the body bytes that have arrived (b"" at its end), never
        waiting for more than one read. A chunked body is decoded here, so every event
        already received leaves in one write, and a body cut before its last chunk is an error.

        Each read first peeks, which fills the socket reader's own buffer when it is empty:
        read1 on an empty buffer allocates a fresh READ_SIZE bytes object per read instead,
        which across a thousand streams' threads costs some 40 MB of heap. A read takes all
        the buffer holds, so only the first (when bytes came with the head) never waits."""
        self._reader = self.connection.reader
        if not self.chunked:  # Content-Length, or to the stream's end
            return self.read_plain
        self._decoder = ChunkedDecoder()
        return self.read_chunked

    def about_to_read(self) -> None:
        if self.in_hand:
            self.in_hand = False
        elif self.before_wait is not None:
            self.before_wait()

    def read_plain(self) -> bytes:
        left = self.left
        if left == 0:
            return b""
        self.about_to_read()
        reader = self._reader
        if not reader.peek(1):
            return b""
        data = reader.read1(READ_SIZE if left is None else min(left, READ_SIZE))
        if left is not None:
            self.left = left - len(data)
        return data

    def read_chunked(self) -> bytes:
        decoder, reader = self._decoder, self._reader
        while not decoder.done:
            self.about_to_read()
            if not reader.peek(1):
                raise UpstreamBroken("IncompleteRead")
            payload = decoder.feed(reader.read1(READ_SIZE))
            if payload:
                return payload
        return b""

    def next_events(self) -> Optional[List[UpstreamEvent]]:
        """The parsed events of the next read that brings any, the moment it returns; None
        once the body has ended. (Not a generator: one left at DONE, as nearly every answer
        leaves it, would be closed by an exception thrown into it.)"""
        if self._ended:
            return None
        read = self._read
        if read is None:
            read = self._read = self.body_reader()
            self._debug = log.isEnabledFor(logging.DEBUG)
        try:
            while True:
                data = read()
                if not data:
                    break
                batch, skipped, self._pending = events_of_read(self._pending, data)
                if skipped:
                    self.last_skipped = skipped[-1][5:4101]
                    if self._debug:
                        for line in skipped:
                            log.debug("skipped upstream line: %r", line[:200], extra={"secret": self.key})
                if batch:
                    self.events_seen += len(batch)
                    return batch
        except (socket.timeout, TimeoutError):
            raise self.timeout_error() from None
        except (OSError, ValueError) as exc:
            raise UpstreamBroken(exc.__class__.__name__) from None
        self._ended = True
        if self._aborted:
            raise UpstreamBroken("aborted")
        if self.left:  # Content-Length promised more than arrived
            raise UpstreamBroken("IncompleteRead")
        event = upstream_event(self._pending)
        if event is None:
            return None
        self.events_seen += 1
        return [event]

    def body_done(self) -> bool:
        """The response was read to its clean end, and nothing came after it."""
        if self._decoder is not None:
            return self._decoder.done and not self._decoder.buffer
        return self.left == 0

    def recycle(self) -> None:
        """The answer is complete: give the connection to the pool, which reuses it once the
        rest of the body (the end of the chunked framing, usually here already) is read,
        unless the server said it closes the connection or this call was aborted."""
        with self._lock:
            self._sock = None  # from now on an abort leaves the connection alone
            usable = not self._aborted and not self.will_close
        self.before_wait = None  # a connection settling in the pool keeps this call, not the request's sink
        conn = self.connection
        if not usable or conn is None or conn.sock is None or self._read is None:
            self.close()
            return
        settled = self.read_rest()
        if settled is False:
            self.close()
            return
        self._recycled, self.connection = True, None
        conn.settle = None if settled else functools.partial(self.read_rest, conn)
        self.pool.give(conn)

    def read_rest(self, conn: Optional[UpstreamConnection] = None) -> Optional[bool]:
        """Read, never waiting, what has come of the body after the answer's end: True once
        the body ended cleanly (the connection can carry the next request), None while more
        is due, False when the connection cannot be reused."""
        conn = conn or self.connection
        sock, reader = conn.sock, conn.reader
        if self._decoder is None or not self.body_done():  # reads to come: they never wait
            sock.settimeout(0)  # (a connection read to its end keeps its timeout: no system call)
        try:
            while not self.body_done():
                if self._decoder is not None and self._decoder.done:  # bytes after the end
                    return False
                if not (isinstance(sock, ssl.SSLSocket) and sock.pending()) and not socket_ready(sock):
                    return None
                if self._decoder is None:
                    data = reader.read1(min(self.left, READ_SIZE))
                    self.left -= len(data)
                else:
                    data = reader.read1(READ_SIZE)
                    self._decoder.feed(data)
                self._rest_budget -= len(data)
                if not data or self._rest_budget < 0:  # the stream ended first, or it never ends
                    return False
        except (BlockingIOError, InterruptedError, ssl.SSLWantReadError):
            return None
        except (OSError, ValueError):
            return False
        return not self.leftover(conn)

    def leftover(self, conn: UpstreamConnection) -> bool:
        """Bytes after the response's end, which nobody asked for: such a connection is not
        reused. Here, those already read: in the reader's buffer (a body of known length may
        end within it; a chunked body's decoder takes all it holds) or decrypted by TLS and
        not yet read. Those that come later the pool finds before reuse (idle_connection_closed).
        Its socket is non-blocking here."""
        sock = conn.sock
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return True
        if self._decoder is not None:
            return False
        try:
            return bool(conn.reader.peek(1))
        except (BlockingIOError, InterruptedError, ssl.SSLWantReadError):
            return False
        except (OSError, ValueError):
            return True

    def close(self) -> None:
        """End the call and discard its connection: nothing else may come of it."""
        if self._recycled:
            return
        if self.connection is not None:
            self.connection.close()
            self.connection = None


def upstream_status_error(status: int, detail: bytes, retry_after: Optional[str]) -> ProxyError:
    """The client's error for an upstream error status."""
    message = upstream_error_message(detail, status_phrase(status))
    if status in (401, 403):
        return ProxyError(401, "The upstream rejected the API key: %s" % message, code="invalid_api_key")
    if status == 429:
        headers = {"Retry-After": retry_after} if retry_after else None
        return ProxyError(429, "The upstream is rate limiting: %s" % message,
                          code="rate_limit_exceeded", headers=headers)
    return ProxyError(502, "The upstream answered HTTP %d: %s" % (status, message),
                      code="upstream_http_%d" % status)


# --- Answers: upstream text routed into the pipeline's events, limits and stop sequences ---

PHASES = ("THINKING", "ORGANIZING")  # Finstep's phases before it answers
PHASE_ENDS = ("MSG_START", "MSG_DONE")  # statuses that say the phase is over (as does any answer text)
THINK_OPEN = "<think>\n"


THINK_CLOSE = "\n</think>\n\n"


class StopScanner:
    """Finds a request's stop sequences in the answer text as it streams, and how much of its
    end could begin one. An Aho-Corasick automaton over all the sequences, built once per
    request: each character of the answer is read once, whatever the text and the sequences
    hold (searching the held text again on every delta would cost the square of a
    sequence's length each time), and while nothing is begun a regular expression jumps, in
    C, to the next character that could begin one."""

    def __init__(self, stops: Sequence[str]):
        self.stops = tuple(stops)
        self.order = {stop: index for index, stop in enumerate(self.stops)}
        self.longest = max(map(len, self.stops))
        children, depth, ends = [{}], [0], [None]  # by node: the trie's edges, its depth, a sequence ending
        for stop in self.stops:
            node = 0
            for char in stop:
                if char not in children[node]:
                    children[node][char] = len(children)
                    children.append({})
                    depth.append(depth[node] + 1)
                    ends.append(None)
                node = children[node][char]
            ends[node] = ends[node] or stop
        # Breadth first: each node's failure link (its longest proper suffix in the trie) and the
        # longest sequence that ends it, its own or its failure link's.
        fail, found, queue = [0] * len(children), list(ends), list(children[0].values())
        for node in queue:  # grows as it goes: every node once, parents first
            for char, child in children[node].items():
                link = fail[node]
                while link and char not in children[link]:
                    link = fail[link]
                fail[child] = children[link].get(char, 0) if node else 0
                found[child] = found[child] or found[fail[child]]
                queue.append(child)
        self.children, self.depth, self.fail, self.found = children, depth, fail, found
        self.begins = re.compile("[%s]" % "".join(re.escape(stop[0]) for stop in self.stops))
        self.node = 0  # the longest end of the text read that begins some sequence

    def feed(self, text: str) -> Optional[Tuple[int, str]]:
        """Read `text`: (where in it the earliest stop sequence ending in it begins, negative
        when it began in text read before; that sequence), or None."""
        children, fail, ends = self.children, self.fail, self.found
        node, position, size, best, best_start, best_order = self.node, 0, len(text), None, 0, 0
        while position < size:
            if node == 0:
                hit = self.begins.search(text, position)
                if hit is None:
                    break
                position = hit.start()
            char = text[position]
            while node and char not in children[node]:
                node = fail[node]
            node = children[node].get(char, 0)
            position += 1
            stop = ends[node]
            if stop is not None:
                start = position - len(stop)
                if best is None or (start, self.order[stop]) < (best_start, best_order):
                    best, best_start, best_order = (start, stop), start, self.order[stop]
                if position - self.longest >= best_start:  # no sequence ending later can begin earlier
                    break
        self.node = node
        return best

    @property
    def partial(self) -> int:
        """How many characters at the end of the text read could begin a stop sequence."""
        return self.depth[self.node]


class AnswerRouter:
    """Routes upstream answer text per the reasoning mode into TEXT and REASONING events,
    and keeps the answer: `content` and `reasoning` hold exactly what went to the client.

    With an output limit or stop sequences it also ends the answer where they say: `cut`
    turns to "length" or "stop" (with `stop_sequence`), and nothing more is routed. Answer
    text that could begin a stop sequence waits for the next delta; nothing else ever waits."""

    def __init__(self, mode: str, prompt: str = "", max_output: Optional[int] = None,
                 stops: Sequence[str] = ()):
        self.mode = mode
        self.prompt = prompt  # the query sent upstream, for the usage estimate
        self.content = []  # type: List[str]
        self.reasoning = []  # type: List[str]
        self.unfamiliar_types = set()
        self.answer_started = False
        self.think_open = False
        self.max_output, self.stops = max_output, tuple(stops)
        self.scanner = StopScanner(self.stops) if self.stops else None
        self.guarded = max_output is not None or bool(stops)
        self.cut = None  # type: Optional[str]
        self.stop_sequence = None  # type: Optional[str]
        self.held = ""  # answer text that could begin a stop sequence: not sent yet
        self.spent = (0, 0)  # wide and other characters sent, counted as estimate_tokens does

    def route(self, kind: str, text: str) -> Optional[Tuple[str, str]]:
        """(event kind, text) for one RESPONSING event, or None when nothing is sent."""
        if kind != "deepthink":
            if kind != "text":
                self.unfamiliar_types.add(kind)
            self.answer_started = True
            if self.think_open or self.guarded:  # the common case stays this short: once per token
                return self.route_slowly(TEXT, text, True)
            self.content.append(text)
            return TEXT, text
        mode = self.mode
        if mode == "reasoning" and not self.guarded:
            self.reasoning.append(text)
            return REASONING, text
        if mode == "drop" or (mode == "think" and self.answer_started):
            return None  # `think` keeps one block before the answer; late thinking is dropped
        if mode == "think" and not self.think_open:
            self.think_open = True
            text = THINK_OPEN + text
        return self.route_slowly(REASONING if mode == "reasoning" else TEXT, text, False)

    def route_slowly(self, event: str, text: str, answer: bool) -> Optional[Tuple[str, str]]:
        """route() for answer text that closes a <think> block, for thinking shown as text,
        and for everything when there are limits to keep."""
        lead = ""
        if answer and self.think_open:
            self.think_open = False
            lead = THINK_CLOSE
        if self.guarded:
            text = self.guard(lead, text, answer)
            if not text:
                return None
        else:
            text = lead + text
        (self.content if event == TEXT else self.reasoning).append(text)
        return event, text

    def guard(self, lead: str, text: str, answer: bool) -> str:
        """`lead` and `text` as far as the stop sequences (searched in answer text only) and
        the output limit let them go now."""
        if self.cut:
            return ""
        if answer and self.stops:
            found = self.scanner.feed(text)
            held, self.held = self.held, ""
            text = held + text
            if found is not None:  # it begins in this text, or in the held text before it
                start, self.stop_sequence = found
                text, self.cut = text[:len(held) + start], "stop"
            else:
                wait = min(self.scanner.partial, len(text))
                if wait:
                    text, self.held = text[:-wait], text[-wait:]
        text = lead + text
        return self.within_limit(text) if self.max_output is not None else text

    def within_limit(self, text: str) -> str:
        """The part of `text` the output limit allows; at the limit the answer is cut."""
        spent_wide, other = self.spent
        added = count_wide(text)
        if spent_wide + added + (other + len(text) - added + 3) // 4 <= self.max_output:
            self.spent = (spent_wide + added, other + len(text) - added)
            return text
        for index, char in enumerate(text):
            wide = char >= WIDE
            if spent_wide + wide + (other + (not wide) + 3) // 4 > self.max_output:
                text = text[:index]
                break
            spent_wide, other = spent_wide + wide, other + (not wide)
        self.spent = (spent_wide, other)
        self.cut, self.stop_sequence, self.held = "length", None, ""
        return text

    def finish(self) -> Optional[str]:
        """The text still due when the answer ends: answer text held for a stop sequence
        that never came, and the end of an open <think> block."""
        tail = ""
        if self.held and not self.cut:
            tail, self.held = self.held, ""
            if self.max_output is not None:
                tail = self.within_limit(tail)
        if self.think_open:
            self.think_open = False
            tail += THINK_CLOSE
        if not tail:
            return None
        self.content.append(tail)
        return tail

    def usage(self) -> dict:
        """Chat completions' usage, estimated; the reasoning's share too, as OpenAI reports it
        (clients such as `llm` show that there was reasoning by it)."""
        reasoning = "".join(self.reasoning)
        usage = estimate_usage(self.prompt, reasoning + "".join(self.content))
        usage["completion_tokens_details"] = {"reasoning_tokens": estimate_tokens(reasoning)}
        return usage


WIDE = "\u0800"  # from here on, a character is about a token of its own
_WIDE_LEADS = bytes(1 if 0xE0 <= byte <= 0xF7 else 0 for byte in range(256))  # of 3- and 4-byte UTF-8


def count_wide(text: str) -> int:
    """The characters from U+0800 on (Chinese, Japanese, Korean and most other scripts,
    symbols, emoji) in `text`: the lead bytes of its 3- and 4-byte UTF-8 sequences, counted
    in two passes of C, however the text mixes them."""
    if text.isascii():
        return 0
    return text.encode("utf-8", "surrogatepass").translate(_WIDE_LEADS).count(1)


def estimate_tokens(text: str) -> int:
    """An estimate, not a tokenizer: one token per character from U+0800 on (CJK, kana,
    Hangul…), one per ~4 other characters."""
    wide = count_wide(text)
    return wide + (len(text) - wide + 3) // 4


def estimate_usage(prompt: str, completion: str) -> dict:
    prompt_tokens, completion_tokens = estimate_tokens(prompt), estimate_tokens(completion)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


# --- Metrics ------------------------------------------------------------------------------

_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
OUTCOMES = ("ok", "auth", "rate_limited", "upstream_error", "timeout", "client_gone", "cancelled", "shutdown")


class Histogram:
    def __init__(self):
        self.counts = [0] * len(_BUCKETS)
        self.total = 0.0
        self.count = 0

    def observe(self, seconds: float) -> None:
        index = bisect.bisect_left(_BUCKETS, seconds)  # the first bucket whose bound is >= seconds
        if index < len(_BUCKETS):
            self.counts[index] += 1
        self.total += seconds
        self.count += 1

    def render(self, name: str) -> List[str]:
        lines, running = [], 0
        for bound, count in zip(_BUCKETS, self.counts):
            running += count
            lines.append('%s_bucket{le="%g"} %d' % (name, bound, running))
        lines += ['%s_bucket{le="+Inf"} %d' % (name, self.count), "%s_sum %.6f" % (name, self.total),
                  "%s_count %d" % (name, self.count)]
        return lines


class Metrics:
    """Counters and histograms for GET /metrics, in Prometheus' text format."""

    def __init__(self):
        self.requests = collections.Counter()  # (path, status) -> count
        self.outcomes = collections.Counter()
        self.first_byte = Histogram()
        self.duration = Histogram()
        self.in_flight = 0
        self.lock = threading.Lock()

    def request(self, path: str, status: int, seconds: float) -> None:
        with self.lock:
            self.requests[(path, status)] += 1
            self.duration.observe(seconds)

    def upstream(self, outcome: str, first_byte: Optional[float]) -> None:
        with self.lock:
            self.outcomes[outcome] += 1
            if first_byte is not None:
                self.first_byte.observe(first_byte)

    def summary(self) -> Tuple[Dict[str, int], Dict[str, int], int]:
        """What GET /status shows of them: requests by status class ("2xx"), upstream results by
        outcome, upstream requests in flight."""
        with self.lock:
            requests = collections.Counter()
            for (_, status), count in self.requests.items():
                requests["%dxx" % (status // 100)] += count
            return dict(requests), {outcome: self.outcomes[outcome] for outcome in OUTCOMES}, self.in_flight

    def render(self) -> str:
        with self.lock:
            lines = ["# HELP finstep_proxy_requests_total Requests answered, by path and status.",
                     "# TYPE finstep_proxy_requests_total counter"]
            lines += ['finstep_proxy_requests_total{path="%s",status="%d"} %d' % (path, status, count)
                      for (path, status), count in sorted(self.requests.items())]
            lines += ["# HELP finstep_proxy_upstream_results_total Upstream requests, by outcome.",
                      "# TYPE finstep_proxy_upstream_results_total counter"]
            lines += ['finstep_proxy_upstream_results_total{outcome="%s"} %d' % (outcome, self.outcomes[outcome])
                      for outcome in OUTCOMES]
            lines += ["# HELP finstep_proxy_streams_in_flight Upstream requests in progress.",
                      "# TYPE finstep_proxy_streams_in_flight gauge",
                      "finstep_proxy_streams_in_flight %d" % self.in_flight,
                      "# HELP finstep_proxy_upstream_first_byte_seconds Time to the upstream's response head.",
                      "# TYPE finstep_proxy_upstream_first_byte_seconds histogram"]
            lines += self.first_byte.render("finstep_proxy_upstream_first_byte_seconds")
            lines += ["# HELP finstep_proxy_request_duration_seconds Time to answer a request in full.",
                      "# TYPE finstep_proxy_request_duration_seconds histogram"]
            lines += self.duration.render("finstep_proxy_request_duration_seconds")
        return "\n".join(lines) + "\n"


def outcome_of(error: Optional[ProxyError]) -> str:
    """The metrics outcome of an upstream request that ended with `error` (None: success)."""
    if error is None:
        return "ok"
    return {401: "auth", 429: "rate_limited", 504: "timeout"}.get(error.status, "upstream_error")


# --- The watchdog: heartbeats, departed clients, slow request heads -----------------------

class HangupWatcher:
    """Tells which watched client sockets' peers have left. With epoll (Linux) it waits for
    the hang-up itself (EPOLLRDHUP), so bytes a client sent before leaving (a stray CRLF, a
    pipelined request) neither hide its departure nor wake the loop; they stay unread for
    the next request. Elsewhere it waits for readability and peeks, once per socket.
    Not thread-safe: the Watchdog calls it under its lock, but for ready()."""

    use_epoll = all(hasattr(select, name) for name in ("epoll", "EPOLLRDHUP", "POLLRDHUP"))

    def __init__(self):
        self.waker, self._wake = socket.socketpair()  # wake() ends a wait at once
        self.watched = {}  # fd -> (socket, owner)
        self.fds = {}  # socket -> fd, since a closed socket forgets its fd
        self.epoll = select.epoll() if self.use_epoll else None
        self.selector = None if self.epoll else selectors.DefaultSelector()
        if self.epoll:
            self.epoll.register(self.waker.fileno(), select.EPOLLIN)
        else:
            self.selector.register(self.waker, selectors.EVENT_READ)

    def watch(self, sock: socket.socket, owner) -> None:
        fd = self.fds.get(sock)
        if fd is not None:  # watched already, for an earlier request on its connection
            self.watched[fd] = (sock, owner)
            return
        try:
            fd = sock.fileno()
            if self.epoll:
                self.epoll.register(fd, select.EPOLLRDHUP)  # EPOLLHUP and EPOLLERR always count
            else:
                self.selector.register(fd, selectors.EVENT_READ)
        except (KeyError, ValueError, OSError):
            return
        self.watched[fd], self.fds[sock] = (sock, owner), fd

    def answered(self, sock: socket.socket) -> None:
        """An answer on `sock`'s connection is over. With epoll the socket stays watched until its
        connection ends (unwatch): only a hang-up wakes the loop. Elsewhere readiness also means
        the next request's bytes, which would wake it every time: each answer is watched alone."""
        if not self.epoll:
            self.unwatch(sock)

    def unwatch(self, sock: socket.socket) -> None:
        fd = self.fds.pop(sock, None)
        if fd is None:
            return
        del self.watched[fd]
        try:
            if self.epoll:
                self.epoll.unregister(fd)
            else:
                self.selector.unregister(fd)
        except (KeyError, ValueError, OSError):
            pass

    def ready(self, timeout: float) -> List[int]:
        """The file descriptors with news, waiting at most `timeout` seconds."""
        try:
            if self.epoll:
                return [fd for fd, _ in self.epoll.poll(timeout)]
            return [key.fd for key, _ in self.selector.select(timeout)]
        except (OSError, ValueError):  # a socket closed while registered: look again
            return []

    def departed(self, fd: int):
        """The owner of `fd` if its peer left, else None. A socket with news is no longer
        watched: there is nothing more to learn from it. The news is checked on the socket
        itself, as ready() runs unlocked: by now `fd` may number a newer connection."""
        entry = self.watched.get(fd)
        if entry is None:
            return None
        sock, owner = entry
        left = self.peer_left(sock)
        if left is None:
            return None
        self.unwatch(sock)
        return owner if left else None

    def peer_left(self, sock: socket.socket) -> Optional[bool]:
        """True: the peer left; False: it sent more bytes; None: no news."""
        if self.epoll:
            poller = select.poll()
            poller.register(sock, select.POLLRDHUP)  # and POLLHUP, POLLERR, always
            return True if poller.poll(0) else None
        try:
            return not sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError:
            return True

    def wake(self) -> None:
        self._wake.send(b"x")

    def close(self) -> None:
        (self.epoll or self.selector).close()
        self.waker.close()
        self._wake.close()


class Watchdog:
    """One thread for the whole server. It notices a client that left the moment it happens,
    also while the upstream is silent, and aborts that request's upstream call; it sends
    keep-alives to streams that would otherwise be silent for `heartbeat` seconds; and it
    drops connections whose request is not in by its deadline. Those connections, oldest
    first, are also the ones the server closes to make room for a new connection."""

    def __init__(self, heartbeat: float, client_timeout: float):
        self.tick = min(0.25, heartbeat / 4)
        self.heartbeat_due = heartbeat - self.tick  # checked every tick: never later than heartbeat
        self.client_timeout = client_timeout
        self.hangups = HangupWatcher()
        self.active = set()  # handlers with an answer in progress
        # Handlers whose client leaving is news: from watch() to quiet(). With epoll a connection
        # stays watched from its first answer to its end (disconnect), not registered and
        # unregistered for every request; a hang-up between answers only ends that watch.
        self.listening = set()
        self.deadlines = {}  # handler -> monotonic time its request must be in by, oldest first
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self.run, name="watchdog", daemon=True)
        self.thread.start()

    def set_deadline(self, handler, when: Optional[float]) -> None:
        with self.lock:
            if when is None:
                self.deadlines.pop(handler, None)
            else:
                self.deadlines[handler] = when

    def watch(self, handler) -> None:
        with self.lock:
            self.active.add(handler)
            self.listening.add(handler)
            self.hangups.watch(handler.connection, handler)

    def quiet(self, handler) -> None:
        """No more news of this request's client leaving: its answer's end is going out."""
        with self.lock:
            self.listening.discard(handler)
            self.hangups.answered(handler.connection)

    def forget(self, handler) -> None:
        with self.lock:
            self.deadlines.pop(handler, None)
            self.active.discard(handler)
            self.listening.discard(handler)
            self.hangups.answered(handler.connection)

    def disconnect(self, handler) -> None:
        """The handler's connection ends: it is watched no more."""
        with self.lock:
            self.listening.discard(handler)
            self.hangups.unwatch(handler.connection)

    def make_room(self) -> bool:
        """Close the connection that has waited longest without a complete request; False
        when every connection has a request in progress."""
        with self.lock:
            if not self.deadlines:
                return False
            handler = next(iter(self.deadlines))
            del self.deadlines[handler]
        handler.drop("no request in progress when the connection limit was reached")
        return True

    def run(self) -> None:
        while not self.stopped.is_set():
            ready = self.hangups.ready(self.tick)
            now = time.monotonic()
            with self.lock:
                departed = [self.hangups.departed(fd) for fd in ready]
                departed = [handler for handler in departed if handler in self.listening]
                streams = [h for h in self.active
                           if h.exchange.stream_open and now - h.exchange.last_write >= self.heartbeat_due]
                late = []
                for handler, when in self.deadlines.items():  # in the order they were set: oldest first
                    if when > now:
                        break
                    late.append(handler)
                for handler in late:
                    del self.deadlines[handler]
            for handler in departed:
                handler.interrupt("client_gone")
            for handler in streams:
                handler.heartbeat()
            for handler in late:
                handler.drop("no complete request within %gs" % self.client_timeout)

    def stop(self) -> None:
        self.stopped.set()
        self.hangups.wake()
        self.thread.join(1.0)
        self.hangups.close()


# --- The answer pipeline: one request, any wire format ------------------------------------

class ClientGone(Exception):
    """The client closed its connection; nobody is left to answer."""


def shutting_down() -> ProxyError:
    return ProxyError(503, "The proxy is shutting down; retry", code="server_shutting_down",
                      headers={"Retry-After": "1"})


class AnswerPipeline:
    """Answers one request, whatever its wire format: the keys, the conversation's session,
    a stream slot, the upstream call with key failover, relaying its events to the wire
    format, remembering the turn, the upstream's metrics. It writes the request's state to
    its Exchange and answers through its ResponseSink; the handler owns both, and the
    connection."""

    def __init__(self, server: "ProxyServer", exchange: "Exchange", sink: "ResponseSink", wire: WireFormat):
        self.server, self.exchange, self.sink, self.wire = server, exchange, sink, wire
        self.config = server.config
        self.slot_held = False
        self.first_byte = None  # type: Optional[float]
        self.last_batch = False  # relay's batch is the answer's last: no upstream read follows

    def run(self, request: AnswerRequest, caller: Caller) -> None:
        exchange, server, config = self.exchange, self.server, self.config
        exchange.marks = request.marks
        if request.local is not None:  # the format answers itself: no slot, no upstream, no memory
            self.answer_locally(request)
            return
        if server.draining:
            self.sink.close_after()
            raise shutting_down()
        if not server.begin_stream():
            raise ProxyError(503, "Too many requests in progress (%d); retry shortly" % config.max_streams,
                             code="server_busy", headers={"Retry-After": "1"})
        self.slot_held = True
        error = None
        try:
            # Memory is read, consumed and claimed only now: for a known caller holding a slot.
            request = self.wire.recall(request, caller.id)
            turn = plan_turn(server.sessions, config.sessions, config.max_query, caller.id, request, config.system)
            exchange.session, exchange.stream_open, exchange.folded_out = turn.path, request.stream, turn.dropped
            self.sink.watch()
            if request.stream and self.wire.opens_at_once:
                self.sink.open()
            turn, key = self.open_upstream(turn, self.key_order(turn, caller.keys), request.title)
            answer = AnswerRouter(config.reasoning, turn.query, request.max_output, request.stops)
            if request.stream:
                self.stream(turn, key, answer)
            else:
                self.send(turn, key, answer)
        except ProxyError as exc:
            error = exc
            raise
        except ClientGone:
            exchange.interrupted = exchange.interrupted or "client_gone"
            raise
        finally:
            self.release(exchange.interrupted or outcome_of(error))

    def key_order(self, turn: Turn, keys: Sequence[str]) -> List[str]:
        pool = self.server.key_pool
        if pool is None:  # the client's own key
            return list(keys)
        return pool.order(turn.name, turn.key)

    def release(self, outcome: str) -> None:
        """Close the upstream call, record its outcome and free its slot, once. A complete
        answer does this before its last bytes go out, so a client's next request never
        finds the slot still taken, nor a hang-up right after the end counted as a failure."""
        if not self.slot_held:
            return
        self.slot_held = False
        upstream = self.exchange.upstream
        if upstream is not None:
            upstream.close()  # a failed call's connection is discarded
            self.server.metrics.upstream(outcome, self.first_byte)
        self.server.end_stream()

    def open_upstream(self, turn: Turn, keys: Sequence[str], title: str) -> Tuple[Turn, str]:
        """Open the upstream with the first key that works: a key refused with 401/403/429
        cools down and the next is tried, each once. Returns the turn as sent, and its key."""
        exchange, config, pool = self.exchange, self.config, self.server.key_pool
        error = None
        for key in keys:
            sent = turn_on_key(turn, key, config.max_query)
            body = build_upstream_body(config.user_id, sent.session_id, sent.query, title)
            server = self.server
            upstream = exchange.upstream = UpstreamCall(server.upstream_target, server.upstream_connector,
                                                       server.upstream_pool, key, body, config.connect_timeout,
                                                       config.timeout)
            if exchange.interrupted:  # interrupted before this call existed: it ends at once
                upstream.abort()
            began = time.monotonic()
            try:
                upstream.open()
            except ProxyError as exc:
                if upstream.status not in (401, 403, 429) or pool is None:
                    raise
                seconds = retry_after_seconds(exc.headers.get("Retry-After"))
                pool.cool_down(key, seconds)
                self.sink.log(logging.WARNING, "upstream key %s refused (HTTP %d): cooling down %gs",
                            mask_key(key), upstream.status, seconds)
                error = exc
                continue
            self.first_byte = time.monotonic() - began
            exchange.session, exchange.key, exchange.conn = sent.path, mask_key(key), upstream.conn_note
            exchange.folded_out = sent.dropped
            return sent, key
        raise error

    def relay(self, answer: AnswerRouter) -> Iterator[List[Tuple[str, str]]]:
        """The pipeline's events of each upstream read, until DONE or the end of the stream."""
        exchange = self.exchange
        upstream, route = exchange.upstream, answer.route
        phase, delivered = None, 0
        try:
            next_events = upstream.next_events
            batch = next_events()
            while batch is not None:
                events = []
                for status, kind, text in batch:
                    if status == RESPONSING:
                        if phase:
                            events.append((STEP_END, phase))
                            phase = None
                        routed = route(kind, text)
                        if routed is not None:
                            events.append(routed)
                            delivered += 1
                        if answer.cut:  # a limit or stop sequence ended it: the rest is not wanted
                            upstream.close()
                            self.last_batch = True
                            yield events
                            return
                    elif status == DONE:
                        self.last_batch = True
                        yield events
                        return
                    elif status == ERROR:
                        yield events
                        raise ProxyError(502, "The upstream reported an error: %s" % text,
                                         code="upstream_error")
                    elif status in PHASES:
                        if status != phase:
                            phase = status
                            events.append((STEP, status))
                    elif phase and status in PHASE_ENDS:
                        events.append((STEP_END, phase))
                        phase = None
                if events:
                    yield events
                batch = next_events()
        except UpstreamBroken as exc:
            raise ProxyError(502, "The upstream connection broke before the answer was complete (%s)"
                             % exc, code="upstream_disconnected") from None
        finally:
            exchange.chunks = delivered
            if answer.unfamiliar_types:
                self.sink.log(logging.DEBUG, "answer text of unfamiliar type(s) %s treated as answer",
                            sorted(answer.unfamiliar_types))
        if upstream.events_seen == 0:
            said = upstream_error_message(upstream.last_skipped, "")
            raise ProxyError(502, "The upstream stream carried no Finstep events" + (": " + said if said else ""),
                             code="upstream_empty")

    def stream(self, turn: Optional[Turn], key: str, answer: AnswerRouter, batches=None) -> None:
        """Write each batch of events the moment it comes (the upstream's reads, by default),
        then the end; the turn is remembered before the end goes out. Bytes with no wait
        between them leave in one write: the opening with the events that came with the
        upstream's head, the last events with the end (unless remembering the turn may wait,
        for Redis), a local answer whole. Before the upstream is read again, the sink sends
        what it holds."""
        sink, wire = self.sink, self.wire
        upstream = self.exchange.upstream if batches is None else None
        if upstream is not None:
            upstream.before_wait = sink.flush
        if not wire.opens_at_once:
            sink.open(hold=upstream is None or upstream.in_hand)
        render, write = wire.render, sink.write_rendered
        self.last_batch = upstream is None
        hold_last = turn is None or self.server.redis is None
        for events in self.relay(answer) if batches is None else batches:
            write(render, events, hold=hold_last and self.last_batch)
        closing = answer.finish()
        if turn is not None:
            self.complete(turn, key, answer)
        sink.end((render([(TEXT, closing)]) if closing else b"") + wire.closing(answer))

    def send(self, turn: Optional[Turn], key: str, answer: AnswerRouter, batches=None) -> None:
        for _ in self.relay(answer) if batches is None else batches:
            pass
        answer.finish()
        if turn is not None:
            self.complete(turn, key, answer)
        self.sink.send(200, self.wire.document(answer))

    def answer_locally(self, request: AnswerRequest) -> None:
        """Answer with the text the format gave, in the request's own wire format, streamed or
        not, within its limits; Finstep is not asked and nothing is remembered."""
        answer = AnswerRouter(self.config.reasoning, "", request.max_output, request.stops)
        routed = answer.route("text", request.local) if request.local else None
        batches = [[routed]] if routed else []
        if request.stream:
            self.exchange.stream_open = True
            self.sink.watch()
            if self.wire.opens_at_once:
                self.sink.open()
            self.stream(None, "", answer, batches)
        else:
            self.send(None, "", answer, batches)

    def complete(self, turn: Turn, key: str, answer: AnswerRouter) -> None:
        # Done before the client sees the end, so its next request can never arrive first.
        # A cut answer is not the upstream's whole answer: its next turn folds, as the client has it.
        remember_turn(self.server.sessions, turn, key, "".join(answer.content), exact=not answer.cut)
        self.wire.answered(turn, key, answer)
        self.exchange.cut = answer.cut
        self.exchange.upstream.recycle()
        self.release("ok")


# --- Endpoints: what each route names; `answer` hands a request to the pipeline -----------

class Endpoints:
    """The endpoints that answer from the proxy's own state, and `answer`, which hands a
    request in a wire format to the pipeline (or lets the format answer it). Each is named
    by a row of the route table and called with the request's path."""

    def health(self, path: str) -> None:
        redis = self.server.redis  # down is no failure: the proxy answers without it
        self.sink.send(200, {"status": "ok"} if redis is None else {"status": "ok",
                                                                    "redis": "up" if redis.up else "down"})

    def metrics(self, path: str) -> None:
        lines = self.server.upstream_pool.render_metrics()
        if self.server.redis is not None:
            lines += self.server.redis.render_metrics()
        self.sink.document(200, (self.server.metrics.render() + "\n".join(lines) + "\n").encode("utf-8"),
                           (("Content-Type", "text/plain; version=0.0.4; charset=utf-8"),))

    def show_status(self, path: str) -> None:
        self.sink.send(200, self.server.status(), {"Cache-Control": "no-store"})

    def show_page(self, path: str) -> None:
        self.sink.document(200, PAGE, PAGE_HEADERS)

    def list_models(self, path: str) -> None:
        models = self.server.config.models  # one list for OpenAI's clients and Anthropic's
        self.sink.send(200, {"object": "list", "data": [self.model_card(m) for m in models],
                             "has_more": False, "first_id": models[0], "last_id": models[-1]})

    def retrieve_model(self, path: str) -> None:
        model = urllib.parse.unquote(path.split("/models/", 1)[1])
        if model not in self.server.config.models:
            raise ProxyError(404, "The model %r does not exist" % model[:200], code="model_not_found",
                             param="model")
        self.sink.send(200, self.model_card(model))

    def model_card(self, model: str) -> dict:
        created = datetime.datetime.fromtimestamp(self.server.started, datetime.timezone.utc)
        return {"id": model, "object": "model", "created": self.server.started, "owned_by": "finstep",
                "type": "model", "display_name": model, "created_at": created.strftime("%Y-%m-%dT%H:%M:%SZ")}

    def answer(self, path: str) -> None:
        caller = self.authenticate()  # before the body: nothing is read or parsed for a refused caller
        wire = self.wire_format()
        request = wire.parse(self.read_body(), self.headers)
        cancellable = self.server.cancellable
        for handle in wire.cancels:
            cancellable.cancel(caller.id, handle)
        if isinstance(request, DirectAnswer):
            self.exchange.marks = request.marks
            if isinstance(request.payload, dict):
                self.sink.send(request.status, request.payload, dict(request.headers))
            else:
                content_type = (("Content-Type", request.content_type),) if request.content_type else ()
                self.sink.document(request.status, request.payload, content_type + request.headers)
            return
        if wire.handle is not None:
            cancellable.hold(caller.id, wire.handle, self)
        try:
            AnswerPipeline(self.server, self.exchange, self.sink, wire).run(request, caller)
        finally:
            if wire.handle is not None:
                cancellable.let_go(caller.id, wire.handle, self)

    def not_found(self, path: str) -> None:
        raise ProxyError(404, "Nothing at %s" % printable(path)[:200], code="unknown_url")


class Cancellable:
    """Requests in flight that their client may cancel from another request, by a handle its
    wire format gives (MCP's notifications/cancelled names a call by its id): per caller, so no
    caller can cancel another's, and in this process only."""

    def __init__(self):
        self.held = {}  # type: Dict[Tuple[str, str], object]  # (caller id, handle) -> its handler
        self.lock = threading.Lock()

    def hold(self, caller: str, handle: str, handler) -> None:
        with self.lock:
            self.held[(caller, handle)] = handler

    def let_go(self, caller: str, handle: str, handler) -> None:
        with self.lock:
            if self.held.get((caller, handle)) is handler:
                del self.held[(caller, handle)]

    def cancel(self, caller: str, handle: str) -> bool:
        """Interrupt the caller's request of that handle, if one is in flight."""
        with self.lock:
            handler = self.held.pop((caller, handle), None)
        if handler is None:
            return False  # done already, never begun, or on another replica: nothing to stop
        handler.interrupt("cancelled")
        return True


# --- The HTTP handler ---------------------------------------------------------------------

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")


EXPOSED_HEADERS = ("Access-Control-Expose-Headers",
                   "X-Request-Id, Retry-After, X-Finstep-Session, X-Finstep-Folded-Dropped, Mcp-Session-Id")
EXPOSED_FIELD = "%s: %s\r\nX-Request-Id: " % EXPOSED_HEADERS  # what every answer's head ends with


@dataclasses.dataclass(eq=False, repr=False)
class Exchange:
    """One request's state, from its request line to its log line. The handler owns it; the
    pipeline sets what it learns of the answer in its fields (session, key, conn, chunks ...)
    and answers through a ResponseSink; the watchdog reads it; the log line is built from its
    named fields."""
    request_id: str
    started: float  # when its request line came (monotonic)
    last_write: float  # when the client was last sent bytes: heartbeats fill the silences
    cors: Tuple[Tuple[str, str], ...] = ()  # the CORS headers of its answers
    route: Optional[Route] = None
    wire: Optional[WireFormat] = None  # the format that parses it and shapes its errors
    caller: Optional[Caller] = None  # once authenticated
    body: Optional[BodyReader] = None  # once its head is checked
    upstream: Optional[UpstreamCall] = None
    status: Optional[int] = None  # once its response head is sent
    stream_open: bool = False  # an event stream whose end has not been sent: heartbeats go to it
    chunked: Optional[bool] = None  # set when the event-stream head goes out
    head_held: bool = False  # the event-stream head waits for the first bytes of the body
    held: bytes = b""  # stream bytes written with `hold`: they leave with the next write (ResponseSink)
    interrupted: Optional[str] = None  # "client_gone", "cancelled" or "shutdown", from another thread
    dropped: Optional[str] = None  # why its connection was dropped before the request was in
    # What the log line says of its answer:
    session: Optional[str] = None  # how it reached its upstream session: new, continued, folded, explicit
    key: Optional[str] = None  # the upstream key, masked
    conn: Optional[str] = None  # the upstream connection: new, reused, retried
    cut: Optional[str] = None  # length or stop: the answer was ended short
    error: Optional[str] = None  # the code of the error it was answered with
    client_left: bool = False
    marks: Tuple[Tuple[str, str], ...] = ()  # what the wire format saw of the request: task=title, thinking=1/1
    folded_out: int = 0  # messages of the conversation its folded query had to leave out
    chunks: int = 0  # upstream answer events delivered

    @property
    def note(self) -> str:
        """The log line's tail: what is known of how the request was answered."""
        parts = [("session", self.session), ("key", self.key), ("conn", self.conn), ("cut", self.cut),
                 ("error", self.error), ("dropped", self.folded_out)] + list(self.marks)
        note = "".join(" %s=%s" % (name, value) for name, value in parts if value)
        if self.interrupted == "cancelled":
            return note + " cancelled"
        return note + " client left" if self.client_left else note


EVENT_STREAM_FIELDS = {chunked: b"Content-Type: text/event-stream; charset=utf-8\r\nCache-Control: no-cache\r\n"
                                b"X-Accel-Buffering: no\r\n" + (b"Transfer-Encoding: chunked\r\n" if chunked else b"")
                       for chunked in (True, False)}


class ResponseSink:
    """How a request is answered, for the pipeline and the handler alike: one JSON document
    (send), or an event stream (open, write, end: properly, or cut off). Writes to a stream
    hold a lock: the watchdog writes keep-alives to it too (heartbeat). The response head of
    a stream is held and leaves with its first body bytes, in one write; so do bytes written
    with `hold`, which the next write takes along, or flush() before the request waits."""

    def __init__(self, handler: "ProxyHandler"):
        self.handler = handler
        self.lock = threading.Lock()

    def send(self, status: int, payload: dict, headers: Optional[Mapping[str, str]] = None) -> None:
        """One JSON document."""
        self.document(status, json.dumps(payload, ensure_ascii=False).encode("utf-8"),
                      (("Content-Type", "application/json"),) + tuple((headers or {}).items()))

    def document(self, status: int, data: bytes, headers: Sequence[Tuple[str, str]]) -> None:
        """One whole body, its Content-Type among `headers`: the page, the metrics, a JSON document."""
        self.unwatch()  # a client that leaves once it has the answer is no news to wake for
        handler = self.handler
        handler.send_response(status)
        for name, value in headers:
            handler.send_header(name, value)
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        if handler.command != "HEAD":
            handler.wfile.write(data)

    def open(self, hold: bool = False) -> None:
        """Send the event-stream head, unless a heartbeat did, and the wire format's opening."""
        with self.lock:
            self.start_locked()
            self.write_locked(self.handler.exchange.wire.opening(), hold=hold)

    def write(self, data: bytes) -> None:
        with self.lock:
            self.write_locked(data)

    def write_rendered(self, render, events: List[Tuple[str, str]], hold: bool = False) -> None:
        """Render a batch of events and write it, under the lock the heartbeats take: a format
        whose keep-alives are numbered (MCP's progress) sends its numbers in order."""
        with self.lock:
            data = render(events)
            if data:
                self.write_locked(data, hold=hold)

    def flush(self) -> None:
        """Send what is held: the request is about to wait."""
        if self.handler.exchange.held:
            with self.lock:
                if self.handler.exchange.held:
                    self.write_locked(b"")

    def end(self, data: bytes, clean: bool = True) -> None:
        """Send the stream's last bytes and end it: properly, or cut off, which no client can
        take for a complete answer (the connection closes without the last chunk)."""
        self.unwatch()  # a client that leaves once it has the end is no news to wake for
        with self.lock:
            self.handler.exchange.stream_open = False
            if not clean:
                self.handler.close_connection = True
            self.write_locked(data, last=clean)

    def heartbeat(self) -> None:
        """The wire format's keep-alive (and the response head first, if it is still held);
        from the watchdog's thread, never while another write is under way."""
        if not self.lock.acquire(blocking=False):
            return  # a write is under way: the client is getting bytes anyway
        try:
            exchange = self.handler.exchange
            if exchange.stream_open and socket_ready(self.handler.connection, write=True):
                self.start_locked()
                self.write_locked(exchange.wire.heartbeat)
        except ClientGone:
            self.handler.interrupt("client_gone")
        finally:
            self.lock.release()

    def close_after(self) -> None:
        """Close the connection once this answer is out."""
        self.handler.close_connection = True

    def watch(self) -> None:
        """Let the watchdog see this request: its client leaving, its stream's silences."""
        self.handler.server.watchdog.watch(self.handler)

    def unwatch(self) -> None:
        """Stop watching for the client leaving (it may, once it has the end); the request
        stays active, for a drain to wait for, until its last bytes are out."""
        self.handler.server.watchdog.quiet(self.handler)

    def log(self, level: int, message: str, *args) -> None:
        self.handler.log(level, message, *args)

    @property
    def started(self) -> bool:
        return self.handler.exchange.chunked is not None

    def start_locked(self) -> None:
        """Send the event-stream response head, once."""
        handler, exchange = self.handler, self.handler.exchange
        if exchange.chunked is not None:
            return
        exchange.chunked = handler.request_version == "HTTP/1.1"
        handler.send_response(200)
        handler._headers_buffer.append(EVENT_STREAM_FIELDS[exchange.chunked])
        if not exchange.chunked:
            handler.close_connection = True  # the end of the body is the end of the connection
        exchange.head_held = True
        handler.end_headers()  # held: the head leaves with the first bytes of the body, in one write

    def write_locked(self, data: bytes, last: bool = False, hold: bool = False) -> None:
        """Send bytes to the client at once, as one HTTP chunk (and the final empty chunk), with
        what was held before them; or, with `hold`, keep them for the next write (which comes
        before the request waits for anything: the pipeline sees to it)."""
        handler, exchange = self.handler, self.handler.exchange
        if exchange.chunked:
            end = b"0\r\n\r\n" if last else b""
            data = b"%x\r\n%s\r\n%s" % (len(data), data, end) if data else end  # b"0\r\n" ends the body
        if exchange.head_held:
            exchange.head_held = False
            data = b"".join(handler._headers_buffer) + data
            handler._headers_buffer = []
        if exchange.held:
            data, exchange.held = exchange.held + data, b""
        if hold:
            exchange.held = data
            return
        try:
            handler.connection.sendall(data)  # what the unbuffered wfile does, without its layer
        except (ConnectionError, socket.timeout, TimeoutError, ValueError):
            raise ClientGone() from None
        exchange.last_write = time.monotonic()


class RequestReading:
    """Reading a request: its head, line by line within MAX_HEAD (HeadReader) and checked as a
    whole once, before anything answers it (100 Continue included); its body, by its
    framing, within the body budget (BodyReader)."""

    def read_head(self) -> bool:
        """Read the request line and headers; False when there is no request to serve."""
        exchange, reader = self.exchange, self.rfile
        try:
            # The whole head at once when it is all in the buffer, as it nearly always is.
            whole = split_head(reader.stream.peek(MAX_HEAD)) if not exchange.dropped else None
            if whole is None:
                self.raw_requestline, self.field_lines = reader.readline(MAX_HEAD + 1), None
            else:
                reader.stream.read(whole.size)
                self.raw_requestline, self.field_lines = whole.request_line, whole.field_lines
                reader.malformed = whole.malformed
            exchange.started = time.monotonic()  # timed from its request line, not the wait for it
            parsed = bool(self.raw_requestline) and not exchange.dropped and self.parse_request()
        except HeadTooLong:
            self.requestline = self.request_version = ""
            self.send_error(414, "Request line too long")
            return False
        if exchange.dropped:  # by its deadline, or to make room: what arrived is not a whole request
            self.close_connection = True
            if self.raw_requestline.strip() and exchange.status is None:
                self.send_error(408, "Request not complete: %s" % exchange.dropped)
            return False
        if not self.raw_requestline:
            self.close_connection = True
        return parsed

    def parse_request(self) -> bool:
        """The request line and header fields, read as http.server reads them (its checks
        and answers: 400, 505, 431), in one pass of our own instead of its email parser."""
        self.command, self.request_version = None, self.default_request_version
        self.close_connection = True
        self.requestline = requestline = str(self.raw_requestline, "iso-8859-1").rstrip("\r\n")
        words = requestline.split()
        if not words:
            return False
        if len(words) >= 3:
            version = words[-1]
            number = (1, 1) if version == "HTTP/1.1" else self.version_number(version)  # nearly always 1.1
            if number is None:
                self.send_error(400, "Bad request version (%r)" % version)
                return False
            if number >= (2, 0):
                self.send_error(505, "Invalid HTTP version (%s)" % version[5:])
                return False
            self.close_connection = number < (1, 1)
            self.request_version = version
        if not 2 <= len(words) <= 3:
            self.send_error(400, "Bad request syntax (%r)" % requestline)
            return False
        self.command, self.path = words[:2]
        if len(words) == 2:
            self.close_connection = True
            if self.command != "GET":
                self.send_error(400, "Bad HTTP/0.9 request type (%r)" % self.command)
                return False
        if self.path.startswith("//"):
            self.path = "/" + self.path.lstrip("/")  # not a network path to whatever reads it later
        try:
            if self.field_lines is None:
                self.headers = read_headers(self.rfile)
            else:  # found whole by split_head: checked already, unless malformed
                self.headers = fields_of(self.field_lines, checked=not self.rfile.malformed)
        except HeadTooLong:
            self.send_error(431, "Line too long")
            return False
        except OverflowError:
            self.send_error(431, "Too many headers")
            return False
        connection = self.headers.get("Connection", "").lower()
        if connection == "close":
            self.close_connection = True
        elif connection == "keep-alive":
            self.close_connection = False
        if self.exchange.dropped:
            return False
        if (self.headers.get("Expect", "").lower() == "100-continue" and self.request_version >= "HTTP/1.1"
                and not self.handle_expect_100()):
            return False
        try:
            self.check_head()
        except ProxyError as exc:
            self.fail(exc)
            return False
        return True

    @staticmethod
    def version_number(version: str) -> Optional[Tuple[int, int]]:
        """(major, minor) of an "HTTP/x.y" request version, as http.server reads it; None if it is none."""
        number = version[5:].split(".") if version.startswith("HTTP/") else ()
        if len(number) != 2 or not all(part.isascii() and part.isdigit() and len(part) <= 10 for part in number):
            return None
        return int(number[0]), int(number[1])

    def check_head(self) -> None:
        """Checks of the whole head, once, before anything answers it (100 Continue included)."""
        exchange = self.exchange
        if exchange.body is not None:
            return
        exchange.body = BodyReader((NO_BODY, 0), self.server.config.max_body, self.server.body_budget)
        given = self.headers.get("X-Request-Id", "").strip()
        if given and _REQUEST_ID.fullmatch(given):
            exchange.request_id = given
        if self.rfile.malformed or self.request_version == "HTTP/0.9":
            self.close_connection = True
            raise _invalid("Malformed header line" if self.rfile.malformed else "HTTP/0.9 is not supported", None)
        try:
            framing = request_framing(self.headers, self.request_version, self.server.config.max_body)
        except ProxyError:
            self.close_connection = True
            raise
        exchange.body.framing = framing
        kind, _ = framing
        if kind == NO_BODY:
            self.server.watchdog.set_deadline(self, None)  # the request is complete
        elif kind == CHUNKED and self.headers.get("Content-Length") is not None:
            self.close_connection = True  # a front proxy may have framed it by the length

    def read_body(self) -> bytes:
        body = self.exchange.body
        try:
            return body.read(self.rfile)
        finally:
            if not body.unfinished:
                self.server.watchdog.set_deadline(self, None)  # the request is complete

    def handle_expect_100(self) -> bool:
        # A request that would be refused gets its answer in place of "100 Continue", so the
        # client never sends the body: a bad head, page or key, an unknown path, no room for it.
        if self.exchange.dropped:
            return False
        try:
            self.check_head()
            self.check_browser()
            self.endpoint(self.route_path())
            if self.route().body:
                self.authenticate()
            self.exchange.body.reserve_declared()
        except ProxyError as exc:
            self.fail(exc)
            return False
        return super().handle_expect_100()


NOT_DATED = (0, "", b"")  # ProxyHandler.http_date before its first answer


class ProxyHandler(RequestReading, Routing, Endpoints, RequestLog, BaseHTTPRequestHandler):
    """One client connection, its requests one after another: each head read and checked,
    routed by the server's route table, refused by the browser policy or the key where it
    must be, and handed to its endpoint; failures answered in the route's wire format."""

    protocol_version = "HTTP/1.1"
    server_version = "custom_finstep/" + __version__
    sys_version = ""

    # (second, its Date value, the Server and Date fields as bytes): formatted once a second
    http_date = NOT_DATED

    def version_string(self) -> str:
        return self.server_version

    def date_time_string(self, timestamp: Optional[float] = None) -> str:
        if timestamp is not None:
            return super().date_time_string(timestamp)
        return self.dated()[1]

    def dated(self) -> Tuple[int, str, bytes]:
        now, kind = int(time.time()), type(self)
        dated = kind.__dict__.get("http_date", NOT_DATED)  # each class its own: a subclass has its Server
        if dated[0] != now:
            text = email.utils.formatdate(now, usegmt=True)
            dated = kind.http_date = (now, text, ("Server: %s\r\nDate: %s\r\n" % (
                self.version_string(), text)).encode("latin-1"))
        return dated

    def send_response(self, code: int, message: Optional[str] = None) -> None:
        """http.server's, with its Server and Date fields in one piece."""
        self.log_request(code)
        self.send_response_only(code, message)
        self._headers_buffer.append(self.dated()[2])

    def send_response_only(self, code: int, message: Optional[str] = None) -> None:
        if self.request_version == "HTTP/0.9":
            self.request_version = "HTTP/1.0"  # no HTTP/0.9 answers (a bare body): every answer has a status
        super().send_response_only(code, message)

    def setup(self) -> None:
        # The watchdog ends a request that is slow to arrive, at client_timeout; the socket's
        # own timeout is the backstop, and bounds a write to a client that stopped reading.
        super().setup()
        self.connection.settimeout(self.server.config.client_timeout + 1.0)
        self.sink = ResponseSink(self)
        # Each event is one small write: Nagle's algorithm would hold it until the client
        # acknowledged the previous one, 40 ms or more on a real network.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def handle(self) -> None:
        try:
            super().handle()
        except (ConnectionError, socket.timeout, TimeoutError) as exc:
            log.debug("connection from %s ended: %s", self.client_address[0], exc.__class__.__name__)

    def finish(self) -> None:
        self.server.watchdog.disconnect(self)  # before the socket closes and its number is reused
        super().finish()

    def handle_one_request(self) -> None:
        now = time.monotonic()
        self.exchange = exchange = Exchange(random_hex(8), now, now, self.server.browser.static_headers)
        self.command = self.path = None  # not known until the request line is read
        self.raw_requestline, self.requestline, self.request_version = b"", "", self.default_request_version
        watchdog, stream = self.server.watchdog, self.rfile
        # A request (head and body) must be in within client_timeout: slow senders are dropped.
        watchdog.set_deadline(self, now + self.server.config.client_timeout)
        try:
            self.rfile = HeadReader(stream)
            if self.read_head():
                self.rfile = stream
                method = getattr(self, "do_" + self.command, None)
                if method is None:
                    self.send_error(501, "Unsupported method (%r)" % self.command[:20])
                else:
                    method()
                self.wfile.flush()
        except (socket.timeout, TimeoutError):  # the backstop: the watchdog is normally first
            self.close_connection = True
        finally:
            self.rfile = stream
            watchdog.forget(self)
            if exchange.body is not None:
                exchange.body.release()
            if exchange.status is not None:
                self.log_summary()
            elif exchange.dropped:
                self.log_drop()

    # -- called by the watchdog, from its thread

    def heartbeat(self) -> None:
        self.sink.heartbeat()

    def interrupt(self, reason: str) -> None:
        """End this request from another thread, for `reason` ("client_gone", "cancelled" or "shutdown"):
        shutting its upstream socket wakes the handler thread, which then stops."""
        exchange = self.exchange
        if exchange.interrupted is None:  # the first reason stands: a cancelled call whose client then leaves
            exchange.interrupted = reason
        upstream = exchange.upstream
        if upstream is not None:
            upstream.abort()

    def drop(self, reason: str) -> None:
        """End a connection whose request has not come in, by its deadline or to make room for
        a new connection: shutting its reading side wakes the handler thread, which answers 408
        if part of a request had arrived and closes the connection."""
        self.exchange.dropped = reason
        if isinstance(self.rfile, HeadReader):
            self.rfile.cut = True
        try:
            self.connection.shutdown(socket.SHUT_RD)
        except OSError:
            pass

    # -- answering

    def end_headers(self) -> None:
        """The fields every answer carries, in one piece, then the head's end."""
        exchange = self.exchange
        fields = "".join(["%s: %s\r\n" % field for field in exchange.cors]) if exchange.cors else ""
        fields += EXPOSED_FIELD + exchange.request_id + "\r\n"
        if exchange.session:
            fields += "X-Finstep-Session: %s\r\n" % exchange.session
        if exchange.folded_out:  # FINSTEP_MAX_QUERY left messages out: the client must be able to know
            fields += "X-Finstep-Folded-Dropped: %d\r\n" % exchange.folded_out
        body = exchange.body
        if self.close_connection or (body is not None and body.unfinished):  # an unread body cannot be skipped
            self.close_connection = True  # and http.server closes after the response
            fields += "Connection: close\r\n"
        self._headers_buffer.append(fields.encode("latin-1", "strict") + b"\r\n")
        self.flush_headers()

    def flush_headers(self) -> None:
        if not self.exchange.head_held:
            super().flush_headers()

    def fail(self, error: ProxyError) -> None:
        """Answer a failure: a JSON error before the stream began, the wire format's failure after."""
        exchange = self.exchange
        exchange.error = error.code or error.type
        wire = self.wire_format()
        error.message = self.server.log_filter.hide(error.message, exchange.upstream.key if exchange.upstream else None)
        with self.sink.lock:
            exchange.stream_open = False
            if not self.sink.started:
                self.sink.send(wire.error_status(error), wire.error_body(error), error.headers)
                return
        self.log(logging.WARNING, "%s stream failed after start: %s", self.client_address[0], error.message)
        self.sink.end(wire.failure(error), clean=wire.ends_cleanly_after_failure)

    def send_error(self, code: int, message: Optional[str] = None, explain: Optional[str] = None) -> None:
        """http.server's own failures (bad request line, oversized headers, ...) as JSON errors."""
        self.close_connection = True
        try:
            self.sink.send(code, ProxyError(code, message or status_phrase(code)).body())
        except (ConnectionError, socket.timeout, TimeoutError):
            pass


# --- The server ---------------------------------------------------------------------------

class ProxyServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024  # a burst of connections waits in the kernel instead of retrying SYNs
    idle_acceptors = 16  # threads kept waiting for connections between bursts

    def __init__(self, config: Config, handler=ProxyHandler):
        self.config = config
        self.started = int(time.time())
        connector = self.upstream_connector = UpstreamConnector(config.upstream_url.lower().startswith("https:"))
        self.upstream_pool = UpstreamPool(config.upstream_idle)
        target = self.upstream_target = upstream_target(config.upstream_url, urllib.request.getproxies())
        if target is None:
            log.warning("the upstream is reached through a proxy of another scheme than its own, which is "
                        "not supported: every request will fail")
        elif config.prewarm:
            self.upstream_pool.keep_warm(target.route, functools.partial(connector.connect, target.route,
                                                                         config.connect_timeout))
        self.sessions = SessionStore(config.session_cache, config.session_ttl, config.session_memory)
        self.key_pool = KeyPool(config.api_keys) if config.api_keys else None
        self.redis = None  # type: Optional[RedisClient]
        if config.redis_url:
            self.redis = RedisClient(parse_redis_url(config.redis_url), config.redis_timeout,
                                     redis_reply_limit(config.max_query))
            self.sessions = SharedStore(self.redis, self.sessions, config.redis_prefix)
            if self.key_pool is not None:
                SharedCooldowns(self.redis, self.key_pool, config.redis_prefix)
        self.signer = ThinkingSigner(functools.partial(signing_secret, config, self.redis))
        self.metrics = Metrics()
        self.browser = BrowserPolicy(config)
        self.routes = build_routes(config)
        self.deployment = deployment_caller(config)
        self.body_budget = MemoryBudget(config.body_budget)
        self.cancellable = Cancellable()
        self.log_filter = KeyFilter(config.api_keys + config.proxy_keys + ((config.signing_key,)
                                                                          if config.signing_key else ()))
        log.addFilter(self.log_filter)
        self.draining = False
        self.connections = 0
        self.acceptors = 0  # threads waiting in accept(), or about to
        self.connections_lock = threading.Lock()
        self.stopping, self.stopped = threading.Event(), threading.Event()
        if ":" in config.host:
            self.address_family = socket.AF_INET6
        super().__init__((config.host, config.port), handler)
        self.watchdog = Watchdog(config.heartbeat, config.client_timeout)

    @property
    def ssl_context(self) -> Optional[ssl.SSLContext]:
        """The upstream's TLS context, once loaded; None for an http upstream."""
        return self.upstream_connector.context

    @ssl_context.setter
    def ssl_context(self, context: ssl.SSLContext) -> None:
        self.upstream_connector.context = context

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host's FQDN, a DNS lookup that can stall start-up.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        """Serve until shutdown(). Connections are accepted by the threads that serve them
        (leader/follower): a thread waits in accept(), and once it has a connection another
        takes its place, one kept from earlier connections or, in a burst, a new one. No
        thread hands connections over and, between bursts, none is started for one."""
        self.stopped.clear()
        try:
            if not self.stopping.is_set():
                if self.add_acceptor():
                    self.stopping.wait()
                else:  # not even one: this thread accepts, until shutdown
                    with self.connections_lock:
                        self.acceptors += 1
                    self.accept_connections(keep=True)
        finally:
            self.stopped.set()

    def shutdown(self) -> None:
        self.stopping.set()
        try:
            self.socket.shutdown(socket.SHUT_RDWR)  # wakes every thread waiting in accept()
        except OSError:
            pass
        self.stopped.wait()

    def add_acceptor(self) -> bool:
        """Start a thread waiting for connections; False when none can start (out of threads or
        memory): the threads there are go on accepting, one connection at a time each."""
        with self.connections_lock:
            self.acceptors += 1
        try:
            threading.Thread(target=self.accept_connections, name="connection:%d" % self.server_address[1],
                             daemon=True).start()
        except RuntimeError as exc:
            with self.connections_lock:
                self.acceptors -= 1
            log.error("cannot start a thread for connections: %s", exc)
            return False
        return True

    def accept_connections(self, keep: bool = False) -> None:
        """A thread's life: accept a connection, make sure another thread waits for the next,
        serve this one; again, unless enough threads wait already (or it must `keep` going)."""
        while True:
            try:
                request, client_address = self.get_request()
            except OSError as exc:
                if self.stopping.is_set():
                    with self.connections_lock:
                        self.acceptors -= 1
                    return
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    time.sleep(0.1)  # out of descriptors or memory: the backlog waits, nothing spins
                continue
            with self.connections_lock:
                self.acceptors -= 1
                alone = self.acceptors == 0
            if alone and not self.stopping.is_set():
                self.add_acceptor()
            self.process_request(request, client_address)
            with self.connections_lock:
                if self.stopping.is_set() or (self.acceptors >= self.idle_acceptors and not keep):
                    return
                self.acceptors += 1

    def process_request(self, request, client_address) -> None:
        # Each connection costs a thread, so there is a limit. At the limit, the connection
        # that has waited longest without a complete request (a slow head, an idle keep-alive)
        # makes room, as nginx reuses idle connections: slow senders cannot keep others out.
        # Only when every connection has a request in progress is a new one refused.
        with self.connections_lock:
            admitted = self.connections < self.config.connection_limit or self.watchdog.make_room()
            self.connections += admitted
        if admitted:
            try:
                self.finish_request(request, client_address)
            except Exception:
                self.handle_error(request, client_address)
            finally:
                self.shutdown_request(request)
                with self.connections_lock:
                    self.connections -= 1
            return
        body = json.dumps(ProxyError(503, "Too many open connections; retry shortly",
                                     code="server_busy").body()).encode("utf-8")
        cors = "".join("%s: %s\r\n" % header for header in self.browser.static_headers + (EXPOSED_HEADERS,))
        cors = cors.encode("ascii")
        try:
            request.settimeout(1.0)
            request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                            b"Retry-After: 1\r\n%sConnection: close\r\nContent-Length: %d\r\n\r\n%s"
                            % (cors, len(body), body))
        except OSError:
            pass
        self.shutdown_request(request)

    def status(self) -> dict:
        """What GET /status shows: no key in clear, nothing a client sent."""
        config = self.config
        requests, outcomes, in_flight = self.metrics.summary()
        pool = self.upstream_pool
        return {"version": __version__, "uptime_seconds": int(time.time()) - self.started,
                "upstream": urllib.parse.urlsplit(config.upstream_url).hostname, "demo": config.demo,
                "reasoning": config.reasoning, "sessions": config.sessions, "system": config.system,
                "streams_in_flight": in_flight, "max_streams": config.max_streams,
                "requests": requests, "upstream_results": outcomes,
                "upstream_connections": {"idle": len(pool), "reused": pool.requests["true"],
                                         "new": pool.requests["false"]},
                "keys": [{"key": mask_key(key), "cooling_down_seconds": round(seconds, 1)}
                         for key, seconds in (self.key_pool.cooling() if self.key_pool else [])],
                "key_source": "configured" if config.api_keys else "each client"}

    def begin_stream(self) -> bool:
        """Take one of the FINSTEP_MAX_STREAMS upstream slots, if one is free."""
        with self.metrics.lock:
            if self.metrics.in_flight >= self.config.max_streams:
                return False
            self.metrics.in_flight += 1
            # Under the same lock: the pool hears the counts in the order they happened.
            self.upstream_pool.demand(self.metrics.in_flight)
            return True

    def end_stream(self) -> None:
        with self.metrics.lock:
            self.metrics.in_flight -= 1
            self.upstream_pool.demand(self.metrics.in_flight)

    def drain(self, seconds: float) -> None:
        """Let requests in flight finish for up to `seconds`, then end the rest with an error."""
        self.draining = True
        self.wait_until_idle(seconds)
        left = list(self.watchdog.active)
        for handler in left:
            handler.interrupt("shutdown")
        self.wait_until_idle(1.0)  # time for the error events to go out
        if left:
            log.warning("closed %d request(s) still in progress after %gs", len(left), seconds)

    def wait_until_idle(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while self.watchdog.active and time.monotonic() < deadline:
            time.sleep(0.01)

    def server_close(self) -> None:
        super().server_close()
        self.watchdog.stop()
        self.upstream_pool.close()
        if self.redis is not None:
            self.redis.close()
        log.removeFilter(self.log_filter)

    def handle_error(self, request, client_address) -> None:
        log.exception("unexpected error serving %s", client_address[0])


# --- Demo upstream: a stand-in for Finstep, for --demo ------------------------------------

class DemoUpstreamHandler(BaseHTTPRequestHandler):
    """Streams a short scripted Finstep answer the way Finstep does: one `data:` line per event."""
    protocol_version = "HTTP/1.1"
    delay = 0.04

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
        query = str(body.get("query", ""))[:100]
        events = [{"status": "THINKING"}, {"status": "ORGANIZING"}, {"status": "MSG_START"}]
        for piece in ("嗯，", "用户问的是「%s」。" % query, "这是演示模式，", "我来给一个示例回答。"):
            events.append({"status": "RESPONSING", "type": "deepthink", "text": piece})
        for piece in ("这是", " custom_finstep ", "演示模式的回答。", "你的问题是：", query, "。",
                      "配置 FINSTEP_API_KEY 后即可连接真实的 Finstep。"):
            events.append({"status": "RESPONSING", "type": "text", "text": piece})
        events += [{"status": "MSG_DONE"}, {"status": "DONE"}]
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream;charset=UTF-8")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            for event in events:
                time.sleep(self.delay)
                line = ("data:" + json.dumps(event, ensure_ascii=False) + "\n").encode("utf-8")
                self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
            self.wfile.write(b"0\r\n\r\n")
        except (ConnectionError, socket.timeout, TimeoutError):
            self.close_connection = True  # the proxy hung up: its client left, or it stopped

    def log_message(self, format: str, *args) -> None:
        log.debug("demo upstream: " + format, *args)


def start_demo_upstream() -> ThreadingHTTPServer:
    server = ThreadingHTTPServer(("127.0.0.1", 0), DemoUpstreamHandler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="demo-upstream", daemon=True).start()
    return server


# --- Main ---------------------------------------------------------------------------------

IMPORTED_AT = time.time()


def compiled_at_start() -> bool:
    """Whether this process compiled this file, rather than loading the bytecode an earlier
    start cached (a .pyc file that matches the source and is older than this process)."""
    try:
        with open(__spec__.cached, "rb") as cached:
            header = cached.read(16)
        source, written = os.stat(__spec__.origin), os.stat(__spec__.cached).st_mtime
    except (AttributeError, TypeError, OSError):
        return True  # a script, or no bytecode cache
    import importlib.util
    flags, mtime, size = (int.from_bytes(header[at:at + 4], "little") for at in (4, 8, 12))
    matches = header[:4] == importlib.util.MAGIC_NUMBER and (flags != 0 or (
        mtime == int(source.st_mtime) & 0xFFFFFFFF and size == source.st_size & 0xFFFFFFFF))
    return not matches or written >= IMPORTED_AT - 1


def release_freed_memory() -> None:
    """Hand back to the system the memory that start-up used and freed, when this start
    compiled the file: compiling frees some 3 MB that glibc's allocator would otherwise keep
    for the life of the process. ctypes is imported here, not above: it costs 0.25 MB, worth
    it only then, and some builds lack it. Without glibc (musl, macOS, Windows) nothing happens."""
    if not compiled_at_start():
        return
    try:
        import ctypes
        ctypes.CDLL(None).malloc_trim(0)
    except (ImportError, OSError, AttributeError, TypeError):
        pass


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        config = load_config(os.environ, sys.argv[1:] if argv is None else argv)
    except ConfigError as exc:
        print("custom_finstep: error: %s" % exc, file=sys.stderr)
        return 2
    except SystemExit as exc:  # argparse: --help, --version, an unknown flag
        return exc.code if isinstance(exc.code, int) else 2
    configure_logging(config)
    # Stop signals are caught before the port opens, so one that comes as it opens stops the
    # proxy cleanly. The handler takes no lock: it runs in the main thread between two of its
    # steps, and setting an Event there deadlocked when the signal came while wait() held that
    # Event's own lock. The interpreter writes each signal's number to `wake_writer` at once,
    # which ends the wait.
    stopping = []  # the signals received
    wake_reader, wake_writer = socket.socketpair()
    wake_reader.setblocking(False)
    wake_writer.setblocking(False)

    def on_signal(signum, frame) -> None:
        if stopping:
            os._exit(0)  # a second signal: the operator wants out now
        stopping.append(signum)

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, on_signal)
    signal.set_wakeup_fd(wake_writer.fileno())
    if config.demo:
        demo = start_demo_upstream()
        config = dataclasses.replace(config, api_keys=config.api_keys or ("demo-key",),
                                     upstream_url="http://127.0.0.1:%d/demo" % demo.server_address[1])
    try:
        server = ProxyServer(config)
    except OSError as exc:
        log.error("cannot listen on %s:%d: %s", config.host, config.port, exc)
        return 1
    worker = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, name="server")
    worker.start()
    log.info("custom_finstep %s listening on http://%s:%d%s, upstream %s, key %s, reasoning=%s, sessions=%s",
             __version__, config.host, server.server_address[1], " (demo)" if config.demo else "",
             config.upstream_url, ", ".join(map(mask_key, config.api_keys)) or "from each client",
             config.reasoning, config.sessions)
    browser = server.browser
    log.log(logging.WARNING if browser.guarded and browser.any_origin else logging.INFO,
            "web pages: %s", browser.describe())
    loopback = loopback_name(host_of(config.host))
    if config.api_keys and not config.proxy_keys and not loopback and not config.demo:
        log.warning("listening on %s with FINSTEP_API_KEY and no PROXY_API_KEY: anyone who reaches this "
                    "port spends your Finstep key; set PROXY_API_KEY", config.host)
    release_freed_memory()
    while not stopping:
        select.select([wake_reader], [], [], 1.0)
        try:
            wake_reader.recv(64)
        except (BlockingIOError, InterruptedError):
            pass
    signal.set_wakeup_fd(-1)
    wake_reader.close()
    wake_writer.close()
    log.info("stopping: requests in flight have %gs to finish", config.drain_seconds)
    server.shutdown()
    server.socket.close()  # refuse new connections while draining
    server.drain(config.drain_seconds)
    server.server_close()
    worker.join()
    return 0


# --- The page at /: try the proxy in a browser, see how it is doing -----------------------
#
# One document, no external asset: the chat goes through the proxy's own chat completions,
# the status comes from GET /status. The Content-Security-Policy allows exactly this style
# and this script (by their hashes) and requests to the proxy itself.

PAGE_STYLE = r"""
:root{--fg:#1d2430;--muted:#6b7685;--line:#dde3ea;--bg:#f6f8fa;--accent:#1f6feb;--bad:#c62828}
*{box-sizing:border-box}
body{margin:0;font:15px/1.6 -apple-system,"Segoe UI","PingFang SC","Microsoft YaHei",sans-serif;color:var(--fg);background:var(--bg)}
header{display:flex;align-items:center;gap:12px;padding:10px 16px;background:#fff;border-bottom:1px solid var(--line)}
header h1{font-size:17px;margin:0}
#version{color:var(--muted);font-size:13px;flex:1}
button{font:inherit;padding:6px 14px;border:1px solid var(--line);border-radius:6px;background:#fff;cursor:pointer}
button[type=submit]{background:var(--accent);border-color:var(--accent);color:#fff}
button:disabled{opacity:.45;cursor:default}
main{display:grid;grid-template-columns:minmax(0,1fr) 300px;gap:16px;max-width:1180px;margin:0 auto;padding:16px}
section{background:#fff;border:1px solid var(--line);border-radius:8px;padding:14px}
#log{min-height:240px}
.turn{margin:0 0 14px}
.turn.user{margin-left:auto;width:fit-content;max-width:85%;background:#e8f0fe;border-radius:8px;padding:8px 12px;white-space:pre-wrap}
.turn.assistant .answer{overflow-x:auto}
details{margin:0 0 6px;color:var(--muted);font-size:14px}
.thinking{white-space:pre-wrap;border-left:3px solid var(--line);padding-left:10px}
.meta{color:var(--muted);font-size:12px}
.wait{color:var(--muted)}
.error{color:var(--bad);font-size:14px}
textarea,input{width:100%;font:inherit;padding:8px;border:1px solid var(--line);border-radius:6px}
.row{display:flex;gap:8px;margin-top:8px}
table{border-collapse:collapse;margin:6px 0}
th,td{border:1px solid var(--line);padding:4px 8px;text-align:left}
pre{background:var(--bg);padding:8px;overflow-x:auto}
code{background:var(--bg);padding:0 3px}
h2{font-size:16px;margin:0 0 8px}
h3{font-size:14px;margin:12px 0 4px}
dl{display:grid;grid-template-columns:auto 1fr;gap:2px 10px;margin:0;font-size:14px}
dt{color:var(--muted)}
dd{margin:0;word-break:break-word}
#keys{margin:0;padding-left:18px;font-size:14px}
.cool{color:var(--bad)}
@media (max-width:760px){main{grid-template-columns:1fr;padding:8px}}
"""


PAGE_SCRIPT = r"""
"use strict";
const T = {
  zh: {send: "发送", stop: "停止", clear: "新对话", ask: "问 Finstep 一个问题，例如：分析一下药明康德最近会涨么",
       status: "状态", keys: "上游 Key", reasoning: "思考过程", waiting: "思考中…", session: "会话",
       cut: "回答没有正常结束（传输中断）", stopped: "已停止", error: "出错", keyLabel: "这个代理需要 Key（PROXY_API_KEY），只保存在本标签页：",
       save: "保存", version: "版本", uptime: "运行时间", upstream: "上游", modes: "模式", streams: "进行中的流",
       requests: "请求", results: "上游结果", connections: "上游连接", ready: "可用", cooling: "冷却中，剩余",
       clients: "使用每个客户端自己的 Key", idle: "空闲", reused: "复用", fresh: "新建"},
  en: {send: "Send", stop: "Stop", clear: "New chat", ask: "Ask Finstep something, e.g. how is WuXi AppTec likely to move?",
       status: "Status", keys: "Upstream keys", reasoning: "Reasoning", waiting: "Thinking…", session: "session",
       cut: "the answer did not end properly (transfer cut)", stopped: "stopped", error: "Error",
       keyLabel: "This proxy needs a key (PROXY_API_KEY), kept in this tab only:", save: "Save", version: "Version",
       uptime: "Uptime", upstream: "Upstream", modes: "Modes", streams: "Streams in flight", requests: "Requests",
       results: "Upstream results", connections: "Upstream connections", ready: "ready", cooling: "cooling down,",
       clients: "each client's own key", idle: "idle", reused: "reused", fresh: "new"}
};
let lang = "zh", history = [], controller = null, status = null;
let key = sessionStorage.getItem("finstep-key") || "";
const $ = (id) => document.getElementById(id);
const t = (name) => T[lang][name];

// Markdown. Every character of the text is escaped first; the rules below only wrap parts of
// the escaped text in the tags they name, so the upstream can never add a tag or attribute.
function escapeHtml(text) {
  return text.replace(/[&<>"']/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"})[c]);
}
function inline(text) {
  return text.replace(/`([^`]+)`/g, "<code>$1</code>").replace(/\*\*([^*]+)\*\*/g, "<strong>$1</strong>");
}
const LIST = /^\s*([-*+]|\d+[.)])\s+(.*)$/, ROW = /^\s*\|.*\|\s*$/, RULE = /^\s*\|?[\s:|-]*-[\s:|-]*\|?\s*$/;
const cells = (line) => line.trim().replace(/^\||\|$/g, "").split("|").map((cell) => inline(cell.trim()));
function markdown(text) {
  const lines = escapeHtml(text).split("\n"), out = [];
  for (let i = 0; i < lines.length;) {
    const line = lines[i];
    let m;
    if (/^```/.test(line)) {
      const code = [];
      for (i++; i < lines.length && !/^```/.test(lines[i]); i++) code.push(lines[i]);
      i++;
      out.push("<pre><code>" + code.join("\n") + "</code></pre>");
    } else if ((m = /^(#{1,6})\s+(.*)$/.exec(line))) {
      const level = Math.min(6, m[1].length + 2);
      out.push("<h" + level + ">" + inline(m[2]) + "</h" + level + ">");
      i++;
    } else if (ROW.test(line) && i + 1 < lines.length && RULE.test(lines[i + 1])) {
      const head = cells(line), rows = [];
      for (i += 2; i < lines.length && ROW.test(lines[i]); i++) rows.push(cells(lines[i]));
      out.push("<table><thead><tr>" + head.map((c) => "<th>" + c + "</th>").join("") + "</tr></thead><tbody>"
               + rows.map((r) => "<tr>" + r.map((c) => "<td>" + c + "</td>").join("") + "</tr>").join("")
               + "</tbody></table>");
    } else if ((m = LIST.exec(line))) {
      const ordered = /\d/.test(m[1]), items = [];
      for (; i < lines.length && (m = LIST.exec(lines[i])) && /\d/.test(m[1]) === ordered; i++) {
        items.push("<li>" + inline(m[2]) + "</li>");
      }
      out.push((ordered ? "<ol>" : "<ul>") + items.join("") + (ordered ? "</ol>" : "</ul>"));
    } else if (!line.trim()) {
      i++;
    } else {
      const paragraph = [inline(line)];
      for (i++; i < lines.length && lines[i].trim() && !/^(```|#{1,6}\s)/.test(lines[i])
           && !LIST.test(lines[i]) && !ROW.test(lines[i]); i++) paragraph.push(inline(lines[i]));
      out.push("<p>" + paragraph.join("<br>") + "</p>");
    }
  }
  return out.join("");
}

function headers() {
  const h = {"Content-Type": "application/json"};
  if (key) h.Authorization = "Bearer " + key;
  return h;
}
function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}
function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
}
function askForKey() {
  $("keyform").hidden = false;
  $("key").focus();
}

async function ask(question) {
  history.push({role: "user", content: question});
  $("log").append(element("div", "turn user", question));
  const turn = element("div", "turn assistant"), details = element("details"), thinking = element("div", "thinking");
  const answer = element("div", "answer"), meta = element("div", "meta");
  details.append(element("summary", "", t("reasoning")), thinking);
  details.open = true;
  details.hidden = true;
  answer.append(element("span", "wait", t("waiting")));
  turn.append(details, answer, meta);
  $("log").append(turn);
  controller = new AbortController();
  setBusy(true);
  let text = "", reasoning = "", ended = false;
  try {
    const response = await fetch("/v1/chat/completions", {method: "POST", headers: headers(), signal: controller.signal,
      body: JSON.stringify({model: "finstep-proxy", stream: true, messages: history})});
    meta.textContent = t("session") + ": " + (response.headers.get("X-Finstep-Session") || "-");
    if (!response.ok) {
      const body = await response.json().catch(() => ({}));
      if (response.status === 401) askForKey();
      throw new Error((body.error && body.error.message) || "HTTP " + response.status);
    }
    const reader = response.body.getReader(), decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, {stream: true});
      const events = buffer.split("\n\n");
      buffer = events.pop();
      for (const event of events) {
        const data = event.split("\n").filter((l) => l.startsWith("data: ")).map((l) => l.slice(6)).join("\n");
        if (!data) continue;
        if (data === "[DONE]") { ended = true; continue; }
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        const delta = ((chunk.choices || [])[0] || {}).delta || {};
        if (delta.reasoning_content) {
          reasoning += delta.reasoning_content;
          details.hidden = false;
          thinking.textContent = reasoning;
        }
        if (delta.content) {
          text += delta.content;
          answer.innerHTML = markdown(text);
          details.open = false;
        }
      }
    }
    if (!ended) throw new Error(t("cut"));
    history.push({role: "assistant", content: text});
  } catch (error) {
    if (!text) answer.textContent = "";
    turn.append(element("div", "error", error.name === "AbortError" ? t("stopped") : t("error") + ": " + error.message));
    history.pop();  // unanswered: the question leaves the history the next turn sends
  } finally {
    controller = null;
    setBusy(false);
  }
}

function duration(seconds) {
  const d = Math.floor(seconds / 86400), h = Math.floor(seconds % 86400 / 3600), m = Math.floor(seconds % 3600 / 60);
  return (d ? d + "d " : "") + (d || h ? h + "h " : "") + m + "m " + seconds % 60 + "s";
}
const counts = (object) => Object.entries(object).filter(([, n]) => n).map(([k, n]) => k + " " + n).join(", ") || "0";
function renderStatus() {
  if (!status) return;
  const s = status, c = s.upstream_connections;
  $("version").textContent = "v" + s.version;
  const rows = [[t("version"), s.version], [t("uptime"), duration(s.uptime_seconds)],
    [t("upstream"), s.upstream + (s.demo ? " (demo)" : "")],
    [t("modes"), "reasoning=" + s.reasoning + " · sessions=" + s.sessions + " · system=" + s.system],
    [t("streams"), s.streams_in_flight + " / " + s.max_streams], [t("requests"), counts(s.requests)],
    [t("results"), counts(s.upstream_results)],
    [t("connections"), t("idle") + " " + c.idle + " · " + t("reused") + " " + c.reused + " · " + t("fresh") + " " + c.new]];
  $("facts").replaceChildren(...rows.flatMap(([name, value]) => [element("dt", "", name), element("dd", "", String(value))]));
  const keys = s.keys.map((k) => k.cooling_down_seconds > 0
    ? element("li", "cool", k.key + " — " + t("cooling") + " " + Math.ceil(k.cooling_down_seconds) + "s")
    : element("li", "", k.key + " — " + t("ready")));
  $("keys").replaceChildren(...(keys.length ? keys : [element("li", "", t("clients"))]));
}
async function refresh() {
  try {
    const response = await fetch("/status", {headers: headers()});
    if (response.status === 401) return askForKey();
    status = await response.json();
    renderStatus();
  } catch (error) { /* the proxy is restarting: the next refresh tells */ }
}
function applyLanguage() {
  document.documentElement.lang = lang === "zh" ? "zh-CN" : "en";
  document.querySelectorAll("[data-t]").forEach((node) => { node.textContent = t(node.dataset.t); });
  $("question").placeholder = t("ask");
  $("lang").textContent = lang === "zh" ? "English" : "中文";
  renderStatus();
}

$("ask").addEventListener("submit", (event) => {
  event.preventDefault();
  const question = $("question").value.trim();
  if (!question || controller) return;
  $("question").value = "";
  ask(question);
});
$("question").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    $("ask").requestSubmit();
  }
});
$("stop").addEventListener("click", () => controller && controller.abort());
$("clear").addEventListener("click", () => { if (!controller) { history = []; $("log").replaceChildren(); } });
$("lang").addEventListener("click", () => { lang = lang === "zh" ? "en" : "zh"; applyLanguage(); });
$("keyform").addEventListener("submit", (event) => {
  event.preventDefault();
  key = $("key").value.trim();
  sessionStorage.setItem("finstep-key", key);
  $("keyform").hidden = true;
  refresh();
});
applyLanguage();
refresh();
setInterval(refresh, 3000);
"""


PAGE_BODY = """
<header><h1>custom_finstep</h1><span id="version"></span><button id="lang" type="button">English</button></header>
<main>
<section id="chat">
<div id="log"></div>
<form id="ask"><textarea id="question" rows="3"></textarea>
<div class="row"><button id="send" type="submit" data-t="send"></button><button id="stop" type="button" data-t="stop" disabled></button><button id="clear" type="button" data-t="clear"></button></div></form>
<form id="keyform" hidden><p data-t="keyLabel"></p><input id="key" type="password" autocomplete="off"><div class="row"><button type="submit" data-t="save"></button></div></form>
</section>
<section id="status"><h2 data-t="status"></h2><dl id="facts"></dl><h3 data-t="keys"></h3><ul id="keys"></ul></section>
</main>
"""


def csp_hash(text: str) -> str:
    return "'sha256-%s'" % base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii")


PAGE = ('<!doctype html>\n<html lang="zh-CN">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n<title>custom_finstep</title>\n'
        "<style>%s</style>\n</head>\n<body>%s<script>%s</script>\n</body>\n</html>\n"
        % (PAGE_STYLE, PAGE_BODY, PAGE_SCRIPT)).encode("utf-8")  # as it is sent, once


PAGE_HEADERS = (
    ("Content-Type", "text/html; charset=utf-8"),
    ("Content-Security-Policy", "default-src 'none'; script-src %s; style-src %s; connect-src 'self'; "
                                "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
     % (csp_hash(PAGE_SCRIPT), csp_hash(PAGE_STYLE))),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    ("Cache-Control", "no-cache"),
)
del PAGE_STYLE, PAGE_SCRIPT, PAGE_BODY  # in PAGE and its hashes now: a server keeps the page once, as bytes


if __name__ == "__main__":
    sys.exit(main())
