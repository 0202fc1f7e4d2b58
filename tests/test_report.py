"""`air-ray report`: the page and its images from real scores (the real engine, no Ray), HTML escaping of
untrusted text, the streaming top/bottom k, and the page in headless Chromium (no console errors, every
image loads, nothing external is requested, the screenshot is not blank).

Chromium is required: without it the browser tests FAIL (`make test` finds or installs one: .ci/chromium). The
console check drives Chromium over the DevTools protocol with a minimal stdlib WebSocket client (no extra dependency): Runtime.exceptionThrown, console.error/assert, Log entries of level error (failed
resource loads, CSP, ...), failed requests and HTTP status >= 400 all count as errors.
"""

from __future__ import annotations

import base64
import functools
import html
import http.server
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from air_ray.errors import AirRayError
from air_ray.store.schemas import SCORES, to_table, write_table_atomic

REPO = Path(__file__).resolve().parent.parent
GSM8K = REPO / "air_ray" / "data" / "gsm8k_sample.jsonl"
HEADS = [(17, 3), (18, 6), (23, 2)]
XSS = "<script>alert(1)</script>"


def air_ray(*args, timeout=300):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "air_ray", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=REPO)


def write_partition(path: Path, rows: list[dict], metadata: dict | None = None) -> None:
    import fsspec

    write_table_atomic(to_table(rows, SCORES, metadata), fsspec.filesystem("file"), str(path))


def heads_doc() -> dict:
    rng = np.random.default_rng(0)
    scores = rng.uniform(0, 0.2, size=(30, 9))
    for l, h in HEADS:
        scores[l, h] = 0.8 + 0.05 * h
    return {
        "format_version": 1, "model": "smollm2-135m", "model_fingerprint": "test", "num_layers": 30,
        "num_heads": 9, "num_kv_heads": 3, "top_frac": 0.01, "heads": [list(h) for h in HEADS],
        "scores": [[round(float(x), 6) for x in row] for row in scores], "probes": {}, "ablation_check": {},
    }


# ------------------------------------------------------------------------------------------------------
# fast: synthetic scores (no model)


def synthetic_rows(n: int, seed: int, source: str) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        s = float(rng.choice([rng.normal(), np.nan, 0.5])) if i % 7 == 0 else float(rng.normal())
        out.append({
            "id": f"r{seed}-{i:04d}", "domain": [None, "math", "code"][i % 3], "source": source,
            "n_prompt_tokens": 10, "n_response_tokens": int(rng.integers(5, 400)), "loss_base": 1.0,
            "loss_ref": 1.0 + s, "score": s, "step_spans": [[0, 3], [4, 9]], "step_token_counts": [2, 3],
            "step_scores": [s, None], "step_weights": [1.0, 1.0], "truncated": False,
            "entropy_base": 2.0,
        })
    return out


def test_scan_top_bottom_are_exact(tmp_path):
    from air_ray.outputs import report

    rows = []
    for p in range(3):
        part = synthetic_rows(400, p, str(tmp_path / "missing.jsonl"))
        rows += part
        write_partition(tmp_path / "run" / "scores" / f"part-{p}.parquet", part)
    report_batch, report._BATCH_ROWS = report._BATCH_ROWS, 64  # many batches: the streaming merge is exercised
    try:
        sc = report.scan(str(tmp_path / "run"), k=20)
    finally:
        report._BATCH_ROWS = report_batch
    valid = [(r["score"], r["id"]) for r in rows if not np.isnan(r["score"])]
    top = sorted(valid, key=lambda x: (-x[0], x[1]))[:20]
    bottom = sorted(valid, key=lambda x: (x[0], x[1]))[:20]
    assert list(zip(sc.top.column("score").to_pylist(), sc.top.column("id").to_pylist())) == top
    assert list(zip(sc.bottom.column("score").to_pylist(), sc.bottom.column("id").to_pylist())) == bottom
    assert sc.n == 1200 and int(np.isnan(sc.scores).sum()) == sum(np.isnan(r["score"]) for r in rows)
    assert sorted(map(str, sc.domains)) == ["None", "code", "math"]


def test_report_without_texts_or_heads(tmp_path):
    from air_ray.outputs.report import write_report

    write_partition(tmp_path / "s" / "a.parquet", synthetic_rows(50, 0, str(tmp_path / "gone.jsonl")))
    index = Path(write_report(str(tmp_path / "s"), None, tmp_path / "rep"))
    page = index.read_text()
    assert index.name == "index.html"
    for img in ("score_hist.png", "score_vs_length.png"):
        assert (tmp_path / "rep" / img).stat().st_size > 1000
    assert not (tmp_path / "rep" / "heads.png").exists()
    assert page.count("Response text not found") == 40
    assert "No selection found" in page and "No heads.json given" in page


def test_report_errors(tmp_path):
    from air_ray.outputs.report import write_report

    (tmp_path / "empty").mkdir()
    with pytest.raises(AirRayError, match="report: no score partitions"):
        write_report(str(tmp_path / "empty"), None, tmp_path / "rep")
    write_partition(tmp_path / "s" / "a.parquet", synthetic_rows(5, 0, "x.jsonl"))
    with pytest.raises(AirRayError, match="no selection.json"):
        write_report(str(tmp_path / "s"), None, tmp_path / "rep", selection=str(tmp_path / "nosel"))
    p = air_ray("report", "--output", str(tmp_path / "rep"))
    assert p.returncode == 2 and p.stderr.strip() == "air-ray: error: report needs --scores"


# ------------------------------------------------------------------------------------------------------
# slow: real scores from the real engine, the CLI, and the page in Chromium


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    """A scores partition (two files) of 6 short GSM8K rows + 2 rows with hostile text, scored by the real
    engine; one row's source is missing. A selection of the top 3 beside it and a heads.json."""
    from air_ray.engine.scorer import Scorer
    from air_ray.config import SelectConfig
    from air_ray.outputs.select import select

    root = tmp_path_factory.mktemp("report")
    with open(GSM8K, encoding="utf-8") as f:
        gsm = [json.loads(line) for line in f if line.strip()]
    gsm = sorted(gsm, key=lambda r: len(r["prompt"]) + len(r["response"]))[:6]
    hostile = {  # no id: found again by its canonical id
        "prompt": "Say <b>hi</b> & \"bye\"",
        "response": f"First I write {XSS} here.\nThen 2 > 1 & 'quotes' \"too\".\n#### <img src=x onerror=alert(2)>",
        "domain": "code",
    }
    lost = {"id": "lost-row", "prompt": "What is 2+2?", "response": "2+2 = 4.\n#### 4"}
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in gsm + [hostile]), encoding="utf-8")

    t0 = time.perf_counter()
    scorer = Scorer(heads=HEADS, dtype="float32", device="cpu")
    results = scorer.score(gsm + [hostile, lost])
    scored_s = time.perf_counter() - t0
    for r in results[:-1]:
        r["source"] = str(corpus)
    results[-1]["source"] = str(root / "deleted.jsonl")  # never written: its text cannot be found
    meta = scorer.describe()
    run = root / "run"
    write_partition(run / "scores" / "part-a.parquet", results[:4], meta)
    write_partition(run / "scores" / "part-b.parquet", results[4:], meta)
    select(SelectConfig(scores=str(run), output=str(run / "selection"), top_k=3))
    heads = root / "heads.json"
    heads.write_text(json.dumps(heads_doc()))
    return {"root": root, "run": run, "heads": heads, "results": results, "hostile_id": results[6]["id"],
            "scored_s": scored_s}


@pytest.fixture(scope="module")
def report_dir(real_run):
    out = real_run["root"] / "report"
    t0 = time.perf_counter()
    p = air_ray("report", "--scores", str(real_run["run"]), "--heads", str(real_run["heads"]), "--output", str(out))
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.strip().splitlines()[-1] == str(out / "index.html")
    print(f"\nscoring 8 rows: {real_run['scored_s']:.1f}s; `air-ray report`: {time.perf_counter() - t0:.1f}s")
    return out


@pytest.mark.slow
def test_report_files_and_content(real_run, report_dir):
    for name in ("index.html", "heads.png", "score_hist.png", "score_vs_length.png", "score_vs_loss.png"):
        assert (report_dir / name).stat().st_size > 1000, name
    page = (report_dir / "index.html").read_text(encoding="utf-8")
    for r in real_run["results"]:
        assert html.escape(r["id"]) in page, r["id"]
    # untrusted text is escaped, never markup: the page has no script and no img but the report's own
    assert XSS not in page and "<script" not in page.lower()
    assert html.escape(XSS) in page
    assert "&lt;img src=x onerror=alert(2)&gt;" in page and "<img src=x" not in page
    assert "Say &lt;b&gt;hi&lt;/b&gt; &amp; &quot;bye&quot;" in page
    assert page.count("<img ") == 4  # heads, histogram, length and loss scatters (no placebo run given)
    # steps shaded (one span per step of each shown row with text, in both lists), legend, missing text
    with_text = [r for r in real_run["results"] if r["id"] != "lost-row"]
    assert page.count('<span class="st" ') == 2 * sum(len(r["step_spans"]) for r in with_text)
    assert page.count('class="legend"') == 2 and "step score" in page
    assert page.count("Response text not found: the source file cannot be read") == 2  # top and bottom list
    assert page.count('<span class="st chip"') == 2 * len(real_run["results"][-1]["step_spans"])
    # the selection summary (found at <scores>/selection) and the selected badges
    sel = json.loads((real_run["run"] / "selection" / "selection.json").read_text())
    assert "top_k = 3" in page and f"{sel['threshold_score']:.4g}" in page
    assert page.count('<span class="badge ok">selected</span>') == 2 * 3
    assert "L17.H3, L18.H6, L23.H2" in page and "other heads" not in page


# ---- Chromium -------------------------------------------------------------------------------------------


def chromium() -> str:
    """$AIR_RAY_CHROMIUM (`make test` sets it from .ci/chromium, which finds or installs one), else one on PATH."""
    names = (os.environ.get("AIR_RAY_CHROMIUM"), "chromium", "chromium-browser", "google-chrome")
    path = next((shutil.which(n) for n in names if n and shutil.which(n)), None)
    if path is None:
        pytest.fail("Chromium is not installed: the report is tested in headless Chromium. `make test` installs one "
                    "(.ci/chromium); or `apt-get install -y chromium`, or set AIR_RAY_CHROMIUM.")
    return path


def chromium_args(user_data: Path) -> list[str]:
    return [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--disable-extensions", "--mute-audio", f"--user-data-dir={user_data}"]


@pytest.fixture()
def serve():
    """``serve(directory) -> base URL`` of a local HTTP server on 127.0.0.1 (a free port)."""
    servers = []

    def start(directory: Path) -> str:
        class Quiet(http.server.SimpleHTTPRequestHandler):
            def log_message(self, *args):
                pass

        srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(directory)))
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
        return f"http://127.0.0.1:{srv.server_address[1]}/"

    yield start
    for srv in servers:
        srv.shutdown()
        srv.server_close()


class DevTools:
    """A minimal DevTools-protocol client over a stdlib WebSocket (RFC 6455: masked client text frames)."""

    def __init__(self, ws_url: str, timeout: float = 30):
        u = urllib.parse.urlparse(ws_url)
        self.sock = socket.create_connection((u.hostname, u.port), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET {u.path} HTTP/1.1\r\nHost: {u.hostname}:{u.port}\r\nUpgrade: websocket\r\n"
                           f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
                           ).encode())
        self.buf = b""
        while b"\r\n\r\n" not in self.buf:
            self.buf += self._recv()
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.1 101"), head[:200]
        self.ids = 0
        self.events: list[dict] = []

    def _recv(self) -> bytes:
        chunk = self.sock.recv(1 << 16)
        if not chunk:
            raise ConnectionError("DevTools connection closed")
        return chunk

    def _exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            self.buf += self._recv()
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def _send(self, obj: dict) -> None:
        data = json.dumps(obj).encode()
        n = len(data)
        head = bytes([0x81]) + (bytes([0x80 | n]) if n < 126 else
                                bytes([0x80 | 126]) + struct.pack(">H", n) if n < 65536 else
                                bytes([0x80 | 127]) + struct.pack(">Q", n))
        mask = os.urandom(4)
        masked = (np.frombuffer(data, np.uint8) ^ np.resize(np.frombuffer(mask, np.uint8), n)).tobytes()
        self.sock.sendall(head + mask + masked)

    def _message(self) -> dict:
        parts = []
        while True:
            b0, b1 = self._exact(2)
            n = b1 & 0x7F
            if n == 126:
                n = struct.unpack(">H", self._exact(2))[0]
            elif n == 127:
                n = struct.unpack(">Q", self._exact(8))[0]
            mask = self._exact(4) if b1 & 0x80 else None
            payload = self._exact(n)
            if mask:
                payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
            op = b0 & 0x0F
            if op == 8:
                raise ConnectionError("DevTools connection closed")
            if op in (9, 10):  # ping / pong: Chromium does not ping its clients
                continue
            parts.append(payload)
            if b0 & 0x80:
                return json.loads(b"".join(parts))

    def call(self, method: str, **params) -> dict:
        self.ids += 1
        self._send({"id": self.ids, "method": method, "params": params})
        while True:
            m = self._message()
            if m.get("id") == self.ids:
                if "error" in m:
                    raise RuntimeError(f"{method}: {m['error']}")
                return m.get("result", {})
            self.events.append(m)

    def wait_for(self, method: str, timeout: float = 30) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            for e in self.events:
                if e.get("method") == method:
                    return e
            if time.monotonic() > deadline:
                raise TimeoutError(method)
            self.events.append(self._message())

    def close(self) -> None:
        self.sock.close()


def load_in_chromium(url: str, tmp: Path) -> dict:
    """Open ``url`` in headless Chromium over DevTools; -> {errors, requests, images, title}."""
    tmp.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(chromium_args(tmp / "profile") + ["--remote-debugging-port=0", "about:blank"],
                            stdout=subprocess.DEVNULL, stderr=open(tmp / "chromium.log", "wb"))
    dt = None
    try:
        port_file = tmp / "profile" / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.exists() and port_file.read_text().strip()):
            assert proc.poll() is None, (tmp / "chromium.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "Chromium did not open its DevTools port"
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        for _ in range(50):
            targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10))
            pages = [t for t in targets if t.get("type") == "page"]
            if pages:
                break
            time.sleep(0.1)
        dt = DevTools(pages[0]["webSocketDebuggerUrl"])
        for domain in ("Runtime", "Log", "Network", "Page"):
            dt.call(f"{domain}.enable")
        dt.call("Page.navigate", url=url)
        dt.wait_for("Page.loadEventFired")
        images = dt.call("Runtime.evaluate", awaitPromise=True, returnByValue=True, expression=(
            "Promise.all(Array.from(document.images).map(i => i.decode().then("
            "() => [i.getAttribute('src'), i.naturalWidth], () => [i.getAttribute('src'), 0])))"
        ))["result"]["value"]
        title = dt.call("Runtime.evaluate", expression="document.title", returnByValue=True)["result"]["value"]
        dt.call("Runtime.evaluate", expression="new Promise(r => setTimeout(r, 300))", awaitPromise=True)
    finally:
        if dt is not None:
            dt.close()
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    errors, requests = [], []
    for e in dt.events:
        m, p = e.get("method"), e.get("params", {})
        if m == "Runtime.exceptionThrown":
            d = p["exceptionDetails"]
            errors.append(f"exception: {d.get('exception', {}).get('description') or d.get('text')}")
        elif m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
            errors.append(f"console.{p['type']}: {[a.get('value', a.get('description')) for a in p.get('args', [])]}")
        elif m == "Log.entryAdded" and p["entry"].get("level") == "error":
            errors.append(f"log ({p['entry'].get('source')}): {p['entry'].get('text')} {p['entry'].get('url', '')}")
        elif m == "Network.loadingFailed":
            errors.append(f"request failed: {p.get('errorText')}")
        elif m == "Network.responseReceived" and p["response"].get("status", 200) >= 400:
            errors.append(f"HTTP {p['response']['status']}: {p['response'].get('url')}")
        elif m == "Network.requestWillBeSent":
            requests.append(p["request"]["url"])
    return {"errors": errors, "requests": requests, "images": images, "title": title}


def screenshot(url: str, tmp: Path) -> tuple[np.ndarray, str]:
    """``--screenshot`` at 1280x2000 -> (RGB pixels, Chromium's stderr log)."""
    from PIL import Image

    tmp.mkdir(parents=True, exist_ok=True)
    png = tmp / "shot.png"
    p = subprocess.run(chromium_args(tmp / "profile") + [
        "--enable-logging=stderr", "--v=0", "--hide-scrollbars", f"--screenshot={png}", "--window-size=1280,2000",
        url], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and png.exists(), p.stderr[-3000:]
    return np.asarray(Image.open(png).convert("RGB")), p.stderr


@pytest.mark.slow
def test_console_check_catches_errors(tmp_path, serve):
    """The check is not vacuous: a broken image and a script error are reported."""
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "index.html").write_text(
        '<!DOCTYPE html><html><head><link rel="icon" href="data:,"></head><body><img src="missing.png">'
        "<script>console.error('boom'); undefined_fn();</script></body></html>")
    got = load_in_chromium(serve(tmp_path / "site") + "index.html", tmp_path / "chrome")
    text = "\n".join(got["errors"])
    assert "undefined_fn" in text and "boom" in text and "HTTP 404" in text, got["errors"]
    assert got["images"] == [["missing.png", 0]]


@pytest.mark.slow
def test_report_in_chromium(report_dir, tmp_path, serve):
    base = serve(report_dir)
    t0 = time.perf_counter()
    got = load_in_chromium(base + "index.html", tmp_path / "chrome")
    assert got["errors"] == [], got["errors"]
    assert got["title"] == "AIR report"
    widths = dict(got["images"])  # src -> natural width (0: did not load)
    assert sorted(widths) == ["heads.png", "score_hist.png", "score_vs_length.png", "score_vs_loss.png"], \
        got["images"]
    assert widths["heads.png"] > 0
    assert widths["score_hist.png"] == widths["score_vs_length.png"] == widths["score_vs_loss.png"] == 800
    # nothing external: every request is this server (the favicon is a data: URL)
    assert got["requests"] and all(u.startswith(base) or u.startswith("data:") for u in got["requests"]), \
        got["requests"]
    t1 = time.perf_counter()

    pixels, log = screenshot(base + "index.html", tmp_path / "shot")
    assert pixels.shape[:2] == (2000, 1280)
    # not blank: many distinct colours and real variation (a blank page is one colour, std 0)
    assert pixels.std() > 20, pixels.std()
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 100
    # the page writes nothing to the console at all (no scripts): no CONSOLE line, no uncaught error
    console = [ln for ln in log.splitlines() if ":CONSOLE" in ln or "Uncaught" in ln]
    assert console == [], console
    print(f"\nchromium DevTools load: {t1 - t0:.1f}s; screenshot: {time.perf_counter() - t1:.1f}s")
