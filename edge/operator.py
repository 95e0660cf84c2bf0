"""The operator page: what the agent decided, big enough to read from the line.

A small HTTP server (stdlib) beside the agent, on 127.0.0.1 unless ``operator.host``
says otherwise. With ``operator.token`` every request needs the token (``?token=`` once,
which sets a cookie for the page's own requests, or ``Authorization: Bearer``). At most
``operator.max_clients`` requests are served at once by a fixed pool of threads; a
connection that sends nothing is dropped after ``REQUEST_TIMEOUT_S``, and beyond
``max_clients`` waiting connections new ones are closed at once. It only reads:
the agent's in-memory status and last failed part, and the buffer through its own
read-only connection. It never blocks inspection; if the port is taken the agent logs it
and inspects without the page.

    GET /                    the page (refreshes itself every second)
    GET /api/status          the agent's status snapshot as JSON (``last_failure``: seq,
                             part_id, ts, label, score, box of the part the picture shows;
                             ``drift``: shown as a banner above the verdict while a drift
                             check is at warning or drift, e.g. "images darker than usual:
                             check the lighting")
    GET /api/recent          the last 30 decisions as JSON
    GET /api/last-fail.jpg   the last failed part's picture (the ROI the model saw), the
                             deciding tile outlined in red; 404 before the first failure.
                             Held in memory (one picture) since the agent started; before
                             that, the newest failed part's sample from the buffer
"""

from __future__ import annotations

import hmac
import json
import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from http.cookies import SimpleCookie
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from edge.annotate import LastFailure
from edge.buffer import Buffer
from edge.exceptions import BufferStoreError

logger = logging.getLogger(__name__)

REQUEST_TIMEOUT_S = 10.0  # a connection that sends nothing holds a pool thread at most this long
COOKIE = "lw_token"


class _PooledHTTPServer(HTTPServer):
    """An HTTPServer whose requests run on a fixed pool: a flood of connections cannot make
    it start one thread each (the stdlib ThreadingHTTPServer does)."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], max_clients: int) -> None:
        super().__init__(address, handler)
        self.pool = ThreadPoolExecutor(max_workers=max_clients, thread_name_prefix=f"operator-req-{self.server_address[1]}")
        # Waiting connections beyond this are closed at once rather than queued without end.
        self.slots = threading.BoundedSemaphore(max_clients * 2)
        self.refused = 0

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.slots.acquire(blocking=False):
            self.refused += 1
            self.shutdown_request(request)
            return
        self.pool.submit(self._serve_one, request, client_address)

    def _serve_one(self, request: Any, client_address: Any) -> None:
        try:
            self.finish_request(request, client_address)
        except Exception:  # noqa: BLE001 - one bad request must not take the pool thread down
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)
            self.slots.release()

    def server_close(self) -> None:
        super().server_close()
        self.pool.shutdown(wait=False, cancel_futures=True)

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Linewatch</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
 body{font-family:system-ui,sans-serif;margin:0;background:#111;color:#eee}
 header{padding:12px 20px;background:#222;display:flex;gap:24px;align-items:baseline;flex-wrap:wrap}
 header b{font-size:1.3em}
 #verdict{font-size:18vw;font-weight:800;text-align:center;line-height:1.1;padding:10px}
 .pass{background:#0a5c2b}.fail{background:#9b1111}.idle{background:#333}
 .grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(160px,1fr));gap:10px;padding:10px 20px}
 .card{background:#222;padding:10px;border-radius:6px}.card div{font-size:1.8em;font-weight:700}
 table{width:100%;border-collapse:collapse}td{padding:3px 8px;border-bottom:1px solid #333}
 .warn{color:#ffb347}
 #drift{display:none;padding:14px 20px;font-size:1.6em;font-weight:700}
 #drift.warning{display:block;background:#8a5a00}#drift.drift{display:block;background:#b34700}
 #drift.off{display:block;background:#333;font-size:1em;font-weight:400}
 img{max-width:100%;border:2px solid #9b1111}
 section{padding:10px 20px}
</style></head><body>
<header><b>Linewatch</b><span id="device"></span><span id="model"></span><span id="camera"></span></header>
<div id="drift"></div>
<div id="verdict" class="idle">&mdash;</div>
<div class="grid">
 <div class="card">inspected<div id="results">0</div></div>
 <div class="card">passed<div id="passed">0</div></div>
 <div class="card">failed<div id="failed">0</div></div>
 <div class="card">pass rate<div id="rate">&mdash;</div></div>
 <div class="card">waiting to sync<div id="unsynced">0</div></div>
</div>
<section style="display:grid;grid-template-columns:2fr 1fr;gap:20px">
 <div><h3>Recent parts</h3><table id="recent"></table></div>
 <div><h3>Last failed part</h3><div id="lastfailinfo"></div><img id="lastfail" alt="no failure yet"></div>
</section>
<script>
async function tick(){
 try{
  const s=await (await fetch('/api/status')).json();
  const r=await (await fetch('/api/recent')).json();
  document.getElementById('device').textContent=s.device_id+(s.line?' \\u2014 '+s.line:'');
  document.getElementById('model').textContent='model '+s.model_version+' ('+s.runtime+')';
  const cam=document.getElementById('camera');
  cam.textContent='camera '+s.camera.state+(s.camera.dropped?' \\u2014 '+s.camera.dropped+' frames dropped':'');
  cam.className=s.camera.state==='up'?'':'warn';
  const dr=s.drift, db=document.getElementById('drift');
  if(dr&&dr.checks==='off'){db.className='off';db.textContent=dr.note||'drift checks are off';}
  else if(dr&&(dr.state==='warning'||dr.state==='drift')){
   db.className=dr.state;
   db.textContent=(dr.state==='drift'?'DRIFT: ':'Warning: ')
    +((dr.reasons||[]).map(x=>x.split(': ').slice(1).join(': ')).join(' \u2014 ')||'the pictures changed');
  }else{db.className='';db.textContent='';}
  const d=s.last_decision, v=document.getElementById('verdict');
  if(d){v.textContent=d.passed?'PASS':'FAIL '+d.label;v.className=d.passed?'pass':'fail';}
  const c=s.session;
  document.getElementById('results').textContent=c.results;
  document.getElementById('passed').textContent=c.passed;
  document.getElementById('failed').textContent=c.failed;
  document.getElementById('rate').textContent=c.results?(100*c.passed/c.results).toFixed(1)+'%':'\\u2014';
  document.getElementById('unsynced').textContent=s.unsynced??'\\u2014';
  document.getElementById('recent').innerHTML=r.slice().reverse().map(x=>
   `<tr class="${x.passed?'':'warn'}"><td>#${x.part_id}</td><td>${x.passed?'PASS':'FAIL'}</td><td>${x.label}</td>`
   +`<td>${x.score.toFixed(3)}</td><td>${new Date(x.ts*1000).toLocaleTimeString()}</td></tr>`).join('');
  const f=s.last_failure, img=document.getElementById('lastfail');
  const src=f?'/api/last-fail.jpg?seq='+f.seq:(c.failed?'/api/last-fail.jpg?buffer':'');
  if(src&&img.getAttribute('src')!==src){img.src=src;}
  document.getElementById('lastfailinfo').textContent=f?
   '#'+f.part_id+' '+f.label+' \\u2014 score '+f.score.toFixed(3)
   +(f.box?' \\u2014 box '+f.box[0]+','+f.box[1]+' '+f.box[2]+'\\u00d7'+f.box[3]:''):'';
 }catch(e){document.getElementById('camera').textContent='agent not answering';}
}
tick();setInterval(tick,1000);
</script></body></html>
"""


class OperatorPage:
    """Serve the page on ``host:port`` from a daemon thread; ``close()`` stops it."""

    def __init__(
        self,
        host: str,
        port: int,
        status: Callable[[], dict[str, Any]],
        buffer_path: Path,
        *,
        last_failure: LastFailure | None = None,
        token: str | None = None,
        max_clients: int = 8,
        request_timeout_s: float = REQUEST_TIMEOUT_S,
    ) -> None:
        self._token = token
        self._status = status
        self._buffer_path = Path(buffer_path)
        self._last_failure = last_failure
        page = self

        class Handler(BaseHTTPRequestHandler):
            timeout = request_timeout_s  # a silent connection gives its pool thread back

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                page._handle(self)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                logger.debug("operator page: " + format, *args)

        self.server = _PooledHTTPServer((host, port), Handler, max_clients)
        self.port = int(self.server.server_address[1])
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.5}, name="operator-page", daemon=True)

    def start(self) -> None:
        self._thread.start()
        logger.info("operator page on http://%s:%s/", self.server.server_address[0], self.port)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _read(self, fn: Callable[[Buffer], Any]) -> Any:
        try:
            with Buffer.open_readonly(self._buffer_path) as buf:
                return fn(buf)
        except BufferStoreError:
            return None

    def _authorized(self, req: BaseHTTPRequestHandler) -> tuple[bool, str | None]:
        """(allowed, token given in the URL): no token configured, or a matching one presented."""
        if not self._token:
            return True, None
        offered: list[str] = []
        query = parse_qs(urlsplit(req.path).query).get("token", [])
        offered += query
        auth = req.headers.get("Authorization", "")
        if auth.startswith("Bearer "):
            offered.append(auth[7:].strip())
        cookie = SimpleCookie(req.headers.get("Cookie", ""))
        if COOKIE in cookie:
            offered.append(cookie[COOKIE].value)
        ok = any(hmac.compare_digest(t.encode(), self._token.encode()) for t in offered)
        return ok, query[0] if ok and query else None

    def _handle(self, req: BaseHTTPRequestHandler) -> None:
        path = req.path.split("?", 1)[0]
        allowed, from_url = self._authorized(req)
        if not allowed:
            self._send(req, 401, "text/plain", b"operator page: add ?token=<operator.token> to the address")
            return
        if path == "/":
            # The token came in the URL: a cookie carries it on the page's own requests.
            cookie = f"{COOKIE}={from_url}; HttpOnly; SameSite=Strict; Path=/" if from_url else None
            self._send(req, 200, "text/html; charset=utf-8", PAGE.encode(), cookie=cookie)
        elif path == "/api/status":
            self._send(req, 200, "application/json", json.dumps(self._status(), default=str).encode())
        elif path == "/api/recent":
            rows = self._read(lambda b: b.tail(30)) or []
            self._send(req, 200, "application/json", json.dumps(rows, default=str).encode())
        elif path == "/api/last-fail.jpg":
            held = self._last_failure
            if held is not None and held.info() is not None:
                jpeg = held.jpeg()
            else:  # no failure since the agent started: the buffer's newest failed sample
                jpeg = self._read(_last_fail_jpeg)
            if jpeg:
                self._send(req, 200, "image/jpeg", jpeg)
            else:
                self._send(req, 404, "text/plain", b"no failed part yet")
        else:
            self._send(req, 404, "text/plain", b"not found")

    @staticmethod
    def _send(req: BaseHTTPRequestHandler, code: int, ctype: str, body: bytes, *, cookie: str | None = None) -> None:
        try:
            req.send_response(code)
            if cookie:
                req.send_header("Set-Cookie", cookie)
            req.send_header("Content-Type", ctype)
            req.send_header("Content-Length", str(len(body)))
            req.send_header("Cache-Control", "no-store")
            req.end_headers()
            req.wfile.write(body)
        except (TimeoutError, BrokenPipeError, ConnectionResetError):
            pass  # the browser went away


def _last_fail_jpeg(buf: Buffer) -> bytes | None:
    row = buf.db.execute("SELECT jpeg FROM samples WHERE reason = 'fail' ORDER BY seq DESC LIMIT 1").fetchone()
    return bytes(row[0]) if row else None
