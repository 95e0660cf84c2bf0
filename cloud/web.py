"""The cloud's web pages and ``/metrics``: Starlette + Jinja2 templates, served by uvicorn.

Read-only: every page reads the cloud store through a read-only SQLite connection (one per
worker thread), so it never holds a lock ingest waits for. Pages (server-rendered HTML,
no JavaScript framework; the device chart is inline SVG):

    GET  /                              fleet: state, line, groups, model, backlog, last seen,
                                        pass rate in the last hour, drift; ?group= ?state=
                                        ?sort= ?desc=1 ?page= (``web.page_size`` devices a page)
    GET  /devices/{id}                  pass/fail per minute (chart), recent results, last
                                        failed parts' pictures, events and gaps, OTA history
    GET  /devices/{id}/samples/{seq}.jpg   a stored sample picture
    GET  /models                        registered models (model card pictures) and rollouts
    GET  /models/{version}/{name}.png   a picture from the model's report (confusion, roc, pr, scores)
    GET  /rollouts/{id}                 one rollout: canaries, per-device states, halts
    GET  /api/fleet                     the fleet page's rows as JSON (every device)
    GET  /metrics                       Prometheus text format (cloud/web_metrics.py)
    GET  /healthz                       "ok", no token needed (load balancers)
    GET|POST /login, GET /logout        the login form: sets an HttpOnly cookie

Access: every path but /login and /healthz needs the token, as ``Authorization: Bearer
<token>`` (Prometheus, scripts) or the login form's cookie (browsers). The cookie holds a
hash of the token, never the token. Nothing here reads the signing key, and the config
shown nowhere: pages show store rows only.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import math
import re
import socket
import sqlite3
import tarfile
import threading
import time
import urllib.parse
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import (
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
)
from starlette.routing import Route

from cloud.config import CloudConfig
from cloud.exceptions import CloudConfigError
from cloud.store import DEVICE_STATES, device_state
from cloud.web_metrics import metrics_registry, render_metrics

logger = logging.getLogger(__name__)

COOKIE = "linewatch_session"
TEMPLATES = Path(__file__).with_name("templates")
REPORT_PICTURES = ("confusion", "roc", "pr", "scores")
SORT_KEYS = ("device_id", "state", "line", "model_version", "backlog", "last_seen", "pass_rate", "results", "drift")
_DEVICE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
CHART_MINUTES = 60


def session_value(token: str) -> str:
    """What the login cookie holds: a hash of the token, so the cookie never carries the token."""
    return hashlib.sha256(b"linewatch-web-session:" + token.encode()).hexdigest()


# -- reading the store -----------------------------------------------------------------------------


class StoreReader:
    """Read-only queries for the pages; one SQLite connection per thread, opened on first use."""

    def __init__(self, config: CloudConfig) -> None:
        self.config = config
        self._local = threading.local()

    def conn(self) -> sqlite3.Connection | None:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            path = self.config.store.path
            if not path.is_file():
                return None  # ingest has not created the store yet
            conn = sqlite3.connect(path.resolve().as_uri() + "?mode=ro", uri=True, isolation_level=None,
                                   timeout=self.config.store.busy_timeout_s, check_same_thread=False)  # fmt: skip
            conn.row_factory = sqlite3.Row
            self._local.conn = conn
        return conn

    def rows(self, sql: str, params: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        """Rows of a query; none when the store or the table does not exist yet."""
        conn = self.conn()
        if conn is None:
            return []
        try:
            return conn.execute(sql, params).fetchall()
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):
                return []  # the OTA tables appear with the first `cloud serve` or `cloud models add`
            raise

    def fleet(self, now: float, device_id: str | None = None) -> list[dict[str, Any]]:
        """Every device (or one) with its state, pass rate in the last hour and drift state."""
        f = self.config.fleet
        one = "" if device_id is None else " AND device_id = ?"
        args: tuple[Any, ...] = () if device_id is None else (device_id,)
        hour = {
            r["device_id"]: (r["p"], r["f"])
            for r in self.rows(
                f"SELECT device_id, sum(passed) AS p, sum(failed) AS f FROM result_minutes WHERE minute >= ?{one} GROUP BY device_id",
                (int((now - 3600) // 60), *args),
            )
        }
        out = []
        for r in self.rows(
            "SELECT device_id, reported_state, status_seen, last_seen, model_version, backlog, groups, offline_reason,"
            " results, gaps, evicted, json_extract(status, '$.line') AS line, json_extract(status, '$.drift.state') AS drift"
            " FROM devices" + ("" if device_id is None else " WHERE device_id = ?"), args
        ):
            p, fl = hour.get(r["device_id"], (0, 0))
            out.append({
                "device_id": r["device_id"],
                "state": device_state(now=now, last_seen=r["last_seen"], status_seen=r["status_seen"],
                                      reported_state=r["reported_state"], offline_after_s=f.offline_after_s,
                                      dead_after_s=f.dead_after_s),
                "offline_reason": r["offline_reason"],
                "line": r["line"],
                "groups": json.loads(r["groups"]) if r["groups"] else [],
                "model_version": r["model_version"],
                "backlog": r["backlog"],
                "results": r["results"],
                "gaps": r["gaps"],
                "evicted": r["evicted"],
                "last_seen": r["last_seen"],
                "last_seen_s_ago": None if r["last_seen"] is None else round(now - r["last_seen"], 1),
                "passed_last_hour": p,
                "failed_last_hour": fl,
                "pass_rate": None if p + fl == 0 else p / (p + fl),
                "drift": r["drift"],
            })  # fmt: skip
        return out


def sort_devices(devices: list[dict[str, Any]], key: str, desc: bool) -> list[dict[str, Any]]:
    """Sorted by ``key``; devices without a value go last either way."""
    if key not in SORT_KEYS:
        key = "device_id"
    have = [d for d in devices if d.get(key) is not None]
    missing = [d for d in devices if d.get(key) is None]
    have.sort(key=lambda d: (d[key], d["device_id"]), reverse=desc)
    return have + sorted(missing, key=lambda d: d["device_id"])


def minute_chart(rows: list[sqlite3.Row], now: float, minutes: int = CHART_MINUTES) -> dict[str, Any]:
    """Bars of the last ``minutes`` minutes (pass, fail) and the SVG geometry to draw them."""
    last = int(now // 60)
    counts = {int(r["minute"]): (int(r["passed"]), int(r["failed"])) for r in rows}
    bars = [(m, *counts.get(m, (0, 0))) for m in range(last - minutes + 1, last + 1)]
    top = max([p + f for _, p, f in bars] + [1])
    width, height = 600, 120
    bw = width / minutes
    shapes = []
    for i, (m, p, f) in enumerate(bars):
        hp, hf = height * p / top, height * f / top
        shapes.append({"x": round(i * bw, 2), "w": round(max(bw - 1, 1), 2), "yp": round(height - hp, 2), "hp": round(hp, 2),
                       "yf": round(height - hp - hf, 2), "hf": round(hf, 2), "minute": m, "p": p, "f": f})  # fmt: skip
    return {"bars": shapes, "top": top, "width": width, "height": height,
            "passed": sum(p for _, p, _ in bars), "failed": sum(f for _, _, f in bars)}  # fmt: skip


def report_picture(config: CloudConfig, packed_file: str, name: str) -> bytes | None:
    """``report/<name>.png`` from a registered packed bundle (a tar), or None."""
    path = config.data_dir / "registry" / packed_file
    try:
        with tarfile.open(path, "r") as tar:
            for member_name in (f"report/{name}.png", f"./report/{name}.png"):
                try:
                    member = tar.getmember(member_name)
                except KeyError:
                    continue
                f = tar.extractfile(member) if member.isfile() else None
                return None if f is None else f.read()
    except (OSError, tarfile.TarError):
        return None
    return None


# -- the application ---------------------------------------------------------------------------------


def build_app(config: CloudConfig) -> Any:
    """The Starlette application for ``config`` (needs ``[web]`` with a token)."""
    web = config.web
    token = None if web is None else web.effective_token
    if web is None or not token:
        raise CloudConfigError(
            "the web pages need a token: set [web] token (16+ characters) in the cloud config or LINEWATCH_CLOUD_WEB_TOKEN"
        )
    site = _Site(config, web.page_size, token)
    return TokenGate(Starlette(routes=site.routes()), token)


class _Site:
    """The pages' handlers and what they share: the store reader, the templates, the token."""

    def __init__(self, config: CloudConfig, page_size: int, token: str) -> None:
        self.config = config
        self.page_size = page_size
        self.token = token
        self.reader = StoreReader(config)
        self.registry = metrics_registry(self.reader)
        self.env = Environment(loader=FileSystemLoader(str(TEMPLATES)), autoescape=select_autoescape(["html"]))
        self.env.filters["ago"] = _ago
        self.env.filters["when"] = _when
        self.env.filters["pct"] = lambda v: "—" if v is None else f"{100 * v:.1f}%"

    def routes(self) -> list[Route]:
        return [
            Route("/", self.fleet_page),
            Route("/devices/{device_id}", self.device_page),
            Route("/devices/{device_id}/samples/{seq:int}.jpg", self.sample_jpeg),
            Route("/models", self.models_page),
            Route("/models/{version}/{name}.png", self.model_picture),
            Route("/rollouts/{rollout_id}", self.rollout_page),
            Route("/api/fleet", self.api_fleet),
            Route("/metrics", self.metrics),
            Route("/healthz", self.healthz),
            Route("/login", self.login, methods=["GET", "POST"]),
            Route("/logout", self.logout),
        ]

    def render(self, name: str, status: int = 200, **context: Any) -> HTMLResponse:
        return HTMLResponse(self.env.get_template(name).render(**context), status_code=status)

    def fleet_page(self, request: Request) -> Response:
        t0 = time.perf_counter()
        now = time.time()
        q = request.query_params
        devices = self.reader.fleet(now)
        groups = sorted({g for d in devices for g in d["groups"]})
        states = {s: sum(1 for d in devices if d["state"] == s) for s in DEVICE_STATES}
        group, state = q.get("group") or "", q.get("state") or ""
        if group:
            devices = [d for d in devices if group in d["groups"]]
        if state:
            devices = [d for d in devices if d["state"] == state]
        sort, desc = q.get("sort") or "device_id", q.get("desc") == "1"
        devices = sort_devices(devices, sort, desc)
        pages = max(1, math.ceil(len(devices) / self.page_size))
        page = min(max(_int(q.get("page"), 1), 1), pages)
        shown = devices[(page - 1) * self.page_size : page * self.page_size]

        def link(**changes: Any) -> str:
            params = {"group": group, "state": state, "sort": sort, "desc": "1" if desc else "", "page": page, **changes}
            return "/?" + urllib.parse.urlencode({k: v for k, v in params.items() if v not in ("", None, 1) or k == "desc" and v})

        return self.render(
            "fleet.html", devices=shown, total=len(devices), groups=groups, group=group, state=state, states=states,
            sort=sort, desc=desc, page=page, pages=pages, link=link, sort_keys=SORT_KEYS,
            render_ms=(time.perf_counter() - t0) * 1000.0, now=now,
        )  # fmt: skip

    def device_page(self, request: Request) -> Response:
        device_id = request.path_params["device_id"]
        now = time.time()
        found = self.reader.fleet(now, device_id) if _DEVICE_RE.match(device_id) else []
        if not found:
            return self.render("error.html", 404, message=f"no device {device_id!r} in the store")
        chart = minute_chart(self.reader.rows(
            "SELECT minute, passed, failed FROM result_minutes WHERE device_id = ? AND minute > ?",
            (device_id, int(now // 60) - CHART_MINUTES)), now)  # fmt: skip
        recent = self.reader.rows("SELECT * FROM results WHERE device_id = ? ORDER BY seq DESC LIMIT 30", (device_id,))
        failed = self.reader.rows(
            "SELECT seq, ts, label, score FROM samples WHERE device_id = ? AND reason = 'fail' ORDER BY seq DESC LIMIT 8", (device_id,)
        )
        events = self.reader.rows("SELECT seq, ts, kind, detail FROM events WHERE device_id = ? ORDER BY seq DESC LIMIT 40", (device_id,))
        gaps = self.reader.rows("SELECT * FROM gaps WHERE device_id = ? ORDER BY seq DESC LIMIT 20", (device_id,))
        ota = self.reader.rows(
            "SELECT d.*, r.state AS rollout_state, r.version AS rollout_version, r.created AS rollout_created"
            " FROM ota_deployments d JOIN ota_rollouts r ON r.id = d.rollout WHERE d.device_id = ? ORDER BY r.created DESC LIMIT 20",
            (device_id,),
        )
        ota_now = self.reader.rows("SELECT * FROM ota_device_state WHERE device_id = ?", (device_id,))
        return self.render("device.html", d=found[0], chart=chart, recent=recent, failed=failed, events=events, gaps=gaps,
                      ota=ota, ota_now=ota_now[0] if ota_now else None, now=now)  # fmt: skip

    def sample_jpeg(self, request: Request) -> Response:
        device_id, seq = request.path_params["device_id"], request.path_params["seq"]
        if not _DEVICE_RE.match(device_id):
            return PlainTextResponse("no such sample", 404)
        rows = self.reader.rows("SELECT path FROM samples WHERE device_id = ? AND seq = ?", (device_id, int(seq)))
        path = self.config.samples_dir / rows[0]["path"] if rows else None
        if path is None or not path.resolve().is_relative_to(self.config.samples_dir.resolve()) or not path.is_file():
            return PlainTextResponse("no such sample", 404)
        return Response(path.read_bytes(), media_type="image/jpeg", headers={"Cache-Control": "max-age=86400"})

    def models_page(self, request: Request) -> Response:
        models = [
            {**dict(r), "metrics": json.loads(r["metrics"] or "{}")}
            for r in self.reader.rows("SELECT version, name, sha256, size, key_id, created, added, metrics, file,"
                " json_extract(manifest, '$.threshold') AS threshold FROM ota_models ORDER BY added DESC")
        ]
        rollouts = _rollouts(self.reader, limit=50)
        return self.render("models.html", models=models, rollouts=rollouts, pictures=REPORT_PICTURES, now=time.time())

    def model_picture(self, request: Request) -> Response:
        version, name = request.path_params["version"], request.path_params["name"]
        rows = self.reader.rows("SELECT file FROM ota_models WHERE version = ?", (version,))
        data = report_picture(self.config, rows[0]["file"], name) if rows and name in REPORT_PICTURES else None
        if data is None:
            return PlainTextResponse("no such picture", 404)
        return Response(data, media_type="image/png", headers={"Cache-Control": "max-age=86400"})

    def rollout_page(self, request: Request) -> Response:
        found = _rollouts(self.reader, rollout_id=request.path_params["rollout_id"])
        if not found:
            return self.render("error.html", 404, message="no such rollout")
        return self.render("rollout.html", r=found[0], now=time.time())

    def api_fleet(self, request: Request) -> Response:
        return JSONResponse(self.reader.fleet(time.time()))

    def metrics(self, request: Request) -> Response:
        body, content_type = render_metrics(self.registry)
        return Response(body, media_type=content_type)

    def healthz(self, request: Request) -> Response:
        return PlainTextResponse("ok")

    async def login(self, request: Request) -> Response:
        nxt = request.query_params.get("next") or "/"
        if not nxt.startswith("/") or nxt.startswith("//"):
            nxt = "/"  # only paths of this site: no open redirect
        if request.method == "POST":
            form = urllib.parse.parse_qs((await request.body()).decode("utf-8", "replace"))
            given = (form.get("token") or [""])[0]
            if hmac.compare_digest(given.encode(), self.token.encode()):
                resp = RedirectResponse(nxt, status_code=303)
                resp.set_cookie(COOKIE, session_value(self.token), httponly=True, samesite="strict", max_age=12 * 3600)
                return resp
            return self.render("login.html", 401, error="wrong token", next=nxt)
        return self.render("login.html", next=nxt, error=None)

    def logout(self, request: Request) -> Response:
        resp = RedirectResponse("/login", status_code=303)
        resp.delete_cookie(COOKIE)
        return resp


class TokenGate:
    """ASGI middleware: a request needs the bearer token or the login cookie (read-only site)."""

    OPEN = ("/login", "/healthz")

    def __init__(self, app: Any, token: str) -> None:
        self.app = app
        self._bearer = f"Bearer {token}".encode()
        self._session = session_value(token)

    async def __call__(
        self,
        scope: MutableMapping[str, Any],
        receive: Callable[[], Awaitable[Any]],
        send: Callable[[Any], Awaitable[None]],
    ) -> None:
        if scope["type"] != "http" or scope["path"] in self.OPEN or self._allowed(scope):
            if scope["type"] == "http" and scope["method"] not in ("GET", "HEAD") and scope["path"] != "/login":
                await _plain(send, 405, b"read-only: only GET\n")
                return
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        wants_html = b"text/html" in headers.get(b"accept", b"")
        if wants_html:
            target = urllib.parse.quote(scope["path"] + ("?" + scope["query_string"].decode() if scope.get("query_string") else ""))
            await send({"type": "http.response.start", "status": 303, "headers": [(b"location", f"/login?next={target}".encode())]})
            await send({"type": "http.response.body", "body": b""})
            return
        await _plain(send, 401, b"token needed: send Authorization: Bearer <token> (see [web] token)\n",
                     [(b"www-authenticate", b'Bearer realm="linewatch"')])  # fmt: skip

    def _allowed(self, scope: MutableMapping[str, Any]) -> bool:
        auth, cookie = b"", ""
        for k, v in scope.get("headers") or []:
            if k == b"authorization":
                auth = v
            elif k == b"cookie":
                cookie = v.decode("latin-1")
        if auth and hmac.compare_digest(auth, self._bearer):
            return True
        for part in cookie.split(";"):
            name, _, value = part.strip().partition("=")
            if name == COOKIE and hmac.compare_digest(value.encode(), self._session.encode()):
                return True
        return False


async def _plain(send: Callable[[Any], Awaitable[None]], status: int, body: bytes, extra: list[tuple[bytes, bytes]] | None = None) -> None:
    headers = [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode()), *(extra or [])]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _rollouts(reader: StoreReader, *, limit: int = 50, rollout_id: str | None = None) -> list[dict[str, Any]]:
    if rollout_id is not None:
        rows = reader.rows("SELECT * FROM ota_rollouts WHERE id = ?", (rollout_id,))
    else:
        rows = reader.rows("SELECT * FROM ota_rollouts ORDER BY created DESC LIMIT ?", (limit,))
    out = []
    for r in rows:
        deps = [dict(d) for d in reader.rows("SELECT * FROM ota_deployments WHERE rollout = ? ORDER BY phase, device_id", (r["id"],))]
        by_state: dict[str, int] = {}
        for d in deps:
            by_state[d["state"] or "waiting"] = by_state.get(d["state"] or "waiting", 0) + 1
        # the rollout row keeps the --canary spec ("1", "25%"); the deployments name the canaries
        out.append({**dict(r), "devices": json.loads(r["devices"] or "[]"), "canary_spec": r["canary"],
                    "canary": [d["device_id"] for d in deps if d["phase"] == "canary"],
                    "deployments": deps, "by_state": by_state})  # fmt: skip
    return out


def _int(value: str | None, default: int) -> int:
    try:
        return int(value) if value else default
    except ValueError:
        return default


def _ago(ts: float | None) -> str:
    if ts is None:
        return "never"
    s = max(0.0, time.time() - ts)
    if s < 90:
        return f"{s:.0f} s ago"
    if s < 5400:
        return f"{s / 60:.0f} min ago"
    if s < 2 * 86400:
        return f"{s / 3600:.1f} h ago"
    return f"{s / 86400:.0f} d ago"


def _when(ts: float | None) -> str:
    return "—" if ts is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


# -- serving -----------------------------------------------------------------------------------------


class WebServer:
    """uvicorn in a daemon thread on ``[web] host:port``; ``port`` is the bound port."""

    def __init__(self, config: CloudConfig) -> None:
        import uvicorn

        assert config.web is not None
        app = build_app(config)
        host, port = config.web.host, config.web.port
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.sock.bind((host, port))
        except OSError as exc:
            self.sock.close()
            raise CloudConfigError(f"[web] cannot listen on {host}:{port} ({exc}); pick a free port") from exc
        self.host, self.port = host, int(self.sock.getsockname()[1])
        # log_config=None: uvicorn leaves logging alone (only the CLI configures handlers)
        self.server = uvicorn.Server(uvicorn.Config(app, log_config=None, log_level="warning", access_log=False, lifespan="off"))
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, name="web", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/"

    def start(self, wait_s: float = 10.0) -> None:
        self._thread.start()
        deadline = time.monotonic() + wait_s
        while not self.server.started and self._thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        logger.info("web pages on %s", self.url)

    def stop(self) -> None:
        self.server.should_exit = True

    def join(self, timeout: float = 5.0) -> None:
        self._thread.join(timeout)
        self.sock.close()
