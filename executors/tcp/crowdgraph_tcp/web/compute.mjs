// The compute side of the worker page: a module Web Worker that holds one onnxruntime-web
// session (one partition resident at a time) and runs tasks.  The page's main thread keeps
// the WebSocket and the heartbeat, so a long task never silences the worker.
import * as ort from "/ort/ort.wasm.min.mjs";

const TYPED = { float32: Float32Array, float64: Float64Array, int32: Int32Array, int64: BigInt64Array,
  uint64: BigUint64Array, uint32: Uint32Array, int16: Int16Array, uint16: Uint16Array, int8: Int8Array,
  uint8: Uint8Array, bool: Uint8Array, float16: Uint16Array };

let session = null, modelBytes = 0;

async function handle(m) {
  switch (m.op) {
    case "init":
      ort.env.wasm.wasmPaths = "/ort/";
      ort.env.wasm.numThreads = m.threads;
      ort.env.logLevel = "error";
      return { threads: m.threads, isolated: self.crossOriginIsolated === true };
    case "load": {
      if (session) { await session.release(); session = null; }
      session = await ort.InferenceSession.create(m.model, {
        executionProviders: ["wasm"], graphOptimizationLevel: "all", enableCpuMemArena: false });
      modelBytes = m.model.byteLength;
      return { inputs: session.inputNames, outputs: session.outputNames };
    }
    case "unload":
      if (session) { await session.release(); session = null; modelBytes = 0; }
      return {};
    case "run": {
      if (!session) throw new Error("no partition is loaded");
      const feeds = {};
      for (const [name, t] of Object.entries(m.inputs)) {
        if (t.dtype === "string") { feeds[name] = new ort.Tensor("string", t.data, t.shape); continue; }
        const Typed = TYPED[t.dtype];
        if (!Typed) throw new Error(`${name}: dtype ${t.dtype} is not supported by onnxruntime-web`);
        const raw = t.data;   // a fresh Uint8Array with its own buffer (offset 0)
        feeds[name] = new ort.Tensor(t.dtype, new Typed(raw.buffer, raw.byteOffset, raw.byteLength / Typed.BYTES_PER_ELEMENT), t.shape);
      }
      const start = performance.now();
      const results = await session.run(feeds, m.outputs);
      const end = performance.now();
      const outputs = {}, transfer = [];
      for (const name of m.outputs) {
        const t = results[name];
        if (t.type === "string") { outputs[name] = { dtype: "string", shape: t.dims, data: t.data }; continue; }
        const d = t.data, bytes = new Uint8Array(d.buffer, d.byteOffset, d.byteLength).slice();
        outputs[name] = { dtype: t.type, shape: t.dims, data: bytes };
        transfer.push(bytes.buffer);
        t.dispose?.();
      }
      return { outputs, start, end, transfer };
    }
    default:
      throw new Error(`unknown op ${m.op}`);
  }
}

self.onmessage = async (event) => {
  const m = event.data;
  try {
    const answer = await handle(m);
    const transfer = answer.transfer || [];
    delete answer.transfer;
    self.postMessage({ id: m.id, ok: true, ...answer }, transfer);
  } catch (err) {
    self.postMessage({ id: m.id, ok: false, error: `${err && err.name || "Error"}: ${err && err.message || err}` });
  }
};
