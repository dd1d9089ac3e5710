// The imagine gallery: one page, no framework, no build step; talks only to its own origin's API
// (every call with `Authorization: Bearer <key>`; images are the presigned URLs the API returns).
"use strict";

(() => {
  const KEY_STORAGE = "imagine.apiKey";
  const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
  const STAGES = {
    queued: "Queued", text_encoder: "Encoding the prompt", diffuser: "Denoising", upscaler: "Upscaling",
    publisher: "Saving", done: "Done",
  };
  const ACTIONS = { imagine: "Imagine", upscale: "Upscale", vary: "Variations", reroll: "Reroll", img2img: "Image to image" };
  const STRENGTHS = { "0.3": "subtle", "0.6": "strong" };
  const PAGE_SIZE = pageSize(new URLSearchParams(location.search).get("page_size"));

  const $ = (id) => document.getElementById(id);
  const ui = {
    keyForm: $("key-form"), keyInput: $("key-input"), keySaved: $("key-saved"), keyLabel: $("key-label"),
    forget: $("forget-key"), alert: $("alert"), status: $("status"), promptForm: $("prompt-form"),
    promptFieldset: $("prompt-fieldset"), promptInput: $("prompt-input"), promptSubmit: $("prompt-submit"),
    feed: $("feed"), feedEmpty: $("feed-empty"), history: $("history"), historyEmpty: $("history-empty"),
    more: $("history-more"), template: $("job-template"),
  };

  let apiKey = localStorage.getItem(KEY_STORAGE) || "";
  let session = new AbortController(); // every request of the current key; aborted when the key is forgotten
  let historyBefore = null;
  const cards = new Map(); // job id -> {article, record, shown (the image keys on screen), controller}
  const historyItems = new Map(); // job id -> <li>

  function pageSize(value) {
    const n = Number.parseInt(value, 10);
    return Number.isFinite(n) && n >= 1 && n <= 100 ? n : 10;
  }

  // ---- small DOM helpers (text only: nothing from the API is ever parsed as HTML) ----------------
  function el(tag, props = {}, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(props)) {
      if (value === undefined || value === null || value === false) continue;
      if (name === "text") node.textContent = value;
      else if (name === "className") node.className = value;
      else if (name === "onclick") node.addEventListener("click", value);
      else node.setAttribute(name, value === true ? "" : String(value));
    }
    node.append(...children.filter((c) => c !== null && c !== undefined));
    return node;
  }

  function showError(error) {
    if (error && error.name === "AbortError") return;
    ui.alert.textContent = error instanceof Error ? error.message : String(error);
  }

  function clearError() {
    ui.alert.textContent = "";
  }

  function announce(message) {
    ui.status.textContent = message;
  }

  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

  // ---- the API ----------------------------------------------------------------------------
  async function errorFrom(response) {
    let body = null;
    try {
      body = await response.json();
    } catch {
      // not JSON: the status line says enough
    }
    const info = (body && body.error) || {};
    let message = info.message || `${response.status} ${response.statusText || "error"}`;
    if (response.status === 401) message += ". Check the API key: forget it and enter another.";
    const retry = response.headers.get("Retry-After");
    if (retry && (response.status === 429 || response.status === 503)) message += ` Retry in ${retry} s.`;
    const error = new Error(message);
    error.status = response.status;
    error.code = info.code || null;
    return error;
  }

  async function api(method, path, body, signal = session.signal) {
    const headers = { Authorization: `Bearer ${apiKey}`, Accept: "application/json" };
    const init = { method, headers, signal, cache: "no-store" };
    if (body !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    const response = await fetch(path, init);
    if (!response.ok) throw await errorFrom(response);
    return response.json();
  }

  const jobPath = (id) => `/v1/jobs/${encodeURIComponent(id)}`;

  // Server-sent events through fetch() (EventSource cannot send the Authorization header): each `data:` line
  // of an event is a job record. Resolves with the last record when the server ends the stream.
  async function streamEvents(id, onRecord, signal) {
    const response = await fetch(`${jobPath(id)}/events`, {
      headers: { Authorization: `Bearer ${apiKey}`, Accept: "text/event-stream" }, signal, cache: "no-store",
    });
    if (!response.ok) throw await errorFrom(response);
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    let last = null;
    const dispatch = (block) => {
      const data = block.split("\n").filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).replace(/^ /, "")).join("\n");
      if (data) {
        last = JSON.parse(data);
        onRecord(last);
      }
    };
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true }).replace(/\r\n?/g, "\n");
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        dispatch(buffer.slice(0, cut));
        buffer = buffer.slice(cut + 2);
      }
    }
    dispatch(buffer);
    return last;
  }

  // Follow a job until it is terminal: its event stream, reconnected (after a fresh read) if it drops.
  async function follow(id) {
    const card = cards.get(id);
    if (!card || card.following) return;
    card.following = true;
    let failures = 0;
    try {
      while (!card.controller.signal.aborted) {
        try {
          const last = await streamEvents(id, updateJob, card.controller.signal);
          if (last && TERMINAL.has(last.state)) return;
          const record = await api("GET", jobPath(id), undefined, card.controller.signal);
          updateJob(record);
          if (TERMINAL.has(record.state)) return;
        } catch (error) {
          if (error.name === "AbortError") return;
          const lasting = error.status && error.status < 500 && error.status !== 429;
          if (lasting || ++failures > 5) {
            showError(error);
            return;
          }
        }
        await sleep(1000 * Math.min(failures + 1, 5));
      }
    } finally {
      card.following = false;
    }
  }

  // ---- formatting --------------------------------------------------------------------------
  const percent = (record) => Math.round(Math.min(Math.max(Number(record.progress) || 0, 0), 1) * 100);
  const prompt = (record) => (record.request && record.request.prompt) || "(no prompt)";
  const when = (seconds) => (seconds ? new Date(seconds * 1000).toLocaleString() : "");

  function seeds(record) {
    const list = (record.images || []).map((image) => image.seed);
    if (list.length) return list.join(", ");
    const req = record.request || {};
    if (req.seed === null || req.seed === undefined) return "random";
    return req.n > 1 ? `${req.seed} to ${req.seed + req.n - 1}` : String(req.seed);
  }

  function stageText(record) {
    const pct = percent(record);
    if (record.state === "queued") {
      let text = "Queued";
      if (record.queue_position !== undefined && record.queue_position !== null) {
        text += `, position ${record.queue_position}`;
      }
      if (record.eta_s) text += `, about ${Math.ceil(record.eta_s)} s`;
      return text;
    }
    if (record.state === "running") return `${STAGES[record.stage] || record.stage || "Running"}: ${pct} %`;
    if (record.state === "succeeded") return "Done: 100 %";
    if (record.state === "cancelled") return "Cancelled";
    return `Failed${record.error_type ? ` (${record.error_type})` : ""}`;
  }

  // The delivered size: the images' own (an upscale job's request keeps its source's size), else the request's.
  function size(record) {
    const [image] = record.images || [];
    const req = record.request || {};
    if (image) return `${image.width}×${image.height}`;
    return req.width && req.height ? `${req.width}×${req.height}` : null;
  }

  function strength(req) {
    if (!req.init_key || req.strength === undefined || req.strength === null) return null;
    const name = STRENGTHS[String(req.strength)];
    return name ? `${req.strength} (${name})` : String(req.strength);
  }

  function settingsOf(record) {
    const req = record.request || {};
    const upscaleOnly = Boolean(req.upscale_only);
    const sampled = req.sample_width && req.sample_height && (req.sample_width !== req.width ||
      req.sample_height !== req.height) ? `${req.sample_width}×${req.sample_height}` : null;
    const rows = [
      ["Prompt", req.prompt],
      ["Negative prompt", upscaleOnly ? null : req.negative_prompt],
      ["Seeds", seeds(record)],
      ["Size", size(record)],
      ["Sampled at", upscaleOnly ? null : sampled],
      ["Images", req.n],
      ["Best of", req.best_of > 1 ? req.best_of : null],
      ["Steps", upscaleOnly ? null : req.steps],
      ["Guidance", upscaleOnly ? null : req.guidance_scale],
      ["Scheduler", upscaleOnly ? null : req.scheduler],
      ["Upscale", upscaleOnly ? `×${req.upscale_only}` : req.upscale ? `×${req.upscale}` : null],
      ["Variation strength", upscaleOnly ? null : strength(req)],
      ["Action", ACTIONS[record.action] || record.action],
      ["Job", record.id],
      ["Created", when(record.created_at)],
    ];
    return rows.filter(([, value]) => value !== undefined && value !== null && value !== "");
  }

  function summary(record) {
    const req = record.request || {};
    const parts = [size(record)];
    if (req.upscale_only) {
      parts.push(`upscale ×${req.upscale_only}`);
    } else {
      if (req.steps) parts.push(`${req.steps} steps`);
      if (req.guidance_scale !== undefined && req.guidance_scale !== null) parts.push(`cfg ${req.guidance_scale}`);
      if (req.scheduler) parts.push(req.scheduler);
      if (strength(req)) parts.push(`strength ${strength(req)}`);
    }
    return parts.filter(Boolean).join(" · ");
  }

  // ---- job cards ---------------------------------------------------------------------------
  function showJob(record, { focus = false } = {}) {
    let card = cards.get(record.id);
    if (!card) {
      const article = ui.template.content.firstElementChild.cloneNode(true);
      article.dataset.jobId = record.id;
      const title = article.querySelector(".job-title");
      title.id = `title-${record.id}`;
      article.setAttribute("aria-labelledby", title.id);
      article.querySelector(".bar").setAttribute("aria-labelledby", title.id);
      const strength = article.querySelector(".strength");
      for (const radio of strength.querySelectorAll("input")) radio.name = `strength-${record.id}`;
      const close = el("button", {
        type: "button", className: "close", text: "Close", "aria-label": "Close this job's view",
        onclick: () => closeJob(record.id),
      });
      article.querySelector("header").append(close);
      card = { article, record, shown: "", controller: new AbortController(), following: false };
      cards.set(record.id, card);
      ui.feed.prepend(article);
      ui.feedEmpty.hidden = true;
    }
    updateJob(record);
    if (!TERMINAL.has(card.record.state)) follow(record.id);
    if (focus) {
      const title = card.article.querySelector(".job-title");
      title.focus();
      card.article.scrollIntoView({ block: "start" });
    }
    return card;
  }

  function closeJob(id) {
    const card = cards.get(id);
    if (!card) return;
    card.controller.abort();
    card.article.remove();
    cards.delete(id);
    ui.feedEmpty.hidden = cards.size > 0;
    ui.promptInput.focus();
  }

  function updateJob(record) {
    updateHistoryItem(record);
    const card = cards.get(record.id);
    if (!card) return;
    const before = card.record.state;
    if (TERMINAL.has(before) && !TERMINAL.has(record.state)) return; // a late, older record
    card.record = record;
    const { article } = card;
    article.dataset.state = record.state;
    article.dataset.action = record.action || "imagine";
    if (record.parent_id) article.dataset.parentId = record.parent_id;
    article.querySelector(".job-title").textContent = prompt(record);
    renderMeta(article.querySelector(".job-meta"), record);

    const pct = percent(record);
    const bar = article.querySelector(".bar");
    bar.setAttribute("aria-valuenow", String(pct));
    bar.setAttribute("aria-valuetext", stageText(record));
    article.querySelector(".fill").style.width = `${pct}%`;
    article.querySelector(".stage").textContent = stageText(record);
    article.querySelector(".progress").classList.toggle("finished", TERMINAL.has(record.state));

    const error = article.querySelector(".job-error");
    error.hidden = record.state !== "failed";
    error.textContent = record.state === "failed" ? `${record.error_type || "error"}: ${record.error || "failed"}` : "";

    const images = record.state === "succeeded" ? record.images || [] : [];
    const shown = images.map((image) => `${image.key} ${image.url}`).join("|");
    if (shown !== card.shown) {
      card.shown = shown;
      renderImages(article, record, images);
    }
    const dl = article.querySelector(".settings");
    dl.replaceChildren(...settingsOf(record).flatMap(([term, value]) => [el("dt", { text: term }),
      el("dd", { text: String(value) })]));

    if (before !== record.state && TERMINAL.has(record.state)) {
      announce(record.state === "succeeded" ? `${images.length} image${images.length === 1 ? "" : "s"} ready: ` +
        `${prompt(record)}` : `Job ${record.state}: ${prompt(record)}`);
    }
  }

  function renderMeta(node, record) {
    const parts = [ACTIONS[record.action] || "Imagine", record.state, when(record.created_at)];
    node.replaceChildren(parts.filter(Boolean).join(" · "));
    if (record.parent_id) {
      node.append(" · ", el("button", {
        type: "button", className: "link", text: "show parent job",
        onclick: () => openJob(record.parent_id),
      }));
    }
  }

  function renderImages(article, record, images) {
    const grid = article.querySelector(".grid");
    grid.className = `grid count-${images.length}`;
    grid.replaceChildren(...images.map((image, index) => {
      const i = index + 1;
      const alt = `${prompt(record)}: image ${i} of ${images.length}, seed ${image.seed}`;
      const img = el("img", { src: image.url, alt, width: image.width, height: image.height });
      img.addEventListener("error", () => {
        img.replaceWith(el("p", { className: "broken", text: `Image ${i} could not be loaded (seed ${image.seed}).` }));
      });
      const caption = [`${i}`, `seed ${image.seed}`, `${image.width}×${image.height}`];
      if (image.score !== undefined && image.score !== null) caption.push(`score ${Number(image.score).toFixed(3)}`);
      return el("figure", {}, el("a", { href: image.url, target: "_blank", rel: "noopener noreferrer" }, img),
        el("figcaption", { text: caption.join(" · ") }));
    }));

    const actions = article.querySelector(".actions");
    actions.hidden = images.length === 0;
    const isUpscale = record.action === "upscale";
    const upscales = article.querySelector(".upscale-row");
    upscales.setAttribute("aria-label", "Upscale");
    upscales.hidden = isUpscale;
    upscales.replaceChildren(...images.map((_, index) => el("button", {
      type: "button", text: `U${index + 1}`, "aria-label": `U${index + 1}: upscale image ${index + 1}`,
      onclick: (event) => runAction(event.currentTarget, `${jobPath(record.id)}/images/${index + 1}/upscale`),
    })));
    const varies = article.querySelector(".vary-row");
    varies.setAttribute("aria-label", "Variations");
    varies.replaceChildren(...images.map((_, index) => el("button", {
      type: "button", text: `V${index + 1}`, "aria-label": `V${index + 1}: vary image ${index + 1}`,
      onclick: (event) => {
        const checked = article.querySelector(".strength input:checked");
        const strength = Number.parseFloat(checked ? checked.value : "0.6");
        runAction(event.currentTarget, `${jobPath(record.id)}/images/${index + 1}/variations`, { strength });
      },
    })));
    const reroll = article.querySelector(".reroll");
    reroll.hidden = isUpscale;
    reroll.setAttribute("aria-label", "Reroll this prompt");
    reroll.onclick = (event) => runAction(event.currentTarget, `${jobPath(record.id)}/reroll`);
  }

  async function runAction(button, path, body) {
    button.disabled = true;
    try {
      const child = await api("POST", path, body);
      clearError();
      showJob(child);
      addHistoryItem(child, "start");
      announce(`${ACTIONS[child.action] || "Job"} queued: ${prompt(child)}`);
    } catch (error) {
      showError(error);
    } finally {
      button.disabled = false;
    }
  }

  async function openJob(id) {
    const existing = cards.get(id);
    if (existing) {
      showJob(existing.record, { focus: true });
      return;
    }
    try {
      showJob(await api("GET", jobPath(id)), { focus: true }); // a fresh record: fresh image URLs
    } catch (error) {
      showError(error);
    }
  }

  // ---- history -----------------------------------------------------------------------------
  function historyContent(record) {
    const state = el("span", { className: `state state-${record.state}`, text: record.state });
    const settings = summary(record);
    return [
      el("span", { className: "history-prompt", text: prompt(record) }),
      el("span", { className: "history-line" }, state, ` · ${ACTIONS[record.action] || "Imagine"} · seeds ${seeds(record)}`),
      settings ? el("span", { className: "history-line", text: settings }) : null,
      el("span", { className: "history-line", text: when(record.created_at) }),
    ].filter(Boolean);
  }

  function addHistoryItem(record, where) {
    if (historyItems.has(record.id)) {
      updateHistoryItem(record);
      return;
    }
    const button = el("button", { type: "button", className: "history-entry", onclick: () => openJob(record.id) },
      ...historyContent(record));
    const item = el("li", { "data-job-id": record.id }, button);
    historyItems.set(record.id, item);
    if (where === "start") ui.history.prepend(item);
    else ui.history.append(item);
    ui.historyEmpty.hidden = true;
  }

  function updateHistoryItem(record) {
    const item = historyItems.get(record.id);
    if (item) item.firstElementChild.replaceChildren(...historyContent(record));
  }

  async function loadHistory({ reset = false } = {}) {
    if (reset) {
      historyBefore = null;
      historyItems.clear();
      ui.history.replaceChildren();
    }
    const query = new URLSearchParams({ limit: String(PAGE_SIZE) });
    if (historyBefore !== null) query.set("before", String(historyBefore));
    const page = await api("GET", `/v1/jobs?${query}`);
    const added = [];
    for (const record of page.jobs || []) {
      if (!historyItems.has(record.id)) {
        addHistoryItem(record, "end");
        added.push(record.id);
      }
    }
    historyBefore = page.next_before === undefined ? null : page.next_before;
    ui.more.hidden = historyBefore === null;
    ui.historyEmpty.hidden = historyItems.size > 0;
    return added;
  }

  async function loadMore() {
    ui.more.disabled = true;
    try {
      const added = await loadHistory();
      clearError();
      const first = added.length ? historyItems.get(added[0]) : null;
      if (first) first.firstElementChild.focus(); // keyboard users continue where the new entries start
      else if (ui.more.hidden) ui.history.lastElementChild?.firstElementChild.focus();
    } catch (error) {
      showError(error);
    } finally {
      ui.more.disabled = false;
    }
  }

  // ---- the key -----------------------------------------------------------------------------
  function renderKey() {
    const has = Boolean(apiKey);
    ui.keyForm.hidden = has;
    ui.keySaved.hidden = !has;
    ui.promptFieldset.disabled = !has;
    const shown = apiKey.length > 12 ? `${apiKey.slice(0, 4)}…${apiKey.slice(-4)}` : "…";
    ui.keyLabel.textContent = has ? `Using key ${shown}` : "";
  }

  async function useKey(key) {
    apiKey = key;
    session = new AbortController();
    try {
      await loadHistory({ reset: true });
    } catch (error) {
      if (error.status === 401) { // a key the server refuses is not kept
        apiKey = "";
        showError(error);
        return false;
      }
      showError(error);
    }
    localStorage.setItem(KEY_STORAGE, key);
    renderKey();
    return true;
  }

  function forgetKey() {
    session.abort();
    for (const card of cards.values()) card.controller.abort();
    cards.clear();
    historyItems.clear();
    localStorage.removeItem(KEY_STORAGE);
    apiKey = "";
    historyBefore = null;
    ui.feed.replaceChildren();
    ui.history.replaceChildren();
    ui.feedEmpty.hidden = false;
    ui.historyEmpty.hidden = false;
    ui.more.hidden = true;
    clearError();
    renderKey();
    ui.keyInput.value = "";
    ui.keyInput.focus();
    announce("API key forgotten");
  }

  // ---- wiring ------------------------------------------------------------------------------
  ui.keyForm.addEventListener("submit", async (event) => {
    event.preventDefault();
    const key = ui.keyInput.value.trim();
    if (!key) return;
    clearError();
    if (await useKey(key)) {
      ui.keyInput.value = "";
      ui.promptInput.focus();
      announce("API key saved in this browser");
    }
  });

  ui.forget.addEventListener("click", forgetKey);

  ui.promptForm.addEventListener("submit", async (event) => {
    event.preventDefault();
    const text = ui.promptInput.value.trim();
    if (!text || !apiKey) return;
    ui.promptSubmit.disabled = true;
    try {
      const record = await api("POST", "/v1/jobs", { prompt: text });
      clearError();
      showJob(record);
      addHistoryItem(record, "start");
      announce(`Job queued: ${prompt(record)}`);
    } catch (error) {
      showError(error);
    } finally {
      ui.promptSubmit.disabled = false;
    }
  });

  ui.more.addEventListener("click", loadMore);

  renderKey();
  if (apiKey) {
    const key = apiKey;
    loadHistory({ reset: true }).catch((error) => {
      if (key === apiKey) showError(error);
    });
    ui.promptInput.focus();
  } else {
    ui.keyInput.focus();
  }
})();
