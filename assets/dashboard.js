"use strict";
// The live dashboard. Everything from the socket is data: the DOM is built
// with createElement and textContent only (no HTML strings anywhere), and
// the page's Content-Security-Policy allows no inline script.

// State: one entry per symbol (public and private alike, private keyed with the client code).
const HISTORY = 300;
const MAX_SERIES = 2000;
const series = new Map();   // key -> { symbol, client, points: [{t, price, sma}], row }
let selected = null, socket = null, retryMs = 500, retryTimer = null, dirty = false, manualClose = false;
// Everything keyed by names from the wire (epochs, symbols, client codes) is
// a Map, a Set or an Object.create(null) object: a name like "__proto__"
// must stay a plain key, never reach Object.prototype.
// The last position seen of each key, to resume after a reconnect:
// "public"/"private" -> symbol -> { epoch, seq }; reset when the client code changes.
let positions = { public: new Map(), private: new Map() }, positionsOf = null;
// The socket's subscriptions as last reported, restored by a resume.
let subscriptions = null;
// A resume request must fit the bridge's websocket.max_message_bytes (64 KiB).
const MAX_RESUME_BYTES = 60000;
// Candles (with volume) and an EMA of the selected symbol, from the series
// the bridge serves: the first whose name starts "candles" and "ema", or
// those named by ?candles= and ?ema=. Only the charted symbol's are kept.
const MAX_CANDLES = 60, MAX_EMA = 600;
let served = [], candleSeries = null, emaSeries = null, charted = null, candlesDirty = false;
const candles = new Map();   // bucket start -> bar
let emaPoints = [];          // [{t, ema}]
const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
if (params.get("client")) $("client").value = params.get("client");
const token = params.get("token");
// The token must not stay in the address bar, the history or a Referer.
if (params.has("token")) {
  params.delete("token");
  const query = params.toString();
  history.replaceState(null, "", location.pathname + (query ? `?${query}` : "") + location.hash);
}

function element(tag, props = {}, children = []) {
  const node = document.createElement(tag);
  Object.assign(node, props);
  for (const child of children) node.append(child);
  return node;
}

function setStatus(state, text) { const s = $("status"); s.dataset.state = state; s.textContent = text; }

function connect() {
  clearTimeout(retryTimer);
  if (socket) { manualClose = true; socket.close(); }
  manualClose = false;
  const code = $("client").value.trim();
  if (positionsOf !== code) {
    positions = { public: new Map(), private: new Map() }; positionsOf = code; subscriptions = null;
  }
  // Back after a drop: the bridge holds the socket until it hears what was
  // seen (and what it subscribed to), then sends what was missed before
  // anything live.
  const request = JSON.stringify(resumeRequest());
  const resuming = positions.public.size + positions.private.size > 0 && request.length <= MAX_RESUME_BYTES;
  const query = new URLSearchParams();
  if (token) query.set("token", token);
  if (resuming) query.set("resume", "1");
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const url = `${scheme}://${location.host}/ws/${encodeURIComponent(code)}` + (query.size ? `?${query}` : "");
  setStatus("connecting", "connecting…");
  const ws = new WebSocket(url);
  socket = ws;
  let openedAt = null;
  ws.onopen = () => {
    openedAt = Date.now();
    retryMs = 500; setStatus("open", `open as ${code}`);
    if (resuming) ws.send(request);
  };
  ws.onmessage = (event) => onFrame(event.data);
  ws.onclose = (event) => {
    if (socket !== ws || manualClose) return;
    // Refused as too big: start afresh rather than retry the same request.
    if (event.code === 1009) positions = { public: new Map(), private: new Map() };
    const wait = retryMs; retryMs = Math.min(retryMs * 2, 10000);
    setStatus("closed", `closed (${event.code || "no code"}); retrying in ${(wait / 1000).toFixed(1)} s`);
    retryTimer = setTimeout(connect, wait * (0.5 + Math.random() / 2));
    // A socket refused before it opened shows only as 1006: ask whether the
    // token was refused, and if so stop retrying what cannot succeed.
    if (openedAt === null || (event.code === 1006 && Date.now() - openedAt < 2000)) {
      authenticationRefused(code).then((refused) => {
        if (!refused || socket !== ws || manualClose) return;
        clearTimeout(retryTimer);
        setStatus("auth-failed", "authentication failed");
      });
    }
  };
}

// Whether the bridge refuses this page's token for `code` (HTTP 401/403).
// The WebSocket's own refusal cannot be read, and a plain GET of /ws/ is
// answered 400 before authentication, so this asks /sse/, which
// authenticates alike; its invalid ?symbols= makes an admitted request end
// at 400 without opening a stream.
async function authenticationRefused(code) {
  const query = new URLSearchParams({ symbols: "!" });
  if (token) query.set("token", token);
  try {
    const response = await fetch(`/sse/${encodeURIComponent(code)}?${query}`, { cache: "no-store" });
    response.body?.cancel();
    return response.status === 401 || response.status === 403;
  } catch {
    return false; // no answer from the bridge: retry as for any drop
  }
}

// {"op":"resume","public":{epoch:{symbol:seq}},"private":{...}}
// Null-prototype objects: an epoch or symbol "__proto__" is set as an own
// key (serialized like any other), not as the object's prototype.
function resumeRequest() {
  const request = { op: "resume", public: Object.create(null), private: Object.create(null) };
  if (Array.isArray(subscriptions)) request.symbols = subscriptions;
  for (const kind of ["public", "private"]) {
    const epochs = request[kind];
    for (const [symbol, { epoch, seq }] of positions[kind]) {
      if (!Object.hasOwn(epochs, epoch)) epochs[epoch] = Object.create(null);
      epochs[epoch][symbol] = seq;
    }
  }
  return request;
}

function showRecovery(m) {
  const r = $("recovery");
  const missed = (Array.isArray(m.unrecovered?.public) ? m.unrecovered.public.length : 0)
    + (Array.isArray(m.unrecovered?.private) ? m.unrecovered.private.length : 0);
  r.dataset.state = m.recovered === true ? "recovered" : "gap";
  r.textContent = m.recovered === true
    ? `resumed: ${Number(m.replayed)} missed updates recovered`
    : `resumed with a gap: ${missed} ${missed === 1 ? "symbol" : "symbols"} could not be recovered (latest shown)`;
  markStale(m.unrecovered);
}

// The rows of keys a resume could not recover are greyed (class "stale")
// until their next result; a resume clears what an earlier one marked.
function markStale(unrecovered) {
  for (const s of series.values()) s.row.classList.remove("stale");
  const names = (list) => new Set(Array.isArray(list) ? list.map(String) : []);
  const lost = { public: names(unrecovered?.public), private: names(unrecovered?.private) };
  for (const s of series.values()) {
    // Private keys are the resuming client code's own.
    const kind = !s.client ? "public" : s.client === positionsOf ? "private" : null;
    if (kind && lost[kind].has(s.symbol)) s.row.classList.add("stale");
  }
}

function send(op) {
  const symbols = $("symbols").value.split(",").map((s) => s.trim()).filter(Boolean);
  if (socket && socket.readyState === WebSocket.OPEN && symbols.length) socket.send(JSON.stringify({ op, symbols }));
}

function onFrame(data) {
  if (typeof data !== "string") { addDirect(`<${data.size ?? "binary"} bytes>`); return; }
  let msg = null;
  try { msg = JSON.parse(data); } catch { addDirect(data); return; }
  if (msg && msg.type === "welcome" && Array.isArray(msg.subscriptions)) {
    // A socket that resumes is subscribed to what the resume names.
    if (!(socket && socket.url.includes("resume=1") && subscriptions)) showSubscriptions(msg.subscriptions);
    pickSeries(Array.isArray(msg.series) ? msg.series.map(String) : []);
    return;
  }
  if (msg && msg.type === "subscribed" && Array.isArray(msg.symbols)) { showSubscriptions(msg.symbols); return; }
  if (msg && msg.type === "error") { addDirect(`error: ${String(msg.message)}`); return; }
  if (msg && msg.type === "resumed") { showRecovery(msg); return; }
  if (isSeriesResult(msg)) { onSeriesResult(msg); return; }
  if (isSma(msg)) { onSma(msg); return; }
  addDirect(data);
}

function showSubscriptions(symbols) {
  subscriptions = symbols.map(String);
  $("subscriptions").textContent = subscriptions.join(", ") || "none";
}

// A result as the bridge encodes it; anything else is shown as a direct message.
function isSma(m) {
  const number = (v) => typeof v === "number" || v === null;
  return m !== null && typeof m === "object" && typeof m.symbol === "string" && number(m.sma) && number(m.price)
    && typeof m.window === "number" && typeof m.count === "number" && typeof m.ts === "number"
    && (m.client === undefined || typeof m.client === "string");
}

// The series to chart, from those the welcome lists; the charted symbol's
// keys in them are subscribed (again, after a reconnect).
function pickSeries(names) {
  served = names;
  const pick = (param, prefix) => {
    const wanted = params.get(param);
    return served.includes(wanted) ? wanted : served.find((n) => n.startsWith(prefix)) ?? null;
  };
  candleSeries = pick("candles", "candles");
  emaSeries = pick("ema", "ema");
  $("candle-panel").hidden = candleSeries === null;
  $("ema-name").textContent = emaSeries ? `━ ${emaSeries}` : "";
  $("candle-series").textContent = candleSeries ? `(${candleSeries})` : "";
  const symbol = charted;
  charted = null;
  chartSeriesOf(symbol);
}

// Charts `symbol`'s candles and EMA (null: none): its keys in those series
// are subscribed, the previous symbol's unsubscribed.
function chartSeriesOf(symbol) {
  const names = [candleSeries, emaSeries].filter(Boolean);
  if (!names.length || !socket || socket.readyState !== WebSocket.OPEN || symbol === charted) return;
  if (charted !== null) {
    socket.send(JSON.stringify({ op: "unsubscribe", symbols: names.map((n) => `${charted}@${n}`) }));
  }
  charted = symbol;
  candles.clear(); emaPoints = []; candlesDirty = true;
  $("candles-name").textContent = symbol ?? "";
  if (symbol !== null) socket.send(JSON.stringify({ op: "subscribe", symbols: [symbol], series: names }));
}

// A [[series]] result: it names its series (and has a position).
function isSeriesResult(m) {
  return m !== null && typeof m === "object" && typeof m.series === "string" && typeof m.symbol === "string"
    && typeof m.seq === "number" && typeof m.epoch === "string";
}

function onSeriesResult(m) {
  // Its key is symbol@series: a resume names it so.
  const known = positions[m.client ? "private" : "public"], key = `${m.symbol}@${m.series}`;
  if (known.has(key) || known.size < MAX_SERIES) known.set(key, { epoch: m.epoch, seq: m.seq });
  if (m.client || m.symbol !== charted) return;
  const finite = (v) => typeof v === "number" && Number.isFinite(v);
  if (m.series === candleSeries && [m.start, m.end, m.open, m.high, m.low, m.close].every(finite)) {
    candles.set(m.start, {
      start: m.start, end: m.end, open: m.open, high: m.high, low: m.low, close: m.close,
      volume: finite(m.volume) ? m.volume : 0, closed: m.closed === true,
    });
    while (candles.size > MAX_CANDLES) candles.delete(Math.min(...candles.keys()));
    candlesDirty = true;
  } else if (m.series === emaSeries && finite(m.ema) && finite(m.ts)) {
    emaPoints.push({ t: m.ts, ema: m.ema });
    if (emaPoints.length > MAX_EMA) emaPoints.shift();
    candlesDirty = true;
  }
}

function onSma(m) {
  const key = m.client ? `${m.client}:${m.symbol}` : m.symbol;
  if (typeof m.seq === "number" && typeof m.epoch === "string") {
    const known = positions[m.client ? "private" : "public"];
    if (known.has(m.symbol) || known.size < MAX_SERIES) known.set(m.symbol, { epoch: m.epoch, seq: m.seq });
  }
  let s = series.get(key);
  if (!s && series.size >= MAX_SERIES) return; // a flood of names must not grow the page without end
  if (!s) {
    const row = document.createElement("tr");
    row.dataset.symbol = m.symbol;
    if (m.client) row.dataset.client = m.client;
    const name = element("td", { textContent: m.symbol });
    if (m.client) name.append(" ", element("span", { className: "dim", textContent: `(${m.client})` }));
    row.append(
      name,
      element("td", { className: "price" }),
      element("td", { className: "sma" }),
      element("td", { className: "count" }),
      element("td", {}, [element("time")]),
    );
    row.addEventListener("click", () => select(key));
    insertSorted(row, key);
    s = { symbol: m.symbol, client: m.client, points: [], row };
    series.set(key, s);
    if (!selected) select(key);
  }
  s.row.classList.remove("stale");
  const last = s.points[s.points.length - 1];
  s.points.push({ t: m.ts, price: m.price, sma: m.sma });
  if (s.points.length > HISTORY) s.points.shift();
  const cells = s.row.cells;
  flash(cells[1], m.price, last && last.price); cells[1].textContent = fmt(m.price);
  flash(cells[2], m.sma, last && last.sma); cells[2].textContent = fmt(m.sma);
  cells[3].textContent = `${m.count}/${m.window}`;
  cells[4].firstChild.textContent = new Date(m.ts).toLocaleTimeString();
  if (key === selected) dirty = true;
}

function insertSorted(row, key) {
  const rows = $("rows");
  const after = [...rows.children].find((r) => (r.dataset.key || "") > key);
  row.dataset.key = key;
  rows.insertBefore(row, after || null);
}

function flash(cell, now, before) {
  if (before === undefined || before === null || now === before) return;
  cell.classList.remove("up", "down"); void cell.offsetWidth; cell.classList.add(now > before ? "up" : "down");
}

function fmt(x) { return x === null ? "–" : Number(x).toFixed(Math.abs(x) >= 1000 ? 1 : Math.abs(x) >= 1 ? 3 : 6); }

function select(key) {
  selected = key;
  for (const r of $("rows").children) r.classList.toggle("selected", r.dataset.key === key);
  $("chart-symbol").textContent = key;
  dirty = true;
  // Candles are charted for public symbols.
  const s = series.get(key);
  chartSeriesOf(s && !s.client ? s.symbol : null);
}

function addDirect(text) {
  const li = element("li", {}, [element("time", { textContent: new Date().toLocaleTimeString() }), " ", text]);
  const list = $("direct");
  list.prepend(li);
  while (list.children.length > 50) list.lastChild.remove();
}

// Sizes `canvas` to its box; returns its context, width and height.
function fitted(canvas) {
  const ctx = canvas.getContext("2d");
  const dpr = window.devicePixelRatio || 1, w = canvas.clientWidth, h = canvas.clientHeight;
  if (canvas.width !== w * dpr || canvas.height !== h * dpr) { canvas.width = w * dpr; canvas.height = h * dpr; }
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, w, h);
  return { ctx, w, h };
}

// Horizontal grid lines with their values, from `lo` to `hi` mapped by `y`.
function grid(ctx, left, right, lo, hi, y) {
  ctx.strokeStyle = "#263241"; ctx.fillStyle = "#7f8ea3"; ctx.font = "11px system-ui"; ctx.lineWidth = 1;
  for (let i = 0; i <= 4; i++) {
    const v = lo + ((hi - lo) * i) / 4, yy = y(v);
    ctx.beginPath(); ctx.moveTo(left, yy); ctx.lineTo(right, yy); ctx.stroke();
    ctx.fillText(fmt(v), 4, yy + 4);
  }
}

// The padded range of `values`, never empty.
function range(values) {
  let lo = Math.min(...values), hi = Math.max(...values);
  if (hi === lo) { hi += 1; lo -= 1; }
  const pad = (hi - lo) * 0.05;
  return [lo - pad, hi + pad];
}

// Candles (closed ones filled, the open one hollow), volume bars beneath
// them, and the EMA over them, on a shared time axis.
function drawCandles() {
  candlesDirty = false;
  const canvas = $("candles");
  const { ctx, w, h } = fitted(canvas);
  const bars = [...candles.values()].sort((a, b) => a.start - b.start);
  canvas.dataset.candles = String(bars.length);
  canvas.dataset.closed = String(bars.filter((b) => b.closed).length);
  if (!bars.length) { canvas.dataset.ema = "0"; return; }
  const t0 = bars[0].start, t1 = bars[bars.length - 1].end;
  const ema = emaPoints.filter((p) => p.t >= t0 && p.t <= t1);
  canvas.dataset.ema = String(ema.length);
  // The lowest fifth shows volume, when the quotes carried any.
  const maxVolume = Math.max(0, ...bars.map((b) => b.volume));
  const left = 64, right = w - 10, top = 10, bottom = h - 24;
  const volumeTop = maxVolume > 0 ? bottom - (bottom - top) * 0.2 : bottom;
  const [lo, hi] = range(bars.flatMap((b) => [b.high, b.low]).concat(ema.map((p) => p.ema)));
  const x = (t) => left + ((t - t0) / (t1 - t0)) * (right - left);
  const y = (v) => volumeTop - 4 - ((v - lo) / (hi - lo)) * (volumeTop - 4 - top);
  grid(ctx, left, right, lo, hi, y);
  ctx.fillText(new Date(t0).toLocaleTimeString(), left, h - 6);
  const end = new Date(t1).toLocaleTimeString();
  ctx.fillText(end, right - ctx.measureText(end).width, h - 6);
  for (const b of bars) {
    const xa = x(b.start), xb = x(b.end), width = Math.max(1, (xb - xa) * 0.7), mid = (xa + xb) / 2;
    if (maxVolume > 0) {
      const tall = (b.volume / maxVolume) * (bottom - volumeTop);
      ctx.fillStyle = "#3d4b5c"; ctx.fillRect(mid - width / 2, bottom - tall, width, tall);
    }
    const color = b.close >= b.open ? "#3fb950" : "#f85149";
    ctx.strokeStyle = color; ctx.fillStyle = color; ctx.lineWidth = 1;
    ctx.beginPath(); ctx.moveTo(mid, y(b.high)); ctx.lineTo(mid, y(b.low)); ctx.stroke();
    const body = Math.min(y(b.open), y(b.close)), tall = Math.max(1, Math.abs(y(b.open) - y(b.close)));
    if (b.closed) ctx.fillRect(mid - width / 2, body, width, tall);
    else ctx.strokeRect(mid - width / 2, body, width, tall);
  }
  ctx.strokeStyle = "#d2a8ff"; ctx.lineWidth = 1.5; ctx.beginPath();
  ema.forEach((p, i) => (i ? ctx.lineTo(x(p.t), y(p.ema)) : ctx.moveTo(x(p.t), y(p.ema))));
  ctx.stroke();
}

// Drawing happens at most once per animation frame, whatever the update rate.
function draw() {
  requestAnimationFrame(draw);
  if (candlesDirty) drawCandles();
  if (!dirty) return;
  dirty = false;
  const s = series.get(selected);
  const canvas = $("chart");
  const { ctx, w, h } = fitted(canvas);
  if (!s || s.points.length === 0) return;
  const pts = s.points, left = 64, right = w - 10, top = 10, bottom = h - 24;
  const [lo, hi] = range(pts.flatMap((p) => [p.price, p.sma]).filter((v) => v !== null));
  const x = (i) => left + (pts.length === 1 ? 0 : (i / (pts.length - 1)) * (right - left));
  const y = (v) => bottom - ((v - lo) / (hi - lo)) * (bottom - top);
  grid(ctx, left, right, lo, hi, y);
  ctx.fillText(new Date(pts[0].t).toLocaleTimeString(), left, h - 6);
  const end = new Date(pts[pts.length - 1].t).toLocaleTimeString();
  ctx.fillText(end, right - ctx.measureText(end).width, h - 6);
  for (const [field, color] of [["price", "#58a6ff"], ["sma", "#f0b429"]]) {
    ctx.strokeStyle = color; ctx.lineWidth = 1.5; ctx.beginPath();
    pts.forEach((p, i) => { if (p[field] === null) return; i ? ctx.lineTo(x(i), y(p[field])) : ctx.moveTo(x(i), y(p[field])); });
    ctx.stroke();
  }
  canvas.dataset.points = String(pts.length);
}

$("connect").addEventListener("click", connect);
$("subscribe").addEventListener("click", () => send("subscribe"));
$("unsubscribe").addEventListener("click", () => send("unsubscribe"));
$("client").addEventListener("keydown", (e) => { if (e.key === "Enter") connect(); });
requestAnimationFrame(draw);
connect();
