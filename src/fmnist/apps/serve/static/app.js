// The fmnist page: send an uploaded, dropped, pasted or drawn image to POST /api/predict and show the answer.
// Server text is only ever inserted with textContent (never as HTML).
"use strict";

const $ = (id) => document.getElementById(id);
const state = {
  info: null,             // GET /api/model
  maxBody: 8000000,       // replaced by the server's limit
  sequence: 0,            // answers to older requests are ignored
};

// ---- model information -------------------------------------------------------------------------------

async function loadModelInfo() {
  try {
    const response = await fetch("/api/model");
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    state.info = await response.json();
    state.maxBody = state.info.limits?.max_body_bytes ?? state.maxBody;
    $("model-info").textContent = describeModel(state.info);
  } catch (err) {
    $("model-info").textContent = "Could not load the model details; predictions may still work.";
  }
}

function describeModel(info) {
  const parts = [`Model “${info.name}” (${info.model}`];
  if (info.parameters) parts[0] += `, ${info.parameters.toLocaleString("en")} parameters`;
  parts[0] += ")";
  const acc = info.test?.accuracy ?? info.validation?.val_acc;
  if (typeof acc === "number") {
    parts.push(`${percent(acc)} accuracy on ${info.test ? "the test set" : "validation images"}`);
  }
  const threshold = info.thresholds?.confidence;
  if (typeof threshold === "number" && threshold > 0) {
    parts.push(info.candidate_sets
      ? `below ${percent(threshold)} confidence it names the garments it could be`
      : `answers below ${percent(threshold)} confidence are refused`);
  }
  if (info.thresholds?.ood != null) parts.push("pictures unlike the garments it knows are refused");
  return parts.join(" · ") + ".";
}

function percent(x) {
  return `${(100 * x).toFixed(x >= 0.995 || x < 0.1 ? 1 : 0)} %`;
}

// ---- sending images ----------------------------------------------------------------------------------

async function classify(blob, name) {
  if (!blob) return;
  if (blob.size > state.maxBody) {
    showError(`That file is ${(blob.size / 1e6).toFixed(1)} MB; the limit is ${(state.maxBody / 1e6).toFixed(0)} MB.`);
    return;
  }
  const id = ++state.sequence;
  setState("loading");
  $("status").textContent = "Classifying…";
  $("status").hidden = false;
  const form = new FormData();
  form.append("file", blob, name || "image");
  let response, body;
  try {
    response = await fetch("/api/predict", { method: "POST", body: form });
    body = await response.json().catch(() => ({}));
  } catch (err) {
    if (id === state.sequence) showError("The server could not be reached. Is it still running?");
    return;
  }
  if (id !== state.sequence) return; // a newer request is on its way
  const result = $("result");
  result.dataset.requests = String(Number(result.dataset.requests) + 1);
  if (!response.ok) {
    showError(errorText(response, body));
    return;
  }
  render(body);
}

function errorText(response, body) {
  const detail = typeof body.detail === "string" ? body.detail : "";
  switch (response.status) {
    case 400: return `This file could not be read as an image. ${detail}`;
    case 413: return `Too large. ${detail}`;
    case 415: return `Unsupported request. ${detail}`;
    case 503: return `The server is busy right now; please try again in a moment. ${detail}`;
    default: return `Something went wrong (HTTP ${response.status}). ${detail}`;
  }
}

// ---- showing the answer ------------------------------------------------------------------------------

function render(p) {
  $("input-image").src = `data:image/png;base64,${p.input_png}`;
  // An uncertain answer names its candidates; one from a run without candidate sets reads as a refusal.
  const candidates = verdictOf(p) === "uncertain" && Array.isArray(p.candidates) && p.candidates.length
    ? p.candidates : null;
  const verdict = $("verdict");
  verdict.className = "verdict " + (p.accepted ? "accepted" : candidates ? "uncertain" : "refused");
  verdict.textContent = candidates
    ? `${orList(candidates.map((c) => c.label))} — not sure which`
    : verdictText(p);

  $("candidates-block").hidden = !candidates;
  $("candidates-note").textContent = state.info?.verdicts?.uncertain
    || "The model is not sure enough to pick one label. It could be:";
  $("candidates").replaceChildren(...(candidates || []).map(candidateItem));

  const list = $("top-k");
  list.replaceChildren(...(p.top_k || []).map(topKItem));

  // With candidates, each one carries its own description; otherwise the best guess's is shown.
  const cls = candidates ? null : classInfo(p.label);
  $("description-title").textContent = candidates ? "" : (p.accepted ? p.label : `Best guess: ${p.label}`);
  $("description").textContent = cls?.description || "";
  $("description-title").hidden = $("description").hidden = !!candidates;
  setState("done");
}

function verdictOf(p) {
  // Servers before verdicts existed sent only `accepted`.
  return ["answer", "uncertain", "refused"].includes(p.verdict) ? p.verdict : (p.accepted ? "answer" : "refused");
}

function classInfo(name) {
  return (state.info?.classes || []).find((c) => c.name === name);
}

function orList(labels) {
  // "A", "A or B", "A, B or C"
  return labels.length < 2 ? (labels[0] || "") : `${labels.slice(0, -1).join(", ")} or ${labels[labels.length - 1]}`;
}

function verdictText(p) {
  if (p.accepted) return `This looks like: ${p.label} (${percent(p.score)} confident).`;
  const reasons = state.info?.reasons || {};
  const why = reasons[p.reason] || (p.reason
    ? `${state.info?.generic_reason || "The model declined to answer for this image."} (reason: ${p.reason})`
    : state.info?.generic_reason || "The model declined to answer for this image.");
  if (p.reason === "blank") return `No answer. ${why}`;
  return `No answer. ${why} Best guess: ${p.label} (${percent(p.score)}).`;
}

// A <span> of the given class holding text (textContent: never parsed as HTML).
function textSpan(className, text) {
  const span = document.createElement("span");
  span.className = className;
  span.textContent = text;
  return span;
}

function candidateItem(entry) {
  const li = document.createElement("li");
  li.append(textSpan("label", entry.label), textSpan("score", percent(entry.score)),
            textSpan("about", classInfo(entry.label)?.description || ""));
  return li;
}

function topKItem(entry) {
  const li = document.createElement("li");
  const bar = document.createElement("div");
  bar.className = "bar";
  const fill = document.createElement("span");
  fill.style.width = `${Math.max(0, Math.min(100, 100 * entry.score)).toFixed(1)}%`;
  bar.append(fill);
  li.append(textSpan("label", entry.label), bar, textSpan("score", percent(entry.score)));
  return li;
}

function setState(name) {
  $("result").dataset.state = name;
  $("placeholder").hidden = true;
  $("status").hidden = name !== "loading";
  $("error").hidden = name !== "error";
  $("result-body").hidden = name !== "done";
}

function showError(message) {
  $("error").textContent = message;
  setState("error");
}

// ---- upload: file picker, drag and drop, paste ---------------------------------------------------------

function firstImageFile(items) {
  for (const item of items || []) {
    const file = item instanceof File ? item : (item.kind === "file" ? item.getAsFile() : null);
    if (file) return file;
  }
  return null;
}

function setUpUpload() {
  $("file-input").addEventListener("change", (e) => {
    const file = e.target.files[0];
    if (file) classify(file, file.name);
    e.target.value = ""; // choosing the same file again fires change again
  });

  const zone = $("drop-zone");
  // Without this, a file dropped anywhere else would make the browser navigate away to it.
  for (const type of ["dragover", "drop"]) document.addEventListener(type, (e) => e.preventDefault());
  zone.addEventListener("dragenter", () => zone.classList.add("dragging"));
  zone.addEventListener("dragleave", () => zone.classList.remove("dragging"));
  zone.addEventListener("drop", (e) => {
    zone.classList.remove("dragging");
    const file = firstImageFile(e.dataTransfer?.files);
    if (file) classify(file, file.name);
    else showError("Drop an image file (a link or text is not an image).");
  });
  zone.addEventListener("keydown", (e) => {
    if (e.key === "Enter" || e.key === " ") $("file-input").click();
  });

  document.addEventListener("paste", (e) => {
    const file = firstImageFile(e.clipboardData?.files) || firstImageFile(e.clipboardData?.items);
    if (file) {
      e.preventDefault();
      classify(file, file.name || "pasted.png");
    }
  });
}

// ---- drawing: mouse, touch and pen through pointer events (touch events as a fallback) --------------------

function setUpCanvas() {
  const canvas = $("canvas");
  const ctx = canvas.getContext("2d");
  let drawing = false;
  let last = null;
  let pending = null;

  function clear() {
    ctx.fillStyle = "#000";
    ctx.fillRect(0, 0, canvas.width, canvas.height);
  }

  function point(e) {
    const r = canvas.getBoundingClientRect();
    return { x: (e.clientX - r.left) * canvas.width / r.width, y: (e.clientY - r.top) * canvas.height / r.height };
  }

  function start(e) {
    drawing = true;
    last = point(e);
    line(last, last);
  }

  function move(e) {
    if (!drawing) return;
    const p = point(e);
    line(last, p);
    last = p;
  }

  function end() {
    if (!drawing) return;
    drawing = false;
    clearTimeout(pending);
    pending = setTimeout(sendDrawing, 250); // classify once the stroke is done
  }

  function line(a, b) {
    ctx.strokeStyle = "#fff"; // a light garment on black, like the data set
    ctx.lineWidth = 18;
    ctx.lineCap = "round";
    ctx.lineJoin = "round";
    ctx.beginPath();
    ctx.moveTo(a.x, a.y);
    ctx.lineTo(b.x, b.y);
    ctx.stroke();
  }

  function sendDrawing() {
    clearTimeout(pending);
    canvas.toBlob((blob) => classify(blob, "drawing.png"), "image/png");
  }

  if (window.PointerEvent) {
    canvas.addEventListener("pointerdown", (e) => {
      canvas.setPointerCapture(e.pointerId);
      start(e);
    });
    canvas.addEventListener("pointermove", move);
    canvas.addEventListener("pointerup", end);
    canvas.addEventListener("pointercancel", end);
  } else {
    canvas.addEventListener("mousedown", start);
    canvas.addEventListener("mousemove", move);
    window.addEventListener("mouseup", end);
    const touch = (handler) => (e) => {
      e.preventDefault();
      if (e.touches.length) handler(e.touches[0]);
      else handler(e);
    };
    canvas.addEventListener("touchstart", touch(start), { passive: false });
    canvas.addEventListener("touchmove", touch(move), { passive: false });
    canvas.addEventListener("touchend", touch(end), { passive: false });
  }

  $("classify-drawing").addEventListener("click", sendDrawing);
  $("clear-drawing").addEventListener("click", () => {
    clearTimeout(pending);
    clear();
  });
  clear();
}

setUpUpload();
setUpCanvas();
loadModelInfo();
