// The fusionserve playground: plain modern JavaScript, no build step, no dependency.
// It talks to the same API as any client: /v1/prompts/optimize while typing, then
// /v1/images/generations or /v1/images/edits with `stream: true`, reading the server-sent
// events from fetch() (EventSource cannot POST). Paths are relative to <base href>, which the
// server sets to the application's route prefix.

const config = JSON.parse(document.getElementById("server-config").textContent);
const $ = (id) => document.getElementById(id);
const OPTIMIZE_DEBOUNCE_MS = 300;
const HISTORY_LIMIT = 20;
const KEY_STORAGE = "fusionserve.apiKey";
const STAGE_COLOURS = ["#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#9c755f"];

const state = { mode: "generate", running: null, history: [], maskPainted: false };

// ---------------------------------------------------------------- set-up
function setUp() {
  $("model-name").textContent = `model ${config.model} · v${config.version}`;
  const side = Number(config.default_size.split("x")[0]);
  const sizes = new Set([config.default_size, `${side / 2}x${side / 2}`, `${side * 2}x${side * 2}`]);
  for (const size of sizes) {
    const [w] = size.split("x").map(Number);
    if (w >= config.min_side && w <= config.max_side) $("sizes").append(new Option(size, size));
  }
  $("size").value = config.default_size;
  $("guidance").placeholder = String(config.default_guidance_scale);
  $("count").max = String(config.max_images);
  $("steps").max = String(config.max_steps);
  for (const tier of config.quality_tiers) $("quality").append(new Option(tier, tier));
  if (config.api_keys) {
    $("api-key-field").hidden = false;
    $("api-key").value = localStorage.getItem(KEY_STORAGE) || "";
    $("api-key").addEventListener("change", () => localStorage.setItem(KEY_STORAGE, $("api-key").value.trim()));
    // A new key: drop the check sent with the old one (its refusal would land after this
    // key's requests cleared the errors) and check again.
    $("api-key").addEventListener("input", () => {
      optimizeAbort?.abort();
      scheduleOptimize();
    });
  }
  $("reference-field").hidden = !config.reference_image;
  for (const [input, output] of [["strength", "strength-value"], ["reference-scale", "reference-scale-value"]]) {
    const show = () => ($(output).textContent = $(input).value);
    $(input).addEventListener("input", show);
    show();
  }
  $("tab-generate").addEventListener("click", () => setMode("generate"));
  $("tab-edit").addEventListener("click", () => setMode("edit"));
  $("prompt").addEventListener("input", scheduleOptimize);
  $("negative-prompt").addEventListener("input", scheduleOptimize);
  $("namespace").addEventListener("input", scheduleOptimize);
  $("request-form").addEventListener("submit", (event) => {
    event.preventDefault();
    submit();
  });
  document.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
      event.preventDefault();
      submit();
    }
  });
  setUpMaskEditor();
}

function setMode(mode) {
  state.mode = mode;
  $("tab-generate").setAttribute("aria-selected", String(mode === "generate"));
  $("tab-edit").setAttribute("aria-selected", String(mode === "edit"));
  $("edit-inputs").hidden = mode !== "edit";
  $("submit").textContent = mode === "edit" ? "Edit" : "Generate";
  clearErrors();
}

function authHeaders() {
  const key = config.api_keys ? $("api-key").value.trim() : "";
  return key ? { Authorization: `Bearer ${key}` } : {};
}

// ---------------------------------------------------------------- errors next to their controls
function clearErrors() {
  for (const element of document.querySelectorAll(".field-error")) element.textContent = "";
  for (const element of document.querySelectorAll(".field.invalid")) element.classList.remove("invalid");
  $("form-error").hidden = true;
  $("form-error").textContent = "";
}

// Which control an API error names: its `param` ("size", "num_inference_steps", "image", ...),
// or for an API-key refusal the key field.
function fieldFor(error) {
  const param = error.code === "invalid_api_key" || error.code === "rate_limit_exceeded" ? "api_key" : error.param;
  if (!param) return null;
  const field = document.querySelector(`.field[data-param="${CSS.escape(param)}"]`);
  return field && !field.hidden && field.offsetParent !== null ? field : null;
}

function showError(error) {
  const field = fieldFor(error);
  if (field) {
    field.classList.add("invalid");
    field.querySelector(".field-error").textContent = error.message;
    field.querySelector("input, textarea, select")?.focus();
  } else {
    $("form-error").hidden = false;
    $("form-error").textContent = error.message;
  }
  setStatus(`Error: ${error.message}`);
}

async function errorOf(response) {
  try {
    const body = await response.json();
    if (body && body.error) return body.error;
  } catch {
    // not JSON: a proxy's page, say
  }
  return { message: `HTTP ${response.status} ${response.statusText}`, param: null, code: null };
}

// ---------------------------------------------------------------- the optimized prompt, as you type
let optimizeTimer = null;
let optimizeAbort = null;

function scheduleOptimize() {
  clearTimeout(optimizeTimer);
  optimizeTimer = setTimeout(optimize, OPTIMIZE_DEBOUNCE_MS);
}

async function optimize() {
  const prompt = $("prompt").value;
  optimizeAbort?.abort();
  if (!prompt.trim()) {
    $("optimized").hidden = true;
    return;
  }
  const abort = (optimizeAbort = new AbortController());
  const body = { prompt, negative_prompt: $("negative-prompt").value, cache_namespace: $("namespace").value || "default" };
  let response;
  try {
    response = await fetch("v1/prompts/optimize", {
      method: "POST",
      headers: { "Content-Type": "application/json", ...authHeaders() },
      body: JSON.stringify(body),
      signal: abort.signal,
    });
  } catch (error) {
    if (error.name !== "AbortError") setStatus(`The server could not be reached: ${error.message}`);
    return;
  }
  // Superseded while its answer was read (a newer prompt or key): the newer request speaks.
  let result;
  try {
    result = response.ok ? await response.json() : await errorOf(response);
  } catch (error) {
    if (error.name !== "AbortError") setStatus(`The server's answer could not be read: ${error.message}`);
    return;
  }
  if (abort.signal.aborted) return;
  if (!response.ok) {
    const field = fieldFor(result);
    if (field) field.querySelector(".field-error").textContent = result.message;
    return;
  }
  showOptimized(result);
}

function showOptimized(result) {
  $("optimized").hidden = false;
  $("optimized-prompt").textContent = result.prompt;
  const yours = result.optimized_tokens - result.template_tokens;
  const saved = Math.round(result.saved_fraction * 100);
  const template = result.template_tokens
    ? ` + ${result.template_tokens} of the “${result.cache_namespace}” template (a prefix of ${result.prefix_tokens} positions shared by the namespace: the encoder caches it)`
    : "";
  $("token-counts").textContent = `CLIP tokens: ${result.original_tokens} as written → ${yours} (${saved}% saved)${template}`;
  const list = $("attributes");
  list.replaceChildren();
  for (const [key, value] of Object.entries(result.attributes)) {
    list.append(element("dt", key.replaceAll("_", " ")), element("dd", Array.isArray(value) ? value.join(", ") : value));
  }
  $("prompt-warnings").replaceChildren(...result.warnings.map((warning) => element("li", warning)));
}

function element(tag, text, attributes = {}) {
  const node = document.createElement(tag);
  if (text !== undefined) node.textContent = text;
  for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, value);
  return node;
}

// ---------------------------------------------------------------- the request
function numberField(id) {
  const raw = $(id).value.trim();
  return raw === "" ? undefined : Number(raw);
}

// The request's fields, typed as the JSON API wants them (it is strict: "2" is not 2).
function requestFields() {
  const fields = {
    prompt: $("prompt").value,
    negative_prompt: $("negative-prompt").value || undefined,
    size: $("size").value.trim() || undefined,
    seed: numberField("seed"),
    quality: $("quality").value || undefined,
    deadline_ms: numberField("deadline"),
    guidance_scale: numberField("guidance"),
    num_inference_steps: numberField("steps"),
    scheduler: $("sampler").value || undefined,
    cache_interval: numberField("cache-interval"),
    n: numberField("count") ?? 1,
    cache_namespace: $("namespace").value.trim() || undefined,
    stream: true,
    partial_images: numberField("partials") ?? 0,
  };
  if (state.mode === "edit") {
    fields.strength = Number($("strength").value);
    // untouched: the server's default (1.5 with a mask, 1.0 without: the measured fusion recipe)
    if (config.reference_image && $("reference-file").files[0] && $("reference-scale").dataset.touched) {
      fields.reference_scale = Number($("reference-scale").value);
    }
  }
  return Object.fromEntries(Object.entries(fields).filter(([, value]) => value !== undefined));
}

async function editBody(fields) {
  const form = new FormData();
  for (const [name, value] of Object.entries(fields)) form.append(name, String(value));
  const target = $("target-file").files[0];
  if (target) form.append("image", target, target.name);
  const reference = config.reference_image ? $("reference-file").files[0] : undefined;
  if (reference) form.append("reference_image", reference, reference.name);
  if (target && state.maskPainted) form.append("mask", await maskPng(), "mask.png");
  return form;
}

async function submit() {
  if (state.running) return; // one request at a time from this page
  clearErrors();
  const fields = requestFields();
  const edit = state.mode === "edit";
  if (edit && !$("target-file").files[0]) {
    showError({ message: "choose a target image to edit", param: "image" });
    return;
  }
  const started = performance.now();
  state.running = new AbortController();
  $("submit").disabled = true;
  resetOutput(fields.n ?? 1);
  setStatus("Sending…");
  try {
    const response = await fetch(edit ? "v1/images/edits" : "v1/images/generations", {
      method: "POST",
      headers: edit ? authHeaders() : { "Content-Type": "application/json", ...authHeaders() },
      body: edit ? await editBody(fields) : JSON.stringify(fields),
      signal: state.running.signal,
    });
    if (!response.ok) {
      showError(await errorOf(response));
      return;
    }
    const finals = await readEvents(response);
    if (finals.length) {
      const seconds = ((performance.now() - started) / 1000).toFixed(1);
      setStatus(`Done in ${seconds} s.`);
      $("images").dataset.state = "done";
      addToHistory(fields, finals, edit);
    }
  } catch (error) {
    if (error.name !== "AbortError") showError({ message: `the request failed: ${error.message}`, param: null });
  } finally {
    for (const pending of $("images").querySelectorAll('img[data-kind="pending"]')) pending.closest("figure").remove();
    state.running = null;
    $("submit").disabled = false;
    $("progress").hidden = true;
  }
}

// Server-sent events over fetch: "event: NAME\ndata: JSON\n\n" blocks.
async function readEvents(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  const finals = [];
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = block
        .split("\n")
        .filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).trimStart())
        .join("\n");
      if (!data) continue;
      const event = JSON.parse(data);
      if (event.type.endsWith(".partial_image")) showPartial(event);
      else if (event.type.endsWith(".completed")) finals.push(showFinal(event));
      else if (event.type === "error") {
        showError(event.error);
        return [];
      }
    }
  }
  return finals;
}

// ---------------------------------------------------------------- output
function resetOutput(count) {
  const images = $("images");
  images.replaceChildren();
  images.dataset.partials = "0";
  images.dataset.state = "running";
  for (let index = 0; index < count; index++) {
    const figure = element("figure", undefined, { "data-index": String(index) });
    figure.append(element("img", undefined, { alt: `image ${index + 1}`, "data-kind": "pending" }), element("figcaption", "waiting…"));
    images.append(figure);
  }
  $("usage").hidden = true;
  $("progress").hidden = false;
  $("progress").removeAttribute("value");
}

function imageSource(event) {
  return `data:image/${event.output_format};base64,${event.b64_json}`;
}

function figure(index) {
  return $("images").querySelector(`figure[data-index="${index}"]`);
}

function showPartial(event) {
  const slot = figure(event.image_index);
  if (!slot) return;
  const image = slot.querySelector("img");
  image.src = imageSource(event);
  image.dataset.kind = "partial";
  slot.querySelector("figcaption").textContent = `preview after step ${event.steps_done} of ${event.total_steps}`;
  const images = $("images");
  images.dataset.partials = String(Number(images.dataset.partials) + 1);
  $("progress").max = event.total_steps;
  $("progress").value = event.steps_done;
  setStatus(`Denoising: step ${event.steps_done} of ${event.total_steps}…`);
}

function showFinal(event) {
  const slot = figure(event.image_index);
  const source = imageSource(event);
  if (slot) {
    const image = slot.querySelector("img");
    image.src = source;
    image.dataset.kind = "final";
    slot.querySelector("figcaption").textContent = `seed ${event.seed}`;
  }
  if (event.image_index === 0) showUsage(event);
  return { source, seed: event.seed, format: event.output_format, revisedPrompt: event.revised_prompt };
}

function showUsage(event) {
  const usage = event.usage;
  $("usage").hidden = false;
  showTiming(event.server_timing);
  const deadline =
    usage.deadline_ms == null
      ? "none asked"
      : `${usage.deadline_ms} ms: ${usage.deadline_met ? "met" : "missed"}` +
        (usage.predicted_ms == null ? " (no step timings yet to predict from)" : ` (predicted ${Math.round(usage.predicted_ms)} ms)`);
  const rows = [
    ["steps", `${usage.num_inference_steps} (${usage.steps_reason}; policy ${usage.steps_policy}${usage.steps_complexity == null ? "" : `, complexity ${usage.steps_complexity.toFixed(2)}`})`],
    ["UNet steps run", String(usage.denoising_steps)],
    ["sampler", `${usage.scheduler ?? "the model's own"}, whole UNet every ${usage.cache_interval} step(s) (${usage.sampler_reason})`],
    ["deadline", deadline],
    ["elapsed", `${Math.round(usage.elapsed_ms)} ms`],
    ["prompt tokens", `${usage.input_tokens - usage.template_tokens} yours + ${usage.template_tokens} template (${usage.original_input_tokens} as written)`],
    ["cached tokens", `${usage.input_tokens_details.cached_tokens} of the prompt, ${usage.input_tokens_details.negative_prompt_cached_tokens} of the negative prompt`],
    ["revised prompt", event.revised_prompt],
  ];
  if (usage.strength != null) rows.push(["strength", String(usage.strength)]);
  $("usage-list").replaceChildren(...rows.flatMap(([name, value]) => [element("dt", name), element("dd", value)]));
}

// "optimize;dur=1.2, encode;dur=3.4" -> a bar with one segment per stage, as wide as its time.
function parseServerTiming(header) {
  return (header || "")
    .split(",")
    .map((part) => part.trim().match(/^([\w-]+);dur=([\d.]+)$/))
    .filter(Boolean)
    .map(([, stage, ms]) => ({ stage, ms: Number(ms) }));
}

function showTiming(header) {
  const stages = parseServerTiming(header);
  const total = stages.reduce((sum, { ms }) => sum + ms, 0) || 1;
  const bar = $("timing");
  const legend = $("timing-legend");
  bar.replaceChildren();
  legend.replaceChildren();
  stages.forEach(({ stage, ms }, index) => {
    const colour = STAGE_COLOURS[index % STAGE_COLOURS.length];
    const segment = element("span", undefined, { title: `${stage}: ${ms.toFixed(1)} ms`, "data-stage": stage });
    segment.style.flexGrow = String(ms / total);
    segment.style.background = colour;
    bar.append(segment);
    const item = element("span", `${stage} ${ms < 10 ? ms.toFixed(1) : Math.round(ms)} ms`);
    item.style.setProperty("--swatch", colour);
    legend.append(item);
  });
}

function setStatus(text) {
  $("status").textContent = text;
}

// ---------------------------------------------------------------- history: download, curl, Python
function addToHistory(fields, finals, edit) {
  const entry = { fields, finals, edit };
  state.history.unshift(entry);
  state.history.length = Math.min(state.history.length, HISTORY_LIMIT);
  const item = element("li");
  const thumbnails = element("div", undefined, { class: "thumbnails" });
  for (const final of finals) {
    const link = element("a", undefined, { href: final.source, download: `fusionserve-${final.seed}.${final.format}`, title: "download" });
    link.append(element("img", undefined, { src: final.source, alt: `seed ${final.seed}` }));
    thumbnails.append(link);
  }
  const snippet = element("pre", undefined, { class: "snippet", hidden: "" });
  const buttons = element("div", undefined, { class: "buttons" });
  for (const [label, make] of [["Copy curl", curlCommand], ["Copy Python", pythonCode]]) {
    const button = element("button", label, { type: "button" });
    button.addEventListener("click", async () => {
      const text = make(entry);
      snippet.textContent = text;
      snippet.hidden = false;
      try {
        await navigator.clipboard.writeText(text);
        button.textContent = "Copied";
      } catch {
        button.textContent = "Shown below"; // no clipboard (plain http on another host): select and copy
      }
      setTimeout(() => (button.textContent = label), 1500);
    });
    buttons.append(button);
  }
  item.append(element("p", fields.prompt, { class: "prompt" }), thumbnails, buttons, snippet);
  $("history").prepend(item);
  while ($("history").children.length > HISTORY_LIMIT) $("history").lastElementChild.remove();
}

function serverUrl() {
  return new URL(".", document.baseURI).href.replace(/\/$/, "");
}

function shellQuote(text) {
  return `'${String(text).replaceAll("'", "'\\''")}'`;
}

function curlCommand({ fields, edit }) {
  const key = config.api_keys ? ` -H "Authorization: Bearer $FUSIONSERVE_API_KEY"` : "";
  const plain = { ...fields, stream: undefined, partial_images: undefined };
  if (!edit) {
    const body = JSON.stringify(Object.fromEntries(Object.entries(plain).filter(([, v]) => v !== undefined)));
    return `curl -s ${serverUrl()}/v1/images/generations${key} -H 'Content-Type: application/json' \\\n  -d ${shellQuote(body)} \\\n  | python3 -c 'import sys,json,base64; open("out.png","wb").write(base64.b64decode(json.load(sys.stdin)["data"][0]["b64_json"]))'`;
  }
  const parts = Object.entries(plain)
    .filter(([, v]) => v !== undefined)
    .map(([name, value]) => `-F ${shellQuote(`${name}=${value}`)}`);
  parts.unshift("-F image=@target.png");
  if (config.reference_image && $("reference-file").files[0]) parts.push("-F reference_image=@reference.png");
  if (state.maskPainted) parts.push("-F mask=@mask.png");
  return `curl -s ${serverUrl()}/v1/images/edits${key} \\\n  ${parts.join(" \\\n  ")}`;
}

function pythonCode({ fields, edit }) {
  const { prompt, size, n, ...rest } = fields;
  delete rest.stream;
  delete rest.partial_images;
  const extra = Object.keys(rest).length ? `,\n    extra_body=${JSON.stringify(rest)}` : "";
  const key = config.api_keys ? `os.environ["FUSIONSERVE_API_KEY"]` : `"unused"`;
  const call = edit
    ? `client.images.edit(\n    image=open("target.png", "rb"),${state.maskPainted ? `\n    mask=open("mask.png", "rb"),` : ""}\n    prompt=${JSON.stringify(prompt)},\n    size=${JSON.stringify(size ?? config.default_size)},\n    n=${n ?? 1}${extra},\n)`
    : `client.images.generate(\n    prompt=${JSON.stringify(prompt)},\n    size=${JSON.stringify(size ?? config.default_size)},\n    n=${n ?? 1}${extra},\n)`;
  return `import base64, os\n\nfrom openai import OpenAI\n\nclient = OpenAI(base_url="${serverUrl()}/v1", api_key=${key})\nresult = ${call}\nopen("out.png", "wb").write(base64.b64decode(result.data[0].b64_json))\n`;
}

// ---------------------------------------------------------------- the mask editor
// The canvas has the target's pixel size (the API refuses a mask of another size) and is
// shown scaled over the target. Painted pixels become transparent in the mask sent: OpenAI's
// convention, transparent = may change.
function setUpMaskEditor() {
  const canvas = $("mask-canvas");
  const context = canvas.getContext("2d");
  let last = null;

  $("target-file").addEventListener("change", () => {
    const file = $("target-file").files[0];
    if (!file) return;
    const url = URL.createObjectURL(file);
    const preview = $("target-preview");
    preview.onload = () => {
      canvas.width = preview.naturalWidth;
      canvas.height = preview.naturalHeight;
      clearMask();
      $("mask-editor").classList.add("ready");
      $("mask-placeholder").hidden = true;
      if (!$("size").dataset.touched) $("size").value = `${preview.naturalWidth}x${preview.naturalHeight}`;
    };
    preview.src = url;
  });
  $("size").addEventListener("input", () => ($("size").dataset.touched = "1"));
  $("strength").addEventListener("input", () => ($("strength").dataset.touched = "1"));
  $("reference-scale").addEventListener("input", () => ($("reference-scale").dataset.touched = "1"));

  function point(event) {
    const rect = canvas.getBoundingClientRect();
    return { x: ((event.clientX - rect.left) * canvas.width) / rect.width, y: ((event.clientY - rect.top) * canvas.height) / rect.height };
  }

  function stroke(from, to) {
    const radius = (Number($("brush-size").value) * canvas.width) / Math.max(canvas.getBoundingClientRect().width, 1) / 2;
    context.globalCompositeOperation = $("eraser").checked ? "destination-out" : "source-over";
    context.strokeStyle = context.fillStyle = "rgba(255, 64, 64, 1)";
    context.lineWidth = radius * 2;
    context.lineCap = "round";
    context.beginPath();
    context.moveTo(from.x, from.y);
    context.lineTo(to.x, to.y);
    context.stroke();
    state.maskPainted = $("eraser").checked ? hasPaint() : true; // an eraser stroke may have cleared it all
    if (state.maskPainted && !$("strength").dataset.touched) {
      $("strength").value = "1"; // the server's default with a mask: the masked area is redrawn whole
      $("strength-value").textContent = "1";
    }
    if (state.maskPainted && !$("reference-scale").dataset.touched) {
      $("reference-scale").value = "1.5"; // the server's default with a mask
      $("reference-scale-value").textContent = "1.5";
    }
  }

  canvas.addEventListener("pointerdown", (event) => {
    if (!$("mask-editor").classList.contains("ready")) return;
    canvas.setPointerCapture(event.pointerId);
    last = point(event);
    stroke(last, last);
  });
  canvas.addEventListener("pointermove", (event) => {
    if (!last) return;
    const next = point(event);
    stroke(last, next);
    last = next;
  });
  const end = () => (last = null);
  canvas.addEventListener("pointerup", end);
  canvas.addEventListener("pointercancel", end);
  $("clear-mask").addEventListener("click", clearMask);

  function clearMask() {
    context.clearRect(0, 0, canvas.width, canvas.height);
    state.maskPainted = false;
  }

  function hasPaint() {
    if (!canvas.width) return false;
    const alpha = context.getImageData(0, 0, canvas.width, canvas.height).data;
    for (let i = 3; i < alpha.length; i += 4) if (alpha[i] > 0) return true;
    return false;
  }
}

async function maskPng() {
  const canvas = $("mask-canvas");
  const painted = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height);
  const mask = new ImageData(canvas.width, canvas.height);
  for (let i = 0; i < painted.data.length; i += 4) {
    mask.data[i + 3] = painted.data[i + 3] > 0 ? 0 : 255; // black and opaque = keep; transparent = may change
  }
  const out = document.createElement("canvas");
  out.width = canvas.width;
  out.height = canvas.height;
  out.getContext("2d").putImageData(mask, 0, 0);
  return new Promise((resolve) => out.toBlob(resolve, "image/png"));
}

setUp();
