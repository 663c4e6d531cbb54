// localgemma playground: plain JavaScript, no build step, no network beyond this server.
// Every field's range and default come from the server (/schema/inputs), not from this file.
"use strict";

const ACCOUNT = "local";
const RUN = (model) => `/client/v4/accounts/${ACCOUNT}/ai/run/${model}`;
const FINETUNES = `/client/v4/accounts/${ACCOUNT}/ai/finetunes`;
const SAMPLING = ["max_tokens", "temperature", "top_p", "top_k", "seed",
                  "repetition_penalty", "frequency_penalty", "presence_penalty"];
const $ = (id) => document.getElementById(id);

const state = { mode: "prompt", key: sessionStorage.getItem("localgemma-key") || "", schema: null,
                controller: null, finetunes: [] };

// -- talking to the server -------------------------------------------------------------------

function headers(extra = {}) {
  return state.key ? { ...extra, Authorization: `Bearer ${state.key}` } : extra;
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: headers(options.headers || {}) });
  if (response.status === 401) askForKey();
  return response;
}

async function errorOf(response) {
  try {
    const body = await response.json();
    if (body.errors && body.errors.length) return `${body.errors[0].message} (code ${body.errors[0].code})`;
    if (body.error) return body.error.message;
  } catch (e) { /* not JSON */ }
  return `${response.status} ${response.statusText}`;
}

function askForKey() {
  $("key-box").hidden = false;
  $("key-button").hidden = false;
  $("key").focus();
}

// -- the form, built from the contract -----------------------------------------------------------

function fieldSchema(name) {
  const prop = state.schema.prompt.properties[name];
  const plain = (prop.anyOf || [prop]).find((p) => p.type && p.type !== "null") || prop;
  return { ...plain, default: prop.default, description: prop.description };
}

function buildSampling() {
  const box = $("sampling");
  box.innerHTML = "";
  for (const name of SAMPLING) {
    const f = fieldSchema(name);
    const label = document.createElement("label");
    const range = [f.minimum !== undefined ? `min ${f.minimum}` : "", f.maximum !== undefined ? `max ${f.maximum}` : ""]
      .filter(Boolean).join(", ");
    const dflt = f.default === undefined || f.default === null ? "unset" : `default ${f.default}`;
    label.innerHTML = `${name}<small>${[range, dflt].filter(Boolean).join("; ")}</small>`;
    const input = document.createElement("input");
    input.type = "number";
    input.id = `f-${name}`;
    input.step = f.type === "integer" ? "1" : "any";
    if (f.minimum !== undefined) input.min = f.minimum;
    if (f.maximum !== undefined) input.max = f.maximum;
    input.placeholder = f.default === undefined || f.default === null ? "unset" : String(f.default);
    if (f.description) input.title = f.description;
    label.appendChild(input);
    box.appendChild(label);
  }
}

function sampling() {
  const out = {};
  for (const name of SAMPLING) {
    const value = $(`f-${name}`).value;
    if (value !== "") out[name] = Number(value);
  }
  return out;
}

function lora() {
  const names = [...$("adapter").selectedOptions].map((o) => o.value).filter(Boolean);
  if (!names.length) return undefined;
  return names.map((name) => {
    const scale = document.querySelector(`#scales input[data-name="${CSS.escape(name)}"]`);
    return scale && scale.value !== "" && Number(scale.value) !== 1 ? `${name}:${scale.value}` : name;
  }).join(",");
}

function parseJSON(id, what) {
  const text = $(id).value.trim();
  if (!text) return undefined;
  try { return JSON.parse(text); } catch (e) { throw new Error(`${what} is not JSON: ${e.message}`); }
}

function body() {
  const out = { ...sampling(), stream: $("stream").checked };
  const adapters = lora();
  if (adapters) out.lora = adapters;
  const schema = parseJSON("schema", "the response_format schema");
  if (schema) out.response_format = { type: "json_schema", json_schema: schema };
  if (state.mode === "prompt") {
    out.prompt = $("prompt").value || $("prompt").placeholder;
    if ($("raw").checked) out.raw = true;
  } else {
    const messages = [];
    if ($("system").value.trim()) messages.push({ role: "system", content: $("system").value });
    for (const li of $("turns").children) {
      messages.push({ role: li.querySelector("select").value, content: li.querySelector("textarea").value });
    }
    out.messages = messages;
    const tools = parseJSON("tools", "the tools");
    if (tools) { out.tools = tools; out.tool_choice = $("tool-choice").value; }
  }
  return out;
}

// -- running a request ---------------------------------------------------------------------------

function show(id, text) { $(id).textContent = text; }

function showError(message) {
  $("error").hidden = !message;
  show("error", message || "");
}

async function run() {
  let request;
  try { request = body(); } catch (e) { showError(e.message); return; }
  showError("");
  show("output", "");
  show("stats", "");
  $("parsed").hidden = $("calls").hidden = true;
  $("run").disabled = true;
  $("stop").disabled = false;
  state.controller = new AbortController();
  const started = performance.now();
  let first = null;
  let text = "";
  let final = null;
  try {
    const response = await api(RUN($("model").value), {
      method: "POST", body: JSON.stringify(request), signal: state.controller.signal,
      headers: { "Content-Type": "application/json" },
    });
    if (!response.ok) { showError(await errorOf(response)); return; }
    if (!request.stream) {
      final = (await response.json()).result;
      first = performance.now();
      text = typeof final.response === "string" ? final.response : JSON.stringify(final.response, null, 2);
      if (typeof final.response !== "string") final.parsed = final.response;
      show("output", text);
    } else {
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value;
        let cut;
        while ((cut = buffer.indexOf("\n\n")) >= 0) {
          const block = buffer.slice(0, cut);
          buffer = buffer.slice(cut + 2);
          const data = block.split("\n").filter((l) => l.startsWith("data: ")).map((l) => l.slice(6)).join("");
          if (!data || data === "[DONE]") continue;
          const event = JSON.parse(data);
          if (event.errors) { showError(`${event.errors[0].message} (code ${event.errors[0].code})`); continue; }
          if (event.response) {
            if (first === null) first = performance.now();
            text += event.response;
            show("output", text);
          }
          if (event.usage) final = event;
        }
      }
    }
    finish(request, text, final, started, first);
  } catch (e) {
    if (e.name === "AbortError") show("stats", `stopped after ${text.length} characters`);
    else showError(e.message);
  } finally {
    $("run").disabled = false;
    $("stop").disabled = true;
    state.controller = null;
  }
}

function finish(request, text, final, started, first) {
  if (!final) return;
  if (final.parsed !== undefined) {
    $("parsed").hidden = false;
    $("parsed").querySelector("pre").textContent = JSON.stringify(final.parsed, null, 2);
  }
  if (final.tool_calls && final.tool_calls.length) {
    $("calls").hidden = false;
    $("calls").querySelector("pre").textContent = final.tool_calls
      .map((c) => `${c.name}(${JSON.stringify(c.arguments)})`).join("\n");
  }
  const u = final.usage;
  const seconds = (performance.now() - (first || started)) / 1000;
  const rate = u.completion_tokens > 1 && seconds > 0 ? ` · ${((u.completion_tokens - 1) / seconds).toFixed(1)} tokens/s` : "";
  const ttft = first ? ` · first token ${Math.round(first - started)} ms` : "";
  show("stats", `prompt ${u.prompt_tokens} tokens · completion ${u.completion_tokens} tokens${rate}${ttft}`);
  if (state.mode === "messages" && text) addTurn("assistant", text);  // the conversation goes on
}

// -- messages mode -----------------------------------------------------------------------------

function addTurn(role = "user", content = "") {
  const li = document.createElement("li");
  li.innerHTML = `<div class="turn"><select><option>user</option><option>assistant</option><option>tool</option></select>
    <button type="button" title="remove this turn">✕</button></div><textarea rows="2"></textarea>`;
  li.querySelector("select").value = role;
  li.querySelector("textarea").value = content;
  li.querySelector("button").onclick = () => li.remove();
  $("turns").appendChild(li);
  return li;
}

function setMode(mode) {
  state.mode = mode;
  for (const tab of document.querySelectorAll(".tabs [data-mode]")) tab.setAttribute("aria-selected", tab.dataset.mode === mode);
  $("prompt-mode").hidden = mode !== "prompt";
  $("messages-mode").hidden = mode !== "messages";
  if (mode === "messages" && !$("turns").children.length) addTurn("user", "");
}

// -- models and adapters -----------------------------------------------------------------------

async function loadModels() {
  const response = await api("/v1/models");
  if (!response.ok) { showError(await errorOf(response)); return; }
  const cards = (await response.json()).data;
  const select = $("model");
  const current = select.value;
  select.innerHTML = "";
  for (const card of cards.filter((c) => !c.parent)) select.add(new Option(card.id, card.id));
  if (current) select.value = current;
  await loadAdapters();
}

async function loadAdapters() {
  const model = $("model").value;
  show("adapter-model", model);
  const response = await api(FINETUNES);
  if (!response.ok) { showError(await errorOf(response)); return; }
  state.finetunes = (await response.json()).result.filter((f) => f.model === model);
  const select = $("adapter");
  const chosen = new Set([...select.selectedOptions].map((o) => o.value));
  select.innerHTML = "";
  select.add(new Option("none", "", false, ![...chosen].some(Boolean)));
  state.noneWasSelected = select.options[0].selected;
  const list = $("adapter-list");
  list.innerHTML = "";
  for (const f of state.finetunes) {
    if (f.status === "ready") {
      const option = new Option(f.name, f.name);
      option.selected = chosen.has(f.name);
      select.add(option);
    }
    const li = document.createElement("li");
    li.innerHTML = `<span><b></b> <small></small></span><button type="button">Delete</button>`;
    li.querySelector("b").textContent = f.name;
    li.querySelector("small").textContent = `${f.status}${f.rank ? `, rank ${f.rank}` : ""}${f.description ? ` · ${f.description}` : ""}`;
    li.querySelector("button").onclick = () => remove(f);
    list.appendChild(li);
  }
  select.size = Math.min(Math.max(select.options.length, 1), 4);
  updateScales();
}

function updateScales() {
  const box = $("scales");
  const names = [...$("adapter").selectedOptions].map((o) => o.value).filter(Boolean);
  box.innerHTML = "";
  if (names.length < 2) return;  // one adapter: scale 1, as Workers AI applies it
  for (const name of names) {
    const label = document.createElement("label");
    label.textContent = `${name} ×`;
    const input = document.createElement("input");
    input.type = "number"; input.step = "0.1"; input.min = "-10"; input.max = "10"; input.value = "1";
    input.dataset.name = name;
    label.appendChild(input);
    box.appendChild(label);
  }
}

async function remove(finetune) {
  if (!confirm(`Delete the adapter ${finetune.name}?`)) return;
  const response = await api(`${FINETUNES}/${finetune.id}`, { method: "DELETE" });
  if (!response.ok) showError(await errorOf(response));
  await loadAdapters();
}

function upload(id, file, onProgress) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", `${FINETUNES}/${id}/finetune-assets`);
    for (const [k, v] of Object.entries(headers())) xhr.setRequestHeader(k, v);
    xhr.upload.onprogress = (e) => e.lengthComputable && onProgress(e.loaded / e.total);
    xhr.onload = () => (xhr.status < 300 ? resolve(JSON.parse(xhr.responseText))
      : reject(new Error(errorText(xhr.responseText, xhr.status))));
    xhr.onerror = () => reject(new Error("the upload failed"));
    const form = new FormData();
    form.append("file_name", file.name);
    form.append("file", file);
    xhr.send(form);
  });
}

function errorText(text, status) {
  try { const body = JSON.parse(text); return body.errors[0].message; } catch (e) { return `HTTP ${status}`; }
}

async function register(event) {
  event.preventDefault();
  const files = [...$("ft-files").files];
  const needed = ["adapter_config.json", "adapter_model.safetensors"];
  const byName = Object.fromEntries(files.map((f) => [f.name, f]));
  const missing = needed.filter((n) => !byName[n]);
  if (missing.length) { show("ft-status", `still needed: ${missing.join(", ")}`); return; }
  const progress = $("ft-progress");
  progress.hidden = false;
  progress.value = 0;
  $("ft-register").disabled = true;
  try {
    show("ft-status", "creating…");
    const created = await api(FINETUNES, { method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ model: $("model").value, name: $("ft-name").value, description: $("ft-description").value }) });
    if (!created.ok) throw new Error(await errorOf(created));
    const id = (await created.json()).result.id;
    let notes = [];
    for (const [i, name] of needed.entries()) {
      show("ft-status", i === 0 ? "uploading the config…" : "uploading the weights…");
      const answer = await upload(id, byName[name], (share) => { progress.value = (i + share) * 45; });
      if (i === 1) notes = answer.messages.map((m) => m.message);
    }
    progress.value = 100;
    show("ft-status", `ready${notes.length ? ` (${notes.join("; ")})` : ""}`);
    $("register").reset();
  } catch (e) {
    show("ft-status", e.message);
  } finally {
    $("ft-register").disabled = false;
    await loadAdapters();
  }
}

// -- show code ---------------------------------------------------------------------------------

function snippets(request) {
  const model = $("model").value;
  const url = `${location.origin}${RUN(model)}`;
  const json = JSON.stringify(request, null, 2);
  const auth = state.key ? ' \\\n  -H "Authorization: Bearer $LOCALGEMMA_API_KEY"' : "";
  const messages = request.messages || [{ role: "user", content: request.prompt }];
  const oai = { model: request.lora ? `${model}:${request.lora.split(",")[0].split(":")[0]}` : model, messages };
  for (const k of ["max_tokens", "temperature", "top_p", "seed", "frequency_penalty", "presence_penalty", "stream"]) {
    if (request[k] !== undefined) oai[k] = request[k];
  }
  const pyArgs = Object.entries(oai).map(([k, v]) => `    ${k}=${JSON.stringify(v).replace(/\btrue\b/g, "True").replace(/\bfalse\b/g, "False")},`).join("\n");
  return {
    curl: `curl ${url}${auth} \\\n  -H "Content-Type: application/json" \\\n  -d '${JSON.stringify(request).replace(/'/g, "'\\''")}'`,
    requests: `import requests\n\nresponse = requests.post(\n    "${url}",\n    headers={"Authorization": "Bearer <key>"},\n    json=${json.replace(/\btrue\b/g, "True").replace(/\bfalse\b/g, "False").replace(/\n/g, "\n    ")},${request.stream ? "\n    stream=True," : ""}\n)\nprint(${request.stream ? "response.text" : 'response.json()["result"]'})`,
    openai: `from openai import OpenAI\n\nclient = OpenAI(base_url="${location.origin}/v1", api_key="<key>")\nout = client.chat.completions.create(\n${pyArgs}\n)\n${request.stream ? 'for chunk in out:\n    print(chunk.choices[0].delta.content or "", end="")' : "print(out.choices[0].message.content)"}`,
    worker: `export default {\n  async fetch(request, env) {\n    const answer = await env.AI.run("${model.startsWith("@cf/") ? model : "@cf/google/gemma-2b-it-lora"}", ${json.replace(/\n/g, "\n    ")});\n    return ${request.stream ? 'new Response(answer, { headers: { "content-type": "text/event-stream" } })' : "Response.json(answer)"};\n  },\n};`,
  };
}

function showCode(lang = "curl") {
  let request;
  try { request = body(); } catch (e) { showError(e.message); return; }
  for (const tab of document.querySelectorAll("#code-tabs button")) tab.setAttribute("aria-selected", tab.dataset.lang === lang);
  show("code", snippets(request)[lang]);
  if (!$("code-dialog").open) $("code-dialog").showModal();
}

// -- wiring --------------------------------------------------------------------------------------

async function start() {
  const response = await api("/schema/inputs");
  if (!response.ok) { showError(await errorOf(response)); return; }
  state.schema = await response.json();
  buildSampling();
  await loadModels();
}

for (const tab of document.querySelectorAll(".tabs [data-mode]")) tab.onclick = () => setMode(tab.dataset.mode);
for (const tab of document.querySelectorAll("#code-tabs button")) tab.onclick = () => showCode(tab.dataset.lang);
$("run").onclick = run;
$("stop").onclick = () => state.controller && state.controller.abort();
$("add-turn").onclick = () => addTurn("user", "");
$("clear-turns").onclick = () => { $("turns").innerHTML = ""; addTurn("user", ""); };
$("model").onchange = loadAdapters;
$("adapter").onchange = () => {
  // "none" and adapters together: the one just added wins
  const select = $("adapter");
  const none = select.options[0];
  if (none && none.selected && select.selectedOptions.length > 1) {
    const keepNone = !state.noneWasSelected;
    for (const o of select.options) o.selected = keepNone ? o === none : o !== none && o.selected;
  }
  state.noneWasSelected = Boolean(none && none.selected);
  updateScales();
};
$("register").onsubmit = register;
$("show-code").onclick = () => showCode("curl");
$("close-code").onclick = () => $("code-dialog").close();
$("copy-code").onclick = () => navigator.clipboard && navigator.clipboard.writeText($("code").textContent);
$("key-button").onclick = askForKey;
$("key-save").onclick = () => {
  state.key = $("key").value;
  sessionStorage.setItem("localgemma-key", state.key);
  $("key-box").hidden = true;
  start();
};
const drop = $("drop");
drop.ondragover = (e) => { e.preventDefault(); drop.classList.add("over"); };
drop.ondragleave = () => drop.classList.remove("over");
drop.ondrop = (e) => { e.preventDefault(); drop.classList.remove("over"); $("ft-files").files = e.dataTransfer.files; };
start();
