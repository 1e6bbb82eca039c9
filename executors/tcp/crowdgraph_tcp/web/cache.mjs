// The worker page's partition cache: partitions kept across reloads by their sha256, so a page
// that comes back announces them in HELLO (`cached`, docs/protocol.md §6) like crowdgraph-worker
// and loads them from local storage (tier 2) instead of over the network.
//
// Where: the Origin Private File System (navigator.storage.getDirectory, one file per partition)
// where the browser can write it from a page, else IndexedDB (plain http on a LAN has no OPFS).
// Every entry is checked against its sha256 before use; a changed one is removed and the page
// answers FAILED, so the coordinator sends the bytes.  The cache stays under a size bound, least
// recently used out first; the use times live in localStorage, shared by the origin's tabs as the
// stores are.
import { sha256, hex } from "/proto.mjs";

// Most digests announced in HELLO, as crowdgraph-worker (far below the 1 MiB handshake limit).
export const MAX_ANNOUNCED = 10000;
// Bound when the page is given none: 1 GB, or half of what the browser lets this origin store.
export const DEFAULT_BOUND = 1e9;
// The OPFS folder and the IndexedDB database that hold the partitions.
export const STORE_NAME = "crowdgraph-partitions";
const USED_KEY = "crowdgraph-partitions-used";    // localStorage: {sha256: last use, ms}
const ENTRY = /^[0-9a-f]{64}$/;

// ---- decisions, over plain entries {sha, size, used} ----

// The entries to remove, least recently used first, so that `incoming` more bytes stay within `bound`.
export function evictions(entries, incoming, bound) {
  let total = entries.reduce((sum, e) => sum + e.size, 0);
  const out = [];
  for (const e of [...entries].sort((a, b) => a.used - b.used)) {
    if (total + incoming <= bound) break;
    out.push(e.sha); total -= e.size;
  }
  return out;
}

// The digests HELLO announces: most recently used first, at most `max`.
export function announced(entries, max = MAX_ANNOUNCED) {
  return [...entries].sort((a, b) => b.used - a.used).slice(0, max).map((e) => e.sha);
}

// ---- stores: list, read, write, remove; nothing else ----

class OpfsStore {
  static async open() {
    const writable = typeof FileSystemFileHandle !== "undefined"
      && typeof FileSystemFileHandle.prototype.createWritable === "function";
    if (!navigator.storage?.getDirectory || !writable) return null;   // e.g. http on a LAN
    const root = await navigator.storage.getDirectory();
    return new OpfsStore(await root.getDirectoryHandle(STORE_NAME, { create: true }));
  }
  constructor(folder) { this.folder = folder; this.kind = "opfs"; }
  async list() {
    const out = [];
    for await (const [name, handle] of this.folder.entries()) {
      const sha = name.slice(0, 64);
      if (handle.kind !== "file" || name !== `${sha}.onnx` || !ENTRY.test(sha)) continue;
      const size = (await handle.getFile()).size;
      if (size) out.push({ sha, size });
      else await this.remove(sha);                  // created, never written (a tab closed mid-write)
    }
    return out;
  }
  async read(sha) {
    try {
      const file = await (await this.folder.getFileHandle(`${sha}.onnx`)).getFile();
      return new Uint8Array(await file.arrayBuffer());
    } catch (err) {
      if (err.name === "NotFoundError") return null;
      throw err;
    }
  }
  async write(sha, bytes) {
    const out = await (await this.folder.getFileHandle(`${sha}.onnx`, { create: true })).createWritable();
    try { await out.write(bytes); await out.close(); }    // the file changes at close(), all at once
    catch (err) { await out.abort().catch(() => {}); throw err; }
  }
  async remove(sha) {
    await this.folder.removeEntry(`${sha}.onnx`).catch((err) => { if (err.name !== "NotFoundError") throw err; });
  }
}

const completed = (request) => new Promise((resolve, reject) => {
  request.onsuccess = () => resolve(request.result);
  request.onerror = () => reject(request.error);
});
const committed = (tx) => new Promise((resolve, reject) => {
  tx.oncomplete = () => resolve();
  tx.onerror = tx.onabort = () => reject(tx.error || new Error("IndexedDB transaction aborted"));
});

class IndexedDbStore {   // two object stores written in one transaction: "bytes" and "sizes", by sha256
  static async open() {
    if (typeof indexedDB === "undefined") return null;
    const request = indexedDB.open(STORE_NAME, 1);
    request.onupgradeneeded = () => { for (const name of ["bytes", "sizes"]) request.result.createObjectStore(name); };
    return new IndexedDbStore(await completed(request));
  }
  constructor(db) { this.db = db; this.kind = "indexeddb"; }
  async list() {
    const sizes = this.db.transaction("sizes").objectStore("sizes");
    const [keys, values] = await Promise.all([completed(sizes.getAllKeys()), completed(sizes.getAll())]);
    return keys.map((sha, i) => ({ sha, size: values[i] })).filter((e) => ENTRY.test(e.sha));
  }
  async read(sha) {
    const value = await completed(this.db.transaction("bytes").objectStore("bytes").get(sha));
    return value === undefined ? null : new Uint8Array(value);
  }
  async write(sha, bytes) {
    const tx = this.db.transaction(["bytes", "sizes"], "readwrite");
    tx.objectStore("bytes").put(bytes.slice().buffer, sha);
    tx.objectStore("sizes").put(bytes.length, sha);
    await committed(tx);
  }
  async remove(sha) {
    const tx = this.db.transaction(["bytes", "sizes"], "readwrite");
    for (const name of ["bytes", "sizes"]) tx.objectStore(name).delete(sha);
    await committed(tx);
  }
}

// ---- the cache ----

export class PartitionCache {
  constructor(store, bound) { this.store = store; this.kind = store.kind; this.bound = bound; }

  usedTimes() {
    try { return JSON.parse(localStorage.getItem(USED_KEY) || "{}"); } catch { return {}; }
  }

  async entries() {
    const used = this.usedTimes(), listed = await this.store.list();
    const kept = Object.fromEntries(listed.filter((e) => used[e.sha]).map((e) => [e.sha, used[e.sha]]));
    localStorage.setItem(USED_KEY, JSON.stringify(kept));   // forget the use times of removed entries
    return listed.map((e) => ({ ...e, used: used[e.sha] || 0 }));
  }

  touch(sha) {
    localStorage.setItem(USED_KEY, JSON.stringify({ ...this.usedTimes(), [sha]: Date.now() }));
  }

  // Digests to announce in HELLO.
  async digests() { return announced(await this.entries()); }

  // Total bytes and count, for the page.
  async usage() {
    const entries = await this.entries();
    return { entries: entries.length, bytes: entries.reduce((sum, e) => sum + e.size, 0) };
  }

  // The bytes of `sha`, checked against it; null when absent or changed (then removed).
  async get(sha) {
    if (!ENTRY.test(sha)) return null;
    const bytes = await this.store.read(sha);
    if (bytes === null) return null;
    if (hex(await sha256(bytes)) !== sha) { await this.store.remove(sha); return null; }
    this.touch(sha);
    return bytes;
  }

  // Keep `bytes` (already checked against `sha`), evicting the least recently used to stay within
  // the bound; a partition larger than the whole bound is not kept.  Returns whether it was kept.
  async put(sha, bytes) {
    if (bytes.length > this.bound) return false;
    const others = (await this.entries()).filter((e) => e.sha !== sha);
    for (const old of evictions(others, bytes.length, this.bound)) await this.store.remove(old);
    await this.store.write(sha, bytes);
    this.touch(sha);
    return true;
  }

  // Remove entries until the cache fits its bound (it may have shrunk since the last visit).
  async trim() {
    for (const old of evictions(await this.entries(), 0, this.bound)) await this.store.remove(old);
  }
}

// The page's cache: `store` "opfs" or "indexeddb" picks one (tests), "none" or a bound of 0 turns
// the cache off; by default OPFS, else IndexedDB.  Null when there is none to be had.
export async function openCache({ store = "", bound = null } = {}) {
  if (store === "none" || bound === 0) return null;
  const kinds = store ? [store] : ["opfs", "indexeddb"];
  for (const kind of kinds) {
    const opened = await (kind === "opfs" ? OpfsStore : kind === "indexeddb" ? IndexedDbStore : null)?.open();
    if (!opened) continue;
    if (bound === null) {
      const quota = (await navigator.storage?.estimate?.())?.quota;
      bound = quota ? Math.min(DEFAULT_BOUND, quota / 2) : DEFAULT_BOUND;
    }
    const cache = new PartitionCache(opened, bound);
    await cache.trim();
    return cache;
  }
  return null;
}
