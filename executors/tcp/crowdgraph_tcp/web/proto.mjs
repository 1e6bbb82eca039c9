// The crowdgraph wire protocol (docs/protocol.md) for the browser: frames, codecs, CRC-32,
// SHA-256 and HMAC-SHA256.  No dependencies; the frame code follows the reference in §10.
// SHA-256/HMAC are pure JS so authentication also works over plain http on a LAN, where the
// Web Crypto API (crypto.subtle) does not exist; crypto.subtle is used when it does.

export const TYPES = { 1: "HELLO", 2: "CHALLENGE", 3: "AUTH", 4: "WELCOME", 5: "REFUSE", 6: "BYE",
  7: "PING", 8: "PONG", 16: "LOAD", 17: "LOADED", 18: "UNLOAD", 19: "UNLOADED",
  32: "RUN", 33: "RESULT", 34: "FAILED", 48: "CROWD", 49: "JOINED", 50: "LOST" };
export const CODES = Object.fromEntries(Object.entries(TYPES).map(([k, v]) => [v, Number(k)]));
// code -> [wire name, element size, onnxruntime-web type or null]
export const DTYPES = { 1: ["float32", 4, "float32"], 2: ["uint8", 1, "uint8"], 3: ["int8", 1, "int8"],
  4: ["uint16", 2, "uint16"], 5: ["int16", 2, "int16"], 6: ["int32", 4, "int32"], 7: ["int64", 8, "int64"],
  8: ["string", 0, "string"], 9: ["bool", 1, "bool"], 10: ["float16", 2, "float16"],
  11: ["float64", 8, "float64"], 12: ["uint32", 4, "uint32"], 13: ["uint64", 8, "uint64"],
  14: ["complex64", 8, null], 15: ["complex128", 16, null], 16: ["bfloat16", 2, null],
  17: ["float8e4m3fn", 1, null], 18: ["float8e4m3fnuz", 1, null], 19: ["float8e5m2", 1, null],
  20: ["float8e5m2fnuz", 1, null] };
export const DTYPE_CODE = Object.fromEntries(Object.entries(DTYPES).map(([k, v]) => [v[0], Number(k)]));

const CRC_TABLE = new Uint32Array(256).map((_, n) => {
  let c = n;
  for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
  return c >>> 0;
});
export function crc32(bytes) {
  let c = 0xffffffff;
  for (let i = 0; i < bytes.length; i++) c = CRC_TABLE[(c ^ bytes[i]) & 0xff] ^ (c >>> 8);
  return (c ^ 0xffffffff) >>> 0;
}

export function lz4BlockDecompress(src, rawLength) {
  const dst = new Uint8Array(rawLength);
  const fail = (why) => { throw new Error("corrupt lz4 block: " + why); };
  let s = 0, d = 0;
  const more = (n) => {
    let b;
    do { if (s >= src.length) fail("truncated length"); b = src[s++]; n += b; } while (b === 255);
    return n;
  };
  while (s < src.length) {
    const token = src[s++];
    let literals = token >>> 4;
    if (literals === 15) literals = more(literals);
    if (s + literals > src.length || d + literals > rawLength) fail("literals overrun");
    dst.set(src.subarray(s, s + literals), d); s += literals; d += literals;
    if (s === src.length) break;
    if (s + 2 > src.length) fail("truncated offset");
    const offset = src[s] | (src[s + 1] << 8); s += 2;
    if (offset === 0 || offset > d) fail("offset outside the output");
    let match = token & 15;
    if (match === 15) match = more(match);
    match += 4;
    if (d + match > rawLength) fail("match overruns raw_length");
    for (let i = 0; i < match; i++, d++) dst[d] = dst[d - offset];
  }
  if (d !== rawLength) fail(`decompressed to ${d} bytes, expected ${rawLength}`);
  return dst;
}

export const HAS_INFLATE = typeof DecompressionStream !== "undefined";

// zlib (RFC 1950) through DecompressionStream("deflate"); stops past rawLength (no bombs).
export async function inflate(payload, rawLength) {
  const stream = new Blob([payload]).stream().pipeThrough(new DecompressionStream("deflate"));
  const reader = stream.getReader(), out = new Uint8Array(rawLength);
  let at = 0;
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    if (at + value.length > rawLength) { reader.cancel(); throw new Error("zlib payload inflates past raw_length"); }
    out.set(value, at); at += value.length;
  }
  if (at !== rawLength) throw new Error(`zlib payload inflated to ${at} bytes, expected ${rawLength}`);
  return out;
}

function unshuffle(data, itemsize) {
  const n = data.length / itemsize, out = new Uint8Array(data.length);
  for (let j = 0; j < itemsize; j++)
    for (let i = 0; i < n; i++) out[i * itemsize + j] = data[j * n + i];
  return out;
}

const utf8d = new TextDecoder("utf-8", { fatal: true }), utf8e = new TextEncoder();

export function frameType(frame) {
  if (frame.length < 24 || frame[0] !== 0x43 || frame[1] !== 0x52 || frame[2] !== 0x57 || frame[3] !== 0x44)
    throw new Error("not a crowdgraph frame");
  const type = TYPES[frame[4] === 1 ? frame[5] : -1];
  if (!type) throw new Error("unsupported version or type");
  return type;
}

// One frame (one WebSocket message) -> {type, header, tensors: {name: {dtype, shape, data}}, blobs}.
export async function decodeFrame(frame) {
  const view = new DataView(frame.buffer, frame.byteOffset, frame.byteLength);
  const u64 = (at) => {
    const v = view.getBigUint64(at, true);
    if (v > BigInt(Number.MAX_SAFE_INTEGER)) throw new Error("length too large");
    return Number(v);
  };
  const type = frameType(frame);
  if (view.getUint16(6, true) !== 0) throw new Error("unsupported flags");
  const bodyLength = u64(8), controlLength = view.getUint32(16, true), count = view.getUint32(20, true);
  if (24 + bodyLength !== frame.length) throw new Error("frame length mismatch");
  const message = { type, header: JSON.parse(utf8d.decode(frame.subarray(24, 24 + controlLength))),
                    tensors: {}, blobs: {} };
  let at = 24 + controlLength;
  for (let k = 0; k < count; k++) {
    if (at + 28 > frame.length) throw new Error("section header overruns the frame");
    const kind = frame[at], dtype = frame[at + 1], codec = frame[at + 2], flags = frame[at + 3];
    const nameLength = view.getUint16(at + 4, true), ndim = frame[at + 6];
    const rawLength = u64(at + 8), payloadLength = u64(at + 16), crc = view.getUint32(at + 24, true);
    at += 28;
    const name = utf8d.decode(frame.subarray(at, at + nameLength)); at += nameLength;
    const shape = [];
    for (let i = 0; i < ndim; i++, at += 8) shape.push(u64(at));
    if (at + payloadLength > frame.length) throw new Error("payload overruns the frame");
    const payload = frame.subarray(at, at + payloadLength); at += payloadLength;
    let raw = codec === 0 ? new Uint8Array(payload)
            : codec === 1 ? lz4BlockDecompress(payload, rawLength)
            : codec === 2 ? await inflate(payload, rawLength) : null;
    if (raw === null || raw.length !== rawLength) throw new Error(`${name}: bad codec or raw length`);
    if (flags & 1) raw = unshuffle(raw, DTYPES[dtype][1]);
    if (crc32(raw) !== crc) throw new Error(`${name}: CRC-32 mismatch`);
    if (kind === 2) { message.blobs[name] = raw; continue; }
    if (!DTYPES[dtype]) throw new Error(`${name}: unknown dtype ${dtype}`);
    let data = raw;
    if (DTYPES[dtype][0] === "string") {
      const n = shape.reduce((a, b) => a * b, 1), lengths = new DataView(raw.buffer, raw.byteOffset);
      data = [];
      for (let i = 0, p = 4 * n; i < n; i++) {
        const length = lengths.getUint32(4 * i, true);
        data.push(utf8d.decode(raw.subarray(p, p + length))); p += length;
      }
    }
    message.tensors[name] = { dtype: DTYPES[dtype][0], shape, data };
  }
  if (at !== frame.length) throw new Error("trailing bytes after the last section");
  return message;
}

export function stringsRaw(strings) {
  const encoded = strings.map((s) => utf8e.encode(s));
  const raw = new Uint8Array(4 * encoded.length + encoded.reduce((a, e) => a + e.length, 0));
  const view = new DataView(raw.buffer);
  let p = 4 * encoded.length;
  encoded.forEach((e, i) => { view.setUint32(4 * i, e.length, true); raw.set(e, p); p += e.length; });
  return raw;
}

// Uncompressed frame; sections: [{name, dtype (code), shape, raw: Uint8Array}].
export function encodeFrame(typeName, header, sections = []) {
  const control = utf8e.encode(JSON.stringify(header));
  const parts = [control];
  for (const { name, dtype, shape, raw } of sections) {
    const nameBytes = utf8e.encode(name), head = new DataView(new ArrayBuffer(28 + nameBytes.length + 8 * shape.length));
    head.setUint8(0, 1); head.setUint8(1, dtype);
    head.setUint16(4, nameBytes.length, true); head.setUint8(6, shape.length);
    head.setBigUint64(8, BigInt(raw.length), true); head.setBigUint64(16, BigInt(raw.length), true);
    head.setUint32(24, crc32(raw), true);
    new Uint8Array(head.buffer).set(nameBytes, 28);
    shape.forEach((dim, i) => head.setBigUint64(28 + nameBytes.length + 8 * i, BigInt(dim), true));
    parts.push(new Uint8Array(head.buffer), raw);
  }
  const bodyLength = parts.reduce((sum, p) => sum + p.length, 0);
  const frame = new Uint8Array(24 + bodyLength), view = new DataView(frame.buffer);
  frame.set([0x43, 0x52, 0x57, 0x44, 1, CODES[typeName]]);
  view.setBigUint64(8, BigInt(bodyLength), true);
  view.setUint32(16, control.length, true); view.setUint32(20, sections.length, true);
  let at = 24;
  for (const p of parts) { frame.set(p, at); at += p.length; }
  return frame;
}

// ---- SHA-256 and HMAC-SHA256 in pure JS (FIPS 180-4, RFC 2104) ----
const K = new Uint32Array([
  0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
  0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
  0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
  0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
  0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
  0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
  0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
  0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2]);

export function sha256js(bytes) {
  const n = bytes.length, total = ((n + 9 + 63) >> 6) << 6;
  const tail = new Uint8Array(total - (n & ~63));
  tail.set(bytes.subarray(n & ~63)); tail[n & 63] = 0x80;
  const tv = new DataView(tail.buffer);
  tv.setUint32(tail.length - 8, Math.floor(n / 0x20000000), false);
  tv.setUint32(tail.length - 4, (n << 3) >>> 0, false);
  const H = new Uint32Array([0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19]);
  const W = new Uint32Array(64);
  const mainView = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const block = (v, off) => {
    for (let i = 0; i < 16; i++) W[i] = v.getUint32(off + 4 * i, false);
    for (let i = 16; i < 64; i++) {
      const a = W[i - 15], b = W[i - 2];
      const s0 = ((a >>> 7) | (a << 25)) ^ ((a >>> 18) | (a << 14)) ^ (a >>> 3);
      const s1 = ((b >>> 17) | (b << 15)) ^ ((b >>> 19) | (b << 13)) ^ (b >>> 10);
      W[i] = (W[i - 16] + s0 + W[i - 7] + s1) | 0;
    }
    let a = H[0], b = H[1], c = H[2], d = H[3], e = H[4], f = H[5], g = H[6], h = H[7];
    for (let i = 0; i < 64; i++) {
      const S1 = ((e >>> 6) | (e << 26)) ^ ((e >>> 11) | (e << 21)) ^ ((e >>> 25) | (e << 7));
      const t1 = (h + S1 + ((e & f) ^ (~e & g)) + K[i] + W[i]) | 0;
      const S0 = ((a >>> 2) | (a << 30)) ^ ((a >>> 13) | (a << 19)) ^ ((a >>> 22) | (a << 10));
      const t2 = (S0 + ((a & b) ^ (a & c) ^ (b & c))) | 0;
      h = g; g = f; f = e; e = (d + t1) | 0; d = c; c = b; b = a; a = (t1 + t2) | 0;
    }
    H[0] += a; H[1] += b; H[2] += c; H[3] += d; H[4] += e; H[5] += f; H[6] += g; H[7] += h;
  };
  for (let off = 0; off + 64 <= (n & ~63); off += 64) block(mainView, off);
  for (let off = 0; off < tail.length; off += 64) block(tv, off);
  const out = new Uint8Array(32), ov = new DataView(out.buffer);
  H.forEach((x, i) => ov.setUint32(4 * i, x, false));
  return out;
}

export function hmacSha256js(key, message) {
  if (key.length > 64) key = sha256js(key);
  const ipad = new Uint8Array(64 + message.length), opad = new Uint8Array(64 + 32);
  for (let i = 0; i < 64; i++) { const k = i < key.length ? key[i] : 0; ipad[i] = k ^ 0x36; opad[i] = k ^ 0x5c; }
  ipad.set(message, 64);
  opad.set(sha256js(ipad), 64);
  return sha256js(opad);
}

const subtle = (typeof crypto !== "undefined" && crypto.subtle) || null;
export const hex = (bytes) => Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
export const unhex = (text) => new Uint8Array(text.match(/../g).map((h) => parseInt(h, 16)));

export async function sha256(bytes, { pureJs = false } = {}) {
  if (subtle && !pureJs) return new Uint8Array(await subtle.digest("SHA-256", bytes));
  return sha256js(bytes);
}

// docs/protocol.md §7.3: HMAC-SHA256(token, "crowdgraph <role> " || nonce bytes), lowercase hex.
export async function sign(tokenBytes, nonceBytes, role, { pureJs = false } = {}) {
  const prefix = utf8e.encode(`crowdgraph ${role} `);
  const message = new Uint8Array(prefix.length + nonceBytes.length);
  message.set(prefix); message.set(nonceBytes, prefix.length);
  if (subtle && !pureJs) {
    const key = await subtle.importKey("raw", tokenBytes, { name: "HMAC", hash: "SHA-256" }, false, ["sign"]);
    return hex(new Uint8Array(await subtle.sign("HMAC", key, message)));
  }
  return hex(hmacSha256js(tokenBytes, message));
}

export function sameText(a, b) {   // constant time for equal lengths
  if (typeof a !== "string" || typeof b !== "string" || a.length !== b.length) return false;
  let diff = 0;
  for (let i = 0; i < a.length; i++) diff |= a.charCodeAt(i) ^ b.charCodeAt(i);
  return diff === 0;
}

// Cap the ModelProto's ir_version (field 1, varint) at maxIr: onnxruntime-web refuses IR
// versions newer than it knows, and crowdgraph's partitions keep their source model's IR.
export function capIrVersion(bytes, maxIr) {
  let p = 0;
  const varint = () => {
    let v = 0, mul = 1, b;
    do { if (p >= bytes.length) throw new Error("truncated ONNX model"); b = bytes[p++]; v += (b & 0x7f) * mul; mul *= 128; } while (b & 0x80);
    return v;
  };
  while (p < bytes.length) {
    const start = p, tag = varint(), field = Math.floor(tag / 8), wt = tag & 7;
    if (field === 1 && wt === 0) {
      const valueStart = p, value = varint();
      if (value <= maxIr) return { bytes, from: value, to: value };
      const enc = []; let v = maxIr;
      do { enc.push((v & 0x7f) | (v > 0x7f ? 0x80 : 0)); v >>>= 7; } while (v);
      const out = new Uint8Array(bytes.length - (p - valueStart) + enc.length);
      out.set(bytes.subarray(0, valueStart)); out.set(enc, valueStart); out.set(bytes.subarray(p), valueStart + enc.length);
      return { bytes: out, from: value, to: maxIr };
    }
    if (wt === 0) varint();
    else if (wt === 1) p += 8;
    else if (wt === 5) p += 4;
    else if (wt === 2) { const len = varint(); p += len; }
    else throw new Error(`unexpected protobuf wire type ${wt} at byte ${start}`);
  }
  return { bytes, from: null, to: null };
}
