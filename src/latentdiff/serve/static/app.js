// latentdiff web UI: plain JS, no dependencies, talks only to the server that served it.
"use strict";
const $ = (id) => document.getElementById(id);
let models = [], current = null, selected = null, animTimer = null, inputImage = null, inputSize = null;
const undoStack = [];

function showError(msg) { const e = $("error"); e.textContent = msg; e.hidden = !msg; }

function headers(extra) {
  const h = Object.assign({}, extra || {});
  const t = sessionStorage.getItem("latentdiff-token");
  if (t) h["Authorization"] = "Bearer " + t;
  return h;
}

async function api(path, opts) {
  opts = opts || {};
  let r;
  try { r = await fetch(path, Object.assign({}, opts, { headers: headers(opts.headers) })); }
  catch (e) { throw new Error("cannot reach the server (" + e.message + ")"); }
  if (r.status === 401) { $("token-box").hidden = false; }
  if (!r.ok) {
    let msg = r.status + " " + r.statusText;
    try { const b = await r.json(); if (b.error) msg = b.error; } catch (e) { /* not JSON */ }
    if (r.status === 429) msg += " (server busy)";
    throw new Error(msg);
  }
  return r;
}

async function imageURL(path) {  // fetched with the token header; shown through a blob: URL
  const r = await api(path);
  const blob = await r.blob();
  return { url: URL.createObjectURL(blob), buffer: await blob.arrayBuffer() };
}

function pngText(buffer) {  // the tEXt chunks of a PNG: {keyword: text}
  const v = new DataView(buffer), out = {};
  let p = 8;
  while (p + 8 <= v.byteLength) {
    const len = v.getUint32(p), type = String.fromCharCode(...new Uint8Array(buffer, p + 4, 4));
    if (type === "tEXt") {
      const data = new Uint8Array(buffer, p + 8, len), zero = data.indexOf(0);
      out[new TextDecoder("latin1").decode(data.slice(0, zero))] = new TextDecoder("latin1").decode(data.slice(zero + 1));
    }
    if (type === "IEND") break;
    p += 12 + len;
  }
  return out;
}

function kind() { return document.querySelector("input[name=kind]:checked").value; }

function updateVisibility() {
  const k = kind(), cond = current ? current.conditioning : "none";
  document.querySelectorAll("[data-kind]").forEach((el) => { el.hidden = !el.dataset.kind.split(" ").includes(k); });
  document.querySelectorAll("[data-cond]").forEach((el) => { el.hidden = el.dataset.cond !== cond; });
  document.body.dataset.modality = current ? current.modality : "image";
  $("submit").textContent = { generate: "Generate", edit: "Edit", inpaint: "Inpaint", interpolate: "Interpolate" }[k];
}

function selectModel() {
  current = models.find((m) => m.name === $("model").value);
  $("class").innerHTML = "";
  $("class").append(new Option("(none)", ""));
  current.classes.forEach((c, i) => $("class").append(new Option(i + ": " + c, i)));
  if (current.classes.length) $("class").value = "0";
  $("sampler").innerHTML = "";
  current.samplers.forEach((s) => $("sampler").append(new Option(s, s)));
  $("sampler").value = current.defaults.sampler;
  $("steps").value = current.defaults.steps;
  $("guidance").value = current.defaults.guidance;
  updateVisibility();
}

function intField(id) { const v = $(id).value; return v === "" ? undefined : Number(v); }

function buildBody() {
  const k = kind();
  if ($("random-seed").checked) $("seed").value = Math.floor(Math.random() * 2 ** 31);
  const body = { kind: k, model: current.name, sampler: $("sampler").value, steps: intField("steps"),
                 guidance: intField("guidance"), seed: intField("seed") };
  if (current.conditioning === "class" && $("class").value !== "") body["class"] = Number($("class").value);
  if (current.conditioning === "text") body.prompt = $("prompt").value;
  if (k === "generate") body.n = intField("n");
  if (k === "edit" || k === "inpaint") {
    if (!inputImage) throw new Error("choose an input image first");
    body.image = inputImage;
  }
  if (k === "edit") body.strength = Number($("strength").value);
  if (k === "inpaint") body.mask = maskPNG();
  if (k === "interpolate") { body.seeds = [intField("seed-a"), intField("seed-b")]; body.frames = intField("frames");
                             delete body.sampler; }
  return body;
}

async function submit(ev) {
  ev.preventDefault();
  showError("");
  let body;
  try { body = buildBody(); } catch (e) { showError(e.message); return; }
  try {
    const r = await api("/v1/jobs", { method: "POST", headers: { "Content-Type": "application/json" },
                                      body: JSON.stringify(body) });
    const job = await r.json();
    $("cancel").disabled = false;
    $("cancel").dataset.job = job.id;
    $("status").textContent = "queued";
    await follow(job.id);
  } catch (e) { showError(e.message); }
}

async function follow(id) {  // server-sent events over fetch (EventSource cannot send the token header)
  const r = await api("/v1/jobs/" + id + "/events");
  const reader = r.body.getReader(), dec = new TextDecoder();
  let buf = "", done = false;
  while (!done) {
    const chunk = await reader.read();
    if (chunk.done) break;
    buf += dec.decode(chunk.value, { stream: true });
    const parts = buf.split(/\r?\n\r?\n/);
    buf = parts.pop();
    for (const part of parts) {
      let event = "message", data = "";
      part.split(/\r?\n/).forEach((ln) => {
        if (ln.startsWith("event:")) event = ln.slice(6).trim();
        else if (ln.startsWith("data:")) data += ln.slice(5).trim();
      });
      if (!data) continue;
      const d = JSON.parse(data);
      if (event === "progress") onProgress(d);
      if (event === "end") { await onEnd(d); done = true; }
    }
  }
}

function onProgress(d) {
  $("progress").max = d.total || 1;
  $("progress").value = d.step;
  $("status").textContent = d.status === "queued" ? "queued (position " + d.position + ")"
                                                  : "step " + d.step + " / " + d.total;
  if (d.preview) { $("preview").src = "data:image/png;base64," + d.preview; $("preview").hidden = false; }
}

async function onEnd(job) {
  $("cancel").disabled = true;
  $("status").textContent = job.status + (job.error ? ": " + job.error : "");
  if (job.status === "failed") showError(job.error);
  if (job.status !== "done") return;
  $("progress").value = $("progress").max;
  $("result").innerHTML = "";
  const frames = [], sounds = job.audio || [];
  for (const [i, path] of job.images.entries()) {
    const { url, buffer } = await imageURL(path);
    frames.push(url);
    const parent = sounds[i] ? document.createElement("figure") : $("result");
    const img = addThumb(parent, url, buffer, path);
    img.className = "result";
    if (sounds[i]) { parent.className = "sound"; parent.append(await audioElement(sounds[i])); $("result").append(parent); }
    addThumb($("gallery"), url, buffer, path, true);
  }
  if (job.kind === "interpolate") animate(frames);
}

async function audioElement(path) {  // the WAV fetched with the token header, played from a blob: URL
  const el = document.createElement("audio");
  el.controls = true;
  el.preload = "metadata";
  el.title = path;
  el.src = (await imageURL(path)).url;
  return el;
}

function animate(frames) {
  clearInterval(animTimer);
  let i = 0;
  $("anim").hidden = false;
  $("anim").src = frames[0];
  animTimer = setInterval(() => { i = (i + 1) % frames.length; $("anim").src = frames[i]; }, 150);
}

function addThumb(parent, url, buffer, path, first) {
  const img = new Image();
  img.src = url;
  img.alt = path;
  img.addEventListener("click", () => select(img, url, buffer));
  if (first) parent.prepend(img); else parent.append(img);
  return img;
}

function select(img, url, buffer) {
  document.querySelectorAll("#gallery img.selected").forEach((e) => e.classList.remove("selected"));
  img.classList.add("selected");
  const text = pngText(buffer);
  let record = {};
  try { record = JSON.parse(text.latentdiff || "{}"); } catch (e) { record = {}; }
  selected = { url, record };
  $("details").hidden = false;
  $("details-img").src = url;
  $("settings").textContent = Object.entries(record).map(([k, v]) => k + ": " + JSON.stringify(v)).join("\n");
}

async function cancel() {
  const id = $("cancel").dataset.job;
  if (!id) return;
  try { await api("/v1/jobs/" + id + "/cancel", { method: "POST" }); } catch (e) { showError(e.message); }
}

// --- input image and mask painting ---------------------------------------------------------------

function setInput(dataURL) {
  const img = new Image();
  img.onload = () => {
    inputImage = dataURL;
    inputSize = [img.naturalWidth, img.naturalHeight];
    const ctx = $("image-canvas").getContext("2d");
    ctx.imageSmoothingEnabled = false;
    ctx.clearRect(0, 0, 280, 280);
    ctx.drawImage(img, 0, 0, 280, 280);
    clearMask();
  };
  img.src = dataURL;
}

function clearMask() { $("mask-canvas").getContext("2d").clearRect(0, 0, 280, 280); undoStack.length = 0; }

function paintAt(ev) {
  const c = $("mask-canvas"), ctx = c.getContext("2d"), r = c.getBoundingClientRect();
  ctx.globalCompositeOperation = $("eraser").checked ? "destination-out" : "source-over";
  ctx.fillStyle = "rgba(255, 40, 40, 0.6)";
  ctx.beginPath();
  ctx.arc(ev.clientX - r.left, ev.clientY - r.top, Number($("brush").value) / 2, 0, 2 * Math.PI);
  ctx.fill();
}

function setupPainting() {
  const c = $("mask-canvas");
  let down = false;
  c.addEventListener("pointerdown", (ev) => {
    undoStack.push(c.getContext("2d").getImageData(0, 0, 280, 280));
    down = true; paintAt(ev);
  });
  c.addEventListener("pointermove", (ev) => { if (down) paintAt(ev); });
  window.addEventListener("pointerup", () => { down = false; });
  $("undo").addEventListener("click", () => { if (undoStack.length) c.getContext("2d").putImageData(undoStack.pop(), 0, 0); });
  $("clear-mask").addEventListener("click", clearMask);
}

function maskPNG() {  // the painted mask at the input's size: any painted coverage = white (regenerate)
  if (!inputSize) throw new Error("choose an input image first");
  const [w, h] = inputSize, out = document.createElement("canvas");
  out.width = w; out.height = h;
  const ctx = out.getContext("2d");
  ctx.drawImage($("mask-canvas"), 0, 0, w, h);
  const data = ctx.getImageData(0, 0, w, h);
  let any = false;
  for (let i = 0; i < data.data.length; i += 4) {
    const on = data.data[i + 3] > 0;
    any = any || on;
    data.data[i] = data.data[i + 1] = data.data[i + 2] = on ? 255 : 0;
    data.data[i + 3] = 255;
  }
  if (!any) throw new Error("paint the region to regenerate on the image first");
  ctx.putImageData(data, 0, 0);
  return out.toDataURL("image/png");
}

// --- start ------------------------------------------------------------------------------------------

async function loadGallery() {
  const r = await api("/v1/jobs?limit=20");
  const jobs = (await r.json()).jobs.filter((j) => j.status === "done").reverse();
  for (const job of jobs) for (const path of job.images) {
    const { url, buffer } = await imageURL(path);
    addThumb($("gallery"), url, buffer, path, true);
  }
}

async function start() {
  $("token").value = sessionStorage.getItem("latentdiff-token") || "";
  $("token").addEventListener("change", () => { sessionStorage.setItem("latentdiff-token", $("token").value); location.reload(); });
  $("form").addEventListener("submit", submit);
  $("cancel").addEventListener("click", cancel);
  $("model").addEventListener("change", selectModel);
  document.querySelectorAll("input[name=kind]").forEach((el) => el.addEventListener("change", updateVisibility));
  $("reuse-seed").addEventListener("click", () => {
    if (selected && selected.record.seed !== undefined) { $("seed").value = selected.record.seed; $("random-seed").checked = false; }
    else showError("select a result in the gallery first");
  });
  $("use-input").addEventListener("click", async () => {
    const blob = await (await fetch(selected.url)).blob();
    const fr = new FileReader(); fr.onload = () => setInput(fr.result); fr.readAsDataURL(blob);
  });
  $("image-file").addEventListener("change", () => {
    const f = $("image-file").files[0]; if (!f) return;
    const fr = new FileReader(); fr.onload = () => setInput(fr.result); fr.readAsDataURL(f);
  });
  setupPainting();
  try {
    const r = await api("/v1/models");
    models = (await r.json()).models;
    $("model").innerHTML = "";
    models.forEach((m) => $("model").append(new Option(m.name, m.name)));
    selectModel();
    await loadGallery();
    showError("");
  } catch (e) { showError(e.message); }
  document.body.dataset.ready = "1";
}

start();
