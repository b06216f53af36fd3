// saehook playground: talks to `saehook serve` through its OpenAI endpoints (streamed, with the
// `saehook` extension) and the playground endpoints (/v1/saehook/...). Plain browser JavaScript,
// no libraries, nothing fetched from outside this server.
"use strict";

const $ = (id) => document.getElementById(id);
const S = {
  info: null, sae: null,             // /v1/saehook/playground, the chosen SAE's entry
  labels: new Map(),                 // feature -> label text or null
  spec: [],                          // [{feature, op, value, positions, max, min}]
  selected: null,                    // the feature the op form adds
  shade: null,                       // the feature the text is shaded by
  tokens: [],                        // every rendered token entry, indexed by the span's data-t
  history: [],                       // chat messages so far / completion text so far
  running: [],                       // AbortControllers of the requests in flight
  inspected: null,                   // the token span the inspector shows
};
const VALUE_OPS = {add: [-20, 20, 0.5, 8], clamp: [-20, 20, 0.5, 8], scale: [0, 5, 0.1, 2], rescale: [0, 5, 0.1, 0]};

// ---------------------------------------------------------------- server calls and errors

function headers(json) {
  const h = {};
  if (json) h["Content-Type"] = "application/json";
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

async function errorText(resp) {
  // OpenAI's error object when the server sent one, else the status and body text
  const text = await resp.text();
  try {
    const e = JSON.parse(text).error;
    if (e && e.message) return `${resp.status}: ${e.message}` + (e.param ? ` (field: ${e.param})` : "");
  } catch (_) { /* not JSON */ }
  return `${resp.status} ${resp.statusText}: ${text.slice(0, 300)}`;
}

async function api(path, opts = {}) {
  let resp;
  try {
    resp = await fetch(path, {...opts, headers: headers(!!opts.body)});
  } catch (e) {
    throw new Error(`the server did not answer ${path}: ${e.message}`);
  }
  if (!resp.ok) throw new Error(`${path}: ${await errorText(resp)}`);
  return resp;
}

function showError(msg) {
  const el = $("error");
  el.textContent = msg;
  el.hidden = false;
}
function clearError() { $("error").hidden = true; $("error").textContent = ""; }

// ---------------------------------------------------------------- start

async function loadInfo() {
  try {
    S.info = await (await api("/v1/saehook/playground")).json();
  } catch (e) {
    $("server-info").textContent = "not connected";
    showError(e.message + (e.message.includes("401") ? " — enter the API key under Settings" : ""));
    return;
  }
  clearError();
  const sel = $("sae");
  sel.replaceChildren(...S.info.saes.map((s) => new Option(`${s.name} (layer ${s.layer}, ${s.d_sae} features)`, s.name)));
  if (!S.info.saes.length) showError("this server has no SAE loaded (saehook serve --sae NAME=PATH): nothing to inspect or steer");
  $("mode").value = S.info.chat ? "chat" : "completion";
  if (!S.info.chat) $("mode").options[0].disabled = true;
  $("max-tokens").max = S.info.max_tokens;
  chooseSae();
}

function chooseSae() {
  S.sae = S.info.saes.find((s) => s.name === $("sae").value) || null;
  S.labels.clear();
  const s = S.sae;
  $("top").max = s ? Math.min(s.k, S.info.max_top) : 1;
  $("top").value = s ? Math.min(+$("top").value || 8, s.k, S.info.max_top) : 1;
  $("server-info").textContent = `${S.info.model} · ` + (s ? `SAE ${s.name}: layer ${s.layer}, ${s.d_sae} features, k ${s.k}, ` +
    (s.labels ? `${s.labels} labels` : "no labels") : "no SAE") + ` · ${S.info.parallel} at once`;
  if (s && s.labels_error) showError(s.labels_error);
  const op = $("op");
  op.replaceChildren(...S.info.ops.map((o) => {
    const spec_only = !S.info.request_ops.includes(o);
    const opt = new Option(o + (spec_only ? " (copied spec only)" : ""), o);
    return opt;
  }));
  renderSpec();
}

// ---------------------------------------------------------------- labels

async function fetchLabels(features) {
  if (!S.sae || !S.sae.labels) return;
  const want = [...new Set(features)].filter((f) => !S.labels.has(f));
  for (let i = 0; i < want.length; i += 200) {
    const part = want.slice(i, i + 200);
    const q = new URLSearchParams({sae: S.sae.name, features: part.join(",")});
    try {
      const r = await (await api("/v1/saehook/labels?" + q)).json();
      for (const [f, l] of Object.entries(r.data)) S.labels.set(+f, l);
    } catch (e) { showError(e.message); return; }
  }
}
const labelOf = (f) => S.labels.get(f) || null;

function featureName(f) {
  const l = labelOf(f);
  return l ? `feature ${f} “${l}”` : `feature ${f}`;
}

// ---------------------------------------------------------------- tokens

function tokenSpan(entry, group) {
  const span = document.createElement("span");
  span.className = "tok";
  let text = entry.token;
  if (text === "") { text = `⟨${entry.id}⟩`; span.classList.add("special"); }
  span.textContent = text.replace(/\n/g, "↵\n");
  span.dataset.t = S.tokens.length;
  S.tokens.push({...entry, group});
  span.tabIndex = group.querySelector(".tok") ? -1 : 0;   // roving tabindex: one stop per text
  applyShade(span);
  return span;
}

function tokenKeys(ev) {
  const t = ev.target;
  if (!t.classList.contains("tok")) return;
  const all = [...t.parentElement.querySelectorAll(".tok")];
  let i = all.indexOf(t);
  if (ev.key === "ArrowRight" || ev.key === "ArrowDown") i = Math.min(all.length - 1, i + 1);
  else if (ev.key === "ArrowLeft" || ev.key === "ArrowUp") i = Math.max(0, i - 1);
  else if (ev.key === "Home") i = 0;
  else if (ev.key === "End") i = all.length - 1;
  else if (ev.key === "Enter" || ev.key === " ") {
    const e = S.tokens[+t.dataset.t];
    if (e.top.length) setShade(e.top[0].feature);
    ev.preventDefault();
    return;
  } else return;
  ev.preventDefault();
  t.tabIndex = -1;
  all[i].tabIndex = 0;
  all[i].focus();
}

function tokenGroup(label) {
  const div = document.createElement("div");
  div.className = "tokens";
  div.setAttribute("role", "group");
  div.setAttribute("aria-label", label + " (arrow keys move between tokens, Enter shades by the token's top feature)");
  div.addEventListener("keydown", tokenKeys);
  div.addEventListener("focusin", (ev) => ev.target.classList.contains("tok") && inspect(ev.target));
  div.addEventListener("mouseover", (ev) => ev.target.classList.contains("tok") && inspect(ev.target));
  div.dataset.label = label;
  return div;
}

function inspect(span) {
  S.inspected = span;
  const e = S.tokens[+span.dataset.t];
  const missing = e.top.map((x) => x.feature).filter((f) => !S.labels.has(f));
  if (S.sae && S.sae.labels && missing.length)   // show it now, and again with the labels once they come
    fetchLabels(missing).then(() => { if (S.inspected === span) inspect(span); });
  const box = $("inspect");
  const head = document.createElement("p");
  head.innerHTML = "";
  const name = document.createElement("span");
  name.className = "tokname";
  name.textContent = JSON.stringify(e.token);
  head.append(name, ` position ${e.position}, token id ${e.id} · ${e.group.dataset.label.split(" (")[0]}`);
  const table = document.createElement("table");
  table.innerHTML = "<caption class='hint'>top features at this token</caption><thead><tr><th>feature</th><th>label</th><th>value</th><th><span class='hint'>actions</span></th></tr></thead>";
  const body = document.createElement("tbody");
  for (const {feature, value} of e.top) {
    const tr = document.createElement("tr");
    tr.innerHTML = `<td>${feature}</td><td class="label-text"></td><td class="num">${value.toFixed(3)}</td><td class="feat-actions"></td>`;
    tr.children[1].textContent = labelOf(feature) || "";
    tr.children[3].append(button("Shade", () => setShade(feature), `shade the text by feature ${feature}`),
                          button("Steer", () => selectFeature(feature), `steer feature ${feature}`));
    if (feature === S.shade) tr.classList.add("shaded-by");
    body.append(tr);
  }
  if (!e.top.length) body.innerHTML = "<tr><td colspan='4'>no features at this token</td></tr>";
  table.append(body);
  box.replaceChildren(head, table);
}

function button(text, fn, aria) {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = text;
  if (aria) b.setAttribute("aria-label", aria);
  b.addEventListener("click", fn);
  return b;
}

// ---------------------------------------------------------------- shading

function valueAt(e, f) {
  const hit = e.top.find((x) => x.feature === f);
  return hit ? hit.value : 0;
}

function shadeMax() {
  let m = 0;
  for (const e of S.tokens) m = Math.max(m, valueAt(e, S.shade));
  return m;
}

function applyShade(span) {
  if (S.shade === null) { span.style.removeProperty("--a"); return; }
  const v = valueAt(S.tokens[+span.dataset.t], S.shade);
  const m = S.shadeMax || 1;
  span.style.setProperty("--a", Math.max(0, Math.min(1, v / m)).toFixed(3));
  span.title = `feature ${S.shade}: ${v.toFixed(3)}`;
}

function setShade(f) {
  S.shade = f;
  S.shadeMax = f === null ? 0 : shadeMax();
  document.querySelectorAll(".tok").forEach(applyShade);
  const lg = $("legend");
  if (f === null) { lg.hidden = true; lg.replaceChildren(); return; }
  lg.hidden = false;
  const txt = document.createElement("span");
  txt.textContent = `Shaded by ${featureName(f)}:`;
  const bar = document.createElement("span");
  bar.className = "bar";
  bar.setAttribute("aria-hidden", "true");
  const lo = document.createElement("span");
  lo.textContent = "0";
  const hi = document.createElement("span");
  hi.textContent = S.shadeMax.toFixed(2);
  const note = document.createElement("span");
  note.className = "hint";
  note.textContent = `(tokens where it is not among the top ${$("top").value} show 0)`;
  lg.replaceChildren(txt, lo, bar, hi, note, button("Clear shading", () => setShade(null)));
  const cur = document.activeElement;
  if (cur && cur.classList.contains("tok")) inspect(cur);
}

// ---------------------------------------------------------------- finding features

function selectFeature(f) {
  if (!S.sae) return showError("no SAE loaded");
  if (!Number.isInteger(f) || f < 0 || f >= S.sae.d_sae) return showError(`feature ${f} is out of range (0..${S.sae.d_sae - 1})`);
  S.selected = f;
  $("op-form").hidden = false;
  $("op-feature").textContent = `Steer ${featureName(f)}`;
  opChanged();
  $("op").focus();
}

function foundList(items, what) {
  const ul = $("found");
  if (!items.length) {
    const li = document.createElement("li");
    li.textContent = what;
    ul.replaceChildren(li);
    return;
  }
  ul.replaceChildren(...items.map(({feature, label, note}) => {
    const li = document.createElement("li");
    const l = document.createElement("span");
    l.className = "label";
    l.textContent = `${feature}` + (label ? ` “${label}”` : "") + (note ? ` · ${note}` : "");
    li.append(l, button("Steer", () => selectFeature(feature), `steer feature ${feature}`),
              button("Shade", () => setShade(feature), `shade the text by feature ${feature}`),
              button("Similar", () => similar(feature), `features with a decoder direction like feature ${feature}'s`));
    return li;
  }));
}

async function find(ev) {
  ev.preventDefault();
  clearError();
  const q = $("find").value.trim();
  if (!q) return;
  if (/^\d+$/.test(q)) { selectFeature(+q); return; }
  if (!S.sae) return;
  try {
    const r = await (await api("/v1/saehook/search?" + new URLSearchParams({sae: S.sae.name, q, top: 20}))).json();
    r.data.forEach((h) => S.labels.set(h.feature, h.label));
    foundList(r.data.map((h) => ({feature: h.feature, label: h.label, note: `score ${h.score.toFixed(2)}`})),
              r.labels ? `no label matches “${q}”` : `SAE ${S.sae.name} has no labels: find features by id, from a token, or with “Features of this text”`);
  } catch (e) { showError(e.message); }
}

async function similar(f) {
  try {
    const r = await (await api("/v1/saehook/similar?" + new URLSearchParams({sae: S.sae.name, feature: f, top: 10}))).json();
    r.data.forEach((h) => S.labels.set(h.feature, h.label));
    foundList(r.data.map((h) => ({feature: h.feature, label: h.label, note: `cosine ${h.cosine.toFixed(3)} with ${f}`})), "none");
  } catch (e) { showError(e.message); }
}

function textFeatures() {
  // total activation over the tokens on the page (prompt and answers), largest first
  const sum = new Map(), n = new Map();
  for (const e of S.tokens) for (const {feature, value} of e.top) {
    sum.set(feature, (sum.get(feature) || 0) + value);
    n.set(feature, (n.get(feature) || 0) + 1);
  }
  const items = [...sum.entries()].sort((a, b) => b[1] - a[1] || a[0] - b[0]).slice(0, 12)
    .map(([feature, s]) => ({feature, label: labelOf(feature), note: `total ${s.toFixed(1)} over ${n.get(feature)} tokens`}));
  foundList(items, "no text yet: send a message first");
}

// ---------------------------------------------------------------- the op form and the spec

function valueRange(op, f) {
  // [min, max, step, default]; add and clamp reach twice the feature's largest value on the page
  const v = VALUE_OPS[op];
  if (!v || (op !== "add" && op !== "clamp")) return v;
  let peak = 0;
  for (const e of S.tokens) peak = Math.max(peak, valueAt(e, f));
  const hi = Math.max(v[1], Math.ceil(2 * peak));
  return [-hi, hi, hi > 40 ? 1 : 0.5, op === "clamp" && peak > 0 ? Math.round(2 * peak) : v[3]];
}

function opChanged() {
  const op = $("op").value;
  const v = valueRange(op, S.selected);
  $("value-row").hidden = !v;
  $("cap-row").hidden = op !== "cap";
  if (v) {
    const [lo, hi, step, def] = v;
    Object.assign($("value-range"), {min: lo, max: hi, step});
    $("value").value = $("value-range").value = def;
    $("value-label").textContent = op === "add" ? "Strength" : op === "clamp" ? "Value" : "Factor";
  }
  $("op-note").textContent = S.info.request_ops.includes(op) ? "" :
    `This server's requests do not take ${op} yet: it goes into the copied --spec, not into a message.`;
}

function addOp(ev) {
  ev.preventDefault();
  const op = $("op").value;
  const o = {feature: S.selected, op, positions: $("positions").value, range: valueRange(op, S.selected)};
  if (VALUE_OPS[op]) {
    o.value = parseFloat($("value").value);
    if (!Number.isFinite(o.value)) return showError("the value must be a number");
  }
  if (op === "cap") {
    o.max = $("cap-max").value === "" ? null : parseFloat($("cap-max").value);
    o.min = $("cap-min").value === "" ? null : parseFloat($("cap-min").value);
    if (o.max === null && o.min === null) return showError("cap needs a max and/or a min");
  }
  if (S.spec.length >= S.info.max_steer_ops) return showError(`this server takes at most ${S.info.max_steer_ops} ops per request`);
  clearError();
  S.spec.push(o);
  renderSpec();
}

function wireOp(o) {
  // one op of the server's `saehook.steer`
  const w = {sae: S.sae.name, layer: S.sae.layer, feature: o.feature, op: o.op};
  if (o.op === "cap") { if (o.max !== null) w.max = o.max; if (o.min !== null) w.min = o.min; }
  else if (o.op !== "ablate") w.value = o.value;
  if (o.positions !== "all") w.positions = o.positions;
  return w;
}
const saehookObject = () => ({steer: S.spec.map(wireOp)});

function specForm() {
  // saehook.steering_spec's JSON (saehook steer --spec): one steering per positions
  const by = new Map();
  for (const o of S.spec) {
    if (!by.has(o.positions)) by.set(o.positions, []);
    const j = {op: o.op, feature: o.feature};
    if (o.op === "cap") { if (o.max !== null) j.max = o.max; if (o.min !== null) j.min = o.min; }
    else if (o.op !== "ablate") j.value = o.value;
    by.get(o.positions).push(j);
  }
  return [...by.entries()].map(([positions, ops]) => ({layer: S.sae.layer, positions, ops}));
}

const addOnly = () => S.spec.length > 0 && S.spec.every((o) => o.op === "add" && o.positions === "all");

function renderSpec() {
  const ul = $("spec");
  ul.replaceChildren(...S.spec.map((o, i) => {
    const li = document.createElement("li");
    const l = document.createElement("span");
    l.className = "label";
    l.textContent = `${o.op} ${featureName(o.feature)}` + (o.op === "cap" ? ` to [${o.min ?? "−∞"}, ${o.max ?? "∞"}]` : "") +
      (o.positions !== "all" ? ` · ${o.positions} tokens` : "");
    li.append(l);
    const v = o.range;
    if (v) {
      const range = Object.assign(document.createElement("input"), {type: "range", min: v[0], max: v[1], step: v[2], value: o.value});
      const num = Object.assign(document.createElement("input"), {type: "number", step: "any", value: o.value});
      const aria = `value of op ${i + 1} (${o.op} feature ${o.feature})`;
      range.setAttribute("aria-label", aria);
      num.setAttribute("aria-label", aria);
      range.addEventListener("input", () => { o.value = +range.value; num.value = range.value; renderJson(); });
      num.addEventListener("change", () => {
        const x = parseFloat(num.value);
        if (Number.isFinite(x)) { o.value = x; range.value = x; renderJson(); } else showError("the value must be a number");
      });
      li.append(range, num);
    }
    li.append(button("Remove", () => { S.spec.splice(i, 1); renderSpec(); }, `remove op ${i + 1} (${o.op} feature ${o.feature})`));
    return li;
  }));
  if (!S.spec.length) {
    const li = document.createElement("li");
    li.className = "hint";
    li.textContent = "no steering: answers are the model's own";
    ul.append(li);
  }
  renderJson();
}

function renderJson() {
  $("spec-json").textContent = S.sae ? JSON.stringify(saehookObject(), null, 1) : "";
  const cv = $("download-cvec");
  cv.disabled = !addOnly() || !S.sae || S.sae.layer < 1;
  cv.title = cv.disabled ? "a control vector holds add ops on all positions only (a fixed vector), at a layer >= 1" : "";
}

async function copy(text, what) {
  try {
    await navigator.clipboard.writeText(text);
  } catch (_) {  // no clipboard API (not a secure context): select and copy
    const ta = Object.assign(document.createElement("textarea"), {value: text});
    document.body.append(ta);
    ta.select();
    const ok = document.execCommand("copy");
    ta.remove();
    if (!ok) { $("spec-status").textContent = `${what}: copying failed; select the text above`; return; }
  }
  $("spec-status").textContent = `${what} copied`;
}

async function downloadCvec() {
  clearError();
  try {
    const r = await api("/v1/saehook/control-vector", {method: "POST", body: JSON.stringify({saehook: saehookObject()})});
    const blob = await r.blob();
    const a = Object.assign(document.createElement("a"), {href: URL.createObjectURL(blob), download: "saehook-control-vector.gguf"});
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(a.href), 10000);
    $("spec-status").textContent = `control vector downloaded (${blob.size} bytes): llama-server --control-vector saehook-control-vector.gguf`;
  } catch (e) { showError(e.message); }
}

// ---------------------------------------------------------------- sending

function answerBox(kind) {
  const div = document.createElement("div");
  div.className = "answer " + kind;
  const h = document.createElement("h3");
  h.textContent = kind === "steered" ? "Steered" : "Default (no steering)";
  const status = document.createElement("p");
  status.className = "status";
  status.setAttribute("aria-live", "polite");
  status.textContent = "waiting…";
  const toks = tokenGroup(kind === "steered" ? "steered answer" : "default answer");
  div.append(h, toks, status);
  return {div, toks, status, text: "", n: 0};
}

async function stream(body, box, promptBox) {
  const ctl = new AbortController();
  S.running.push(ctl);
  const path = $("mode").value === "chat" ? "/v1/chat/completions" : "/v1/completions";
  let finish = null;
  try {
    let resp;
    try {
      resp = await fetch(path, {method: "POST", headers: headers(true), body: JSON.stringify(body), signal: ctl.signal});
    } catch (e) { throw new Error(`the server did not answer: ${e.message}`); }
    if (!resp.ok) throw new Error(await errorText(resp));
    box.status.textContent = "generating…";
    const reader = resp.body.getReader();
    const dec = new TextDecoder();
    let buf = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buf += dec.decode(value, {stream: true});
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const ev = buf.slice(0, cut);
        buf = buf.slice(cut + 2);
        for (const line of ev.split("\n")) {
          if (!line.startsWith("data: ")) continue;
          const data = line.slice(6);
          if (data === "[DONE]") continue;
          const msg = JSON.parse(data);
          if (msg.error) throw new Error(`the server stopped this answer: ${msg.error.message}` + (msg.error.param ? ` (field: ${msg.error.param})` : ""));
          const c = msg.choices && msg.choices[0];
          if (!c) continue;
          const feats = (c.saehook && c.saehook.features) || [];
          if (feats.length && feats[0].position === 0) {    // the prompt's tokens come first, from position 0
            if (promptBox && !promptBox.querySelector(".tok")) feats.forEach((e) => promptBox.append(tokenSpan(e, promptBox)));
          } else {
            feats.forEach((e) => box.toks.append(tokenSpan(e, box.toks)));
            box.n += feats.length;
          }
          box.text += c.delta ? (c.delta.content || "") : (c.text || "");
          if (c.finish_reason) finish = c.finish_reason;
          box.status.textContent = `generating… ${box.n} tokens`;
        }
      }
    }
    box.status.textContent = `${box.n} tokens` + (finish ? ` · ${finish === "length" ? "max tokens reached" : "finished: " + finish}` : "");
    return box.text;
  } catch (e) {
    box.status.classList.add("failed");
    box.status.textContent = e.name === "AbortError" ? "stopped" : "failed: " + e.message;
    if (e.name !== "AbortError") showError(e.message);
    return null;
  } finally {
    S.running = S.running.filter((x) => x !== ctl);
  }
}

async function send(ev) {
  ev.preventDefault();
  if (S.running.length) return;
  const text = $("prompt").value;
  if (!text.trim()) return showError("type a message first");
  if (!S.info) return showError("not connected to the server");
  if (!S.sae) return showError("this server has no SAE");
  const unsupported = S.spec.filter((o) => !S.info.request_ops.includes(o.op));
  if (unsupported.length) return showError(`this server's requests do not take ${[...new Set(unsupported.map((o) => o.op))].join(", ")}: ` +
                                           "remove those ops (they stay available in the copied --spec)");
  clearError();
  const chat = $("mode").value === "chat";
  const base = {max_tokens: +$("max-tokens").value || 48, temperature: +$("temperature").value, stream: true};
  if ($("seed").value !== "") base.seed = +$("seed").value;
  if (chat) base.messages = [...S.history, {role: "user", content: text}];
  else base.prompt = (S.history.join("") + text);
  const features = {sae: S.sae.name, top: +$("top").value || 8, prompt: true};
  const runs = [];
  if (S.spec.length) runs.push(["steered", {...base, saehook: {...saehookObject(), features}}]);
  if (!S.spec.length || $("compare").checked) runs.push(["default", {...base, saehook: {features}}]);

  const turn = document.createElement("article");
  turn.className = "turn";
  const h = document.createElement("h3");
  h.textContent = `Prompt (every token the model reads, the chat template's included)` + (S.spec.length ? ` · spec: ${S.spec.length} op(s)` : "");
  const promptBox = tokenGroup("prompt");
  const answers = document.createElement("div");
  answers.className = "answers";
  const boxes = runs.map(([kind]) => answerBox(kind));
  boxes.forEach((b) => answers.append(b.div));
  turn.append(h, promptBox, answers);
  $("turns").append(turn);
  $("send").disabled = true;
  $("stop").disabled = false;
  // the prompt's tokens are shown as the default run reads them (unsteered) when there is one
  const promptFrom = runs.length - 1;
  const texts = await Promise.all(runs.map(([, body], i) => stream(body, boxes[i], i === promptFrom ? promptBox : null)));
  $("send").disabled = false;
  $("stop").disabled = true;
  const kept = texts[0];   // the steered answer continues the conversation when there is one
  if (kept !== null) {
    if (chat) S.history.push({role: "user", content: text}, {role: "assistant", content: kept});
    else S.history.push(text, kept);
    $("prompt").value = "";
  }
  await fetchLabels(S.tokens.flatMap((e) => e.top.map((x) => x.feature)));
  if (S.shade !== null) setShade(S.shade);
}

// ---------------------------------------------------------------- wiring

$("prompt-form").addEventListener("submit", send);
$("prompt").addEventListener("keydown", (ev) => { if (ev.key === "Enter" && (ev.ctrlKey || ev.metaKey)) send(ev); });
$("stop").addEventListener("click", () => S.running.forEach((c) => c.abort()));
$("clear").addEventListener("click", () => {
  S.history = []; S.tokens = []; $("turns").replaceChildren(); setShade(null);
  $("inspect").innerHTML = "<p class='hint'>Hover or focus a token to see its top features.</p>";
});
$("find-form").addEventListener("submit", find);
$("text-features").addEventListener("click", textFeatures);
$("op").addEventListener("change", opChanged);
$("value-range").addEventListener("input", () => { $("value").value = $("value-range").value; });
$("value").addEventListener("input", () => { $("value-range").value = $("value").value; });
$("op-form").addEventListener("submit", addOp);
$("copy-json").addEventListener("click", () => copy(JSON.stringify(saehookObject()), "saehook JSON"));
$("copy-spec").addEventListener("click", () => copy(JSON.stringify(specForm(), null, 1), "--spec JSON"));
$("download-cvec").addEventListener("click", downloadCvec);
$("clear-spec").addEventListener("click", () => { S.spec = []; renderSpec(); });
$("sae").addEventListener("change", chooseSae);
$("api-key").addEventListener("change", loadInfo);
loadInfo();
