// The crowdgraph worker page: joins the coordinator that served it over a WebSocket and speaks
// docs/protocol.md (one frame per binary message).  Partitions run in compute.mjs (a Web Worker
// with onnxruntime-web); this thread keeps the connection, the heartbeat and the page.
// The protocol's rules live in the coordinator's wire.Connection, which closes this page's
// connection on any frame out of order; the page itself checks only what keeps it safe: that
// the coordinator proves the token before anything is loaded.
import { decodeFrame, encodeFrame, frameType, sign, sha256, hex, unhex, sameText, capIrVersion,
         stringsRaw, DTYPE_CODE, HAS_INFLATE } from "/proto.mjs";
import { openCache } from "/cache.mjs";

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const MB = 1e6;  // decimal, as everywhere in crowdgraph
// Highest ONNX IR version onnxruntime-web 1.30 takes; partitions above it are capped on load.
const MAX_IR_VERSION = 10;

const state = window.crowdgraph = {
  status: "starting", detail: "", workerId: null, tasks: 0, partition: null, announced: 0,
  threads: 1, isolated: self.crossOriginIsolated === true, memory: null, loads: 0, log: [],
  cache: { kind: "none", entries: 0, bytes: 0, bound: 0 },
};

function show(status, detail = "") {
  state.status = status; state.detail = detail;
  const el = $("status");
  el.textContent = status; el.dataset.state = status.split(" ")[0].replace(/[^a-z]/g, "");
  $("detail").textContent = detail;
  document.title = `crowdgraph worker: ${status}`;
}
function note(text) { state.log.push(text); if (state.log.length > 50) state.log.shift(); }

// ---- token: from the URL fragment (#token=...), never sent to a server ----
// Read once, then scrubbed from the address bar and the history entry, so it does not linger where
// a screenshot, a shared tab or a later script could find it; it lives on only in this variable.
// Reloading the page therefore needs the join URL again.
const fragment = new URLSearchParams(location.hash.slice(1));
const tokenText = fragment.get("token") || "";
if (fragment.has("token")) history.replaceState(history.state, "", location.pathname + location.search);
const token = new TextEncoder().encode(tokenText);
const pureJs = params.get("purejs") === "1";     // force the pure-JS HMAC/SHA-256 (tests)

// ---- the partition cache (cache.mjs): ?cache=MB bounds it (0: none), ?store=opfs|indexeddb picks one ----
let cache = null;
async function showCache() {
  state.cache = cache ? { kind: cache.kind, bound: cache.bound, ...await cache.usage() } : { kind: "none", entries: 0, bytes: 0, bound: 0 };
  const c = state.cache;
  $("cache").textContent = cache ? `${c.entries} partitions, ${(c.bytes / MB).toFixed(1)} of ${(c.bound / MB).toFixed(0)} MB (${c.kind})`
                                 : "off (no storage for the page here, or ?cache=0)";
}

// ---- budget: what the user sets, minus what the WASM runtime really costs ----
let config = { runtime_bytes: 80 * MB, model_factor: 3, heartbeat: 5 };
function parseMB(text) {
  const m = /^\s*([\d.]+)\s*(MB|M|GB|G)?\s*$/i.exec(text || "");
  if (!m) return null;
  return Math.round(Number(m[1]) * (/^g/i.test(m[2] || "") ? 1000 : 1));
}
function defaultBudgetMB() {
  const gib = navigator.deviceMemory || 2;   // Chromium: rounded device RAM in GiB, at most 8
  return Math.max(256, Math.min(2048, Math.round(gib * 2 ** 30 / MB / 4)));
}
const budgetMB = () => Number($("budget").value) || defaultBudgetMB();
// The HELLO's memory_budget: (set - runtime) / model_factor.  The scheduler compares it with a
// partition's estimated resident bytes, so a tab never takes more than the user allowed.
const announce = () => Math.max(0, Math.floor((budgetMB() * MB - config.runtime_bytes) / config.model_factor));

$("budget").value = parseMB(params.get("memory")) || Number(localStorage.getItem("crowdgraph-budget-mb")) || defaultBudgetMB();

// ---- the compute worker ----
const compute = new Worker("/compute.mjs", { type: "module" });
let nextCall = 1;
const calls = new Map();
compute.onmessage = (e) => {
  const pending = calls.get(e.data.id);
  if (!pending) return;
  calls.delete(e.data.id);
  e.data.ok ? pending.resolve(e.data) : pending.reject(new Error(e.data.error));
};
compute.onerror = (e) => { show("error", `the compute worker failed: ${e.message}`); };
function call(op, payload = {}, transfer = []) {
  return new Promise((resolve, reject) => {
    const id = nextCall++;
    calls.set(id, { resolve, reject });
    compute.postMessage({ id, op, ...payload }, transfer);
  });
}

// ---- connection ----
let ws = null, stopped = false, refused = false, retryTimer = null, retryDelay = 1000;
let lastSent = 0, lastRecv = 0, heartbeat = 5, pingSeq = 0, phase = "closed";
let nonce = null, myNonce = null, chain = Promise.resolve(), modelBytes = 0;
// RUN `state` (docs/protocol.md): key -> {input name: tensor}, the caches this page keeps for its
// partition between a decoder's steps; dropped with the partition.
const kept = new Map();

function send(typeName, header, sections) {
  if (!ws || ws.readyState !== WebSocket.OPEN) return;
  ws.send(encodeFrame(typeName, header, sections));
  lastSent = performance.now();
}
const estimatedRss = () => config.runtime_bytes + config.model_factor * modelBytes;

function connect() {
  clearTimeout(retryTimer); retryTimer = null;
  if (stopped || (ws && ws.readyState <= WebSocket.OPEN)) return;
  if (!tokenText) { show("error", "no token: open the join URL the coordinator printed (it ends with #token=...)"); return; }
  refused = false; phase = "hello"; state.workerId = null; $("worker").textContent = "-";
  state.partition = null; $("partition").textContent = "none"; modelBytes = 0; kept.clear();
  chain = Promise.resolve();
  show("connecting");
  const socket = ws = new WebSocket(`${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ws`);
  socket.binaryType = "arraybuffer";
  socket.onopen = async () => {
    const cached = cache ? await cache.digests().catch((err) => { note(`cache unreadable: ${err.message}`); return []; }) : [];
    if (socket !== ws) return;
    state.announced = announce();
    $("announced").textContent = `${(state.announced / MB).toFixed(0)} MB`;
    lastRecv = lastSent = performance.now();
    send("HELLO", { versions: [1], name: `browser ${navigator.platform || ""}`.trim(), memory_budget: state.announced,
      cores: state.threads, platform: "browser-wasm", codecs: HAS_INFLATE ? ["lz4", "zlib", "none"] : ["lz4", "none"],
      cached, state: true });
  };
  socket.onmessage = (event) => { if (socket === ws) receive(new Uint8Array(event.data)); };
  socket.onclose = (event) => {
    if (socket !== ws) return;
    ws = null; phase = "closed";
    call("unload").catch(() => {});
    state.partition = null; $("partition").textContent = "none";
    if (stopped) { show("stopped", "this page left the crowd; press the button to join again"); return; }
    if (refused) { scheduleRetry(60000); return; }
    show("disconnected", event.reason || "the connection closed");
    scheduleRetry(retryDelay); retryDelay = Math.min(retryDelay * 2, 30000);
  };
}

function scheduleRetry(ms) {
  clearTimeout(retryTimer);
  // A hidden page retries too (a phone's browser throttles its timers; it rejoins at once when shown).
  retryTimer = setTimeout(connect, ms);
  $("detail").textContent = `${state.detail} — rejoining in ${Math.round(ms / 1000)} s`;
}

function drop(reason) {
  note(`closing: ${reason}`);
  if (ws) { state.detail = reason; ws.close(4000, reason.slice(0, 120)); }
}

async function receive(frame) {
  lastRecv = performance.now();
  let type;
  try { type = frameType(frame); } catch (err) { drop(`protocol error: ${err.message}`); return; }
  if (type === "PING" || type === "PONG" || type === "BYE" || type === "REFUSE" || phase !== "ready") {
    let message;
    try { message = await decodeFrame(frame); } catch (err) { drop(`protocol error: ${err.message}`); return; }
    control(message).catch((err) => drop(`error: ${err.message}`));
    return;
  }
  // LOAD / RUN / UNLOAD run one after another, in the order they came.
  chain = chain.then(async () => {
    let message;
    try { message = await decodeFrame(frame); } catch (err) { drop(`protocol error: ${err.message}`); return; }
    await work(message);
  });
}

async function control(m) {
  const h = m.header;
  if (m.type === "PING") { send("PONG", { seq: h.seq }); return; }
  if (m.type === "PONG") return;
  if (m.type === "BYE") { show("disconnected", `the coordinator said goodbye: ${h.reason || ""}`); ws && ws.close(); return; }
  if (m.type === "REFUSE") { refused = true; show("refused", h.reason || ""); ws && ws.close(); return; }
  if (phase === "hello" && m.type === "CHALLENGE") {
    if (h.version !== 1 || !["lz4", "zlib", "none"].includes(h.codec)) { drop(`unusable CHALLENGE ${JSON.stringify(h)}`); return; }
    nonce = unhex(h.nonce);
    myNonce = crypto.getRandomValues(new Uint8Array(32));
    phase = "auth";
    send("AUTH", { signature: await sign(token, nonce, "worker", { pureJs }), nonce: hex(myNonce) });
    return;
  }
  if (phase === "auth" && m.type === "WELCOME") {
    const expected = await sign(token, myNonce, "coordinator", { pureJs });
    if (!sameText(expected, h.signature)) { show("error", "the coordinator could not prove it knows the token"); ws.close(); return; }
    phase = "ready"; heartbeat = h.heartbeat; retryDelay = 1000;
    state.workerId = h.worker_id; $("worker").textContent = h.worker_id;
    show("connected", `worker ${h.worker_id} in the crowd at ${location.host}`);
    return;
  }
  drop(`unexpected ${m.type} during the handshake`);
}

// A LOAD from_cache: the partition's bytes from the cache, checked against its sha256 there.
async function cached(sha) {
  const bytes = cache ? await cache.get(sha) : null;
  if (bytes === null) throw new Error(`not in this page's cache (absent, or changed since it was stored): ${sha.slice(0, 12)}`);
  return bytes;
}

// A LOAD with the bytes: checked against the sha256, then kept in the cache (a full or failing
// store costs the cache entry, never the load).
async function received(sha, bytes) {
  if (!bytes) throw new Error("a LOAD that is not from_cache carries the partition as the blob 'model'");
  const digest = hex(await sha256(bytes, { pureJs }));
  if (digest !== sha) throw new Error(`SHA-256 mismatch: got ${digest}`);
  if (cache) await cache.put(sha, bytes).catch((err) => note(`${sha.slice(0, 12)} not cached: ${err.message}`));
  return bytes;
}

async function work(m) {
  const h = m.header;
  if (m.type === "LOAD") {
    const t0 = performance.now();
    try {
      const bytes = h.from_cache ? await cached(h.sha256) : await received(h.sha256, m.blobs.model);
      const capped = capIrVersion(bytes, MAX_IR_VERSION);
      if (capped.from !== capped.to) note(`${h.partition}: IR version ${capped.from} -> ${capped.to}`);
      const model = capped.bytes;
      modelBytes = model.byteLength; kept.clear();
      state.partition = h.partition; $("partition").textContent = `${h.partition} (${(modelBytes / MB).toFixed(1)} MB)`;
      await call("load", { model }, [model.buffer]);
      state.loads++;
      send("LOADED", { partition: h.partition, sha256: h.sha256, seconds: (performance.now() - t0) / 1000, rss: estimatedRss() });
      showCache().catch((err) => note(`cache unreadable: ${err.message}`));
    } catch (err) {
      state.partition = null; modelBytes = 0; $("partition").textContent = "none";
      send("FAILED", { load: h.partition, error: String(err.message || err) });
    }
  } else if (m.type === "UNLOAD") {
    kept.clear();
    await call("unload").catch(() => {});
    state.partition = null; modelBytes = 0; $("partition").textContent = "none";
    send("UNLOADED", { partition: h.partition, rss: estimatedRss() });
  } else if (m.type === "RUN") {
    try {
      for (const key of h.forget || []) kept.delete(key);
      const transfer = Object.values(m.tensors).filter((t) => t.data instanceof Uint8Array).map((t) => t.data.buffer);
      const inputs = { ...m.tensors };  // what the page keeps is copied to the compute worker, not moved
      const st = h.state;
      if (st) {
        const mine = kept.get(st.key) || {};
        for (const [, input] of st.pairs) {
          if (inputs[input]) continue;
          if (!mine[input]) throw new Error(`this page keeps no state ${JSON.stringify(st.key)} for ${input}`);
          inputs[input] = mine[input];
        }
        kept.delete(st.key);
      }
      const r = await call("run", { inputs, outputs: h.outputs }, transfer);
      let returned = h.outputs;
      if (st && st.keep) {
        kept.set(st.key, Object.fromEntries(st.pairs.map(([output, input]) => [input, r.outputs[output]])));
        const stays = new Set(st.pairs.map(([output]) => output).filter((o) => !st.shared.includes(o)));
        returned = h.outputs.filter((name) => !stays.has(name));
      }
      const sections = returned.map((name) => {
        const t = r.outputs[name];
        const raw = t.dtype === "string" ? stringsRaw(t.data) : t.data;
        return { name, dtype: DTYPE_CODE[t.dtype], shape: t.shape, raw };
      });
      const rss = estimatedRss();
      send("RESULT", { task: h.task, start: r.start / 1000, end: r.end / 1000, peak_rss: rss, rss }, sections);
      state.tasks++; $("tasks").textContent = String(state.tasks);
    } catch (err) {
      send("FAILED", { task: h.task, error: String(err.message || err) });
    }
  } else {
    drop(`a worker may not receive ${m.type}`);
  }
}

// ---- heartbeat (docs/protocol.md §8): from this thread, never blocked by compute ----
setInterval(() => {
  if (!ws || phase !== "ready") return;
  const t = performance.now();
  if (t - lastRecv > 3 * heartbeat * 1000) { drop(`no frame for ${((t - lastRecv) / 1000).toFixed(1)} s: the coordinator is gone`); return; }
  if (t - lastSent >= heartbeat * 1000) send("PING", { seq: ++pingSeq });
}, 250);

// A page that was in the background (or a screen that was off) comes back: if the coordinator
// gave up on it meanwhile, it rejoins as a new worker.
document.addEventListener("visibilitychange", () => {
  if (!document.hidden && !stopped && !ws) connect();
});

$("stop").onclick = () => {
  if (stopped) { stopped = false; $("stop").textContent = "stop"; connect(); return; }
  stopped = true; $("stop").textContent = "join again";
  if (ws) { send("BYE", { reason: "stopped on the page" }); ws.close(1000, "stopped"); }
  else show("stopped", "");
};
$("apply").onclick = () => {
  localStorage.setItem("crowdgraph-budget-mb", String(budgetMB()));
  state.announced = announce(); $("announced").textContent = `${(state.announced / MB).toFixed(0)} MB`;
  if (ws) { send("BYE", { reason: "memory budget changed; rejoining" }); ws.close(1000, "rejoin"); }
};

// ---- memory actually used, where the browser can measure it (cross-origin isolated pages) ----
async function measure() {
  if (!performance.measureUserAgentSpecificMemory || !self.crossOriginIsolated) {
    $("memory").textContent = "not measurable here (needs HTTPS or localhost)"; return;
  }
  try {
    const r = await performance.measureUserAgentSpecificMemory();
    state.memory = r.bytes; $("memory").textContent = `${(r.bytes / MB).toFixed(0)} MB`;
  } catch (err) { $("memory").textContent = `unavailable (${err.message})`; }
}
state.measure = measure;

async function main() {
  try { config = await (await fetch("/config.json")).json(); } catch { /* keep the defaults */ }
  const wanted = Number(params.get("threads")) || (self.crossOriginIsolated ? Math.min(navigator.hardwareConcurrency || 1, 4) : 1);
  state.threads = self.crossOriginIsolated ? Math.max(1, wanted) : 1;
  await call("init", { threads: state.threads });
  const bound = params.has("cache") ? Math.max(0, Number(params.get("cache")) || 0) * MB : null;
  cache = await openCache({ store: params.get("store") || "", bound }).catch((err) => {
    note(`no partition cache: ${err.message}`); return null;
  });
  await showCache();
  $("threads").textContent = `${state.threads}${state.isolated ? " (cross-origin isolated)" : " (not isolated: one thread)"}`;
  connect();
  measure();
  setInterval(measure, 30000);
}
main().catch((err) => show("error", String(err.message || err)));
