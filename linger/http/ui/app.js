// Linger's dashboard. Everything it shows comes from the API, read with the token the
// page asks for (kept in sessionStorage, sent as a bearer header, never in a URL).
// Names and bodies are client data: they only ever reach the page as text nodes
// (textContent), never as markup.
"use strict";

(() => {
  const POLL_MS = 2000;
  const HISTORY = 90; // rate samples kept: 3 minutes at one every 2 s
  const PROCESS_TTL_MS = 60000; // a process not heard from for a minute is forgotten
  const PEEK_N = 10;
  const BODY_SHOWN = 240; // characters of a text body shown before "more"
  const BYTES_SHOWN = 32; // bytes of a binary body shown in hex
  const STATES = ["ready", "hidden", "delayed"];
  const TOKEN_KEY = "linger.token";

  const $ = (id) => document.getElementById(id);

  const state = {
    token: sessionStorage.getItem(TOKEN_KEY),
    // The token's patterns by action; null: no --auth (everything); undefined: unknown.
    scopes: undefined,
    auth: false,
    generation: 0,
    timer: null,
    asking: false,
    processes: new Map(),
    adds: [],
    deliveries: [],
    channelRows: new Map(),
    peekRows: new Map(STATES.map((s) => [s, new Map()])),
    topicsKey: "",
    view: null,
    total: undefined, // the open channel's message count; undefined: not known
    busy: false, // an action's request is running: its buttons are disabled
  };

  class HttpError extends Error {
    constructor(status, text) {
      super(text);
      this.status = status;
    }
  }

  // --- small DOM helpers: text only ---------------------------------------------------

  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(props || {})) {
      if (key === "text") node.textContent = value;
      else if (key === "class") node.className = value;
      else if (key === "dataset") Object.assign(node.dataset, value);
      else node[key] = value;
    }
    for (const child of children) {
      node.append(typeof child === "string" ? document.createTextNode(child) : child);
    }
    return node;
  }

  function setText(node, text) {
    const value = String(text);
    if (node.textContent !== value) node.textContent = value;
  }

  // A keyed set of rows kept in place: created once, updated, moved or removed.
  function syncRows(tbody, rows, items, keyOf, create, update) {
    const seen = new Set();
    let position = 0;
    for (const item of items) {
      const key = keyOf(item);
      seen.add(key);
      let row = rows.get(key);
      if (row === undefined) {
        row = create(item);
        rows.set(key, row);
      }
      update(row, item);
      if (tbody.children[position] !== row.tr) {
        tbody.insertBefore(row.tr, tbody.children[position] || null);
      }
      position += 1;
    }
    for (const [key, row] of rows) {
      if (!seen.has(key)) {
        row.tr.remove();
        rows.delete(key);
      }
    }
  }

  // A name in a path: percent-encoded, with the characters the API does not take
  // literally (! ' ( ) *) encoded too.
  function enc(name) {
    return encodeURIComponent(name).replace(
      /[!'()*]/g,
      (c) => "%" + c.charCodeAt(0).toString(16).toUpperCase(),
    );
  }

  // "." and ".." cannot be a path segment of a request the browser sends: it folds them
  // (percent-encoded too: %2E and %2E%2E are dot segments by the URL standard), so the
  // page would read /stats or /topics instead. Such a channel is shown, never fetched.
  function unreachable(name) {
    return name === "." || name === "..";
  }

  function channelHref(name) {
    return "#/channel/" + enc(name);
  }

  function channelLink(name) {
    return el("a", { href: channelHref(name), text: name });
  }

  function duration(seconds) {
    if (seconds === null || seconds === undefined) return "–";
    const s = Math.max(0, Math.floor(seconds));
    if (s < 60) return s + " s";
    if (s < 3600) return Math.floor(s / 60) + " min " + (s % 60) + " s";
    if (s < 86400) return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " min";
    return Math.floor(s / 86400) + " d " + Math.floor((s % 86400) / 3600) + " h";
  }

  function count(value) {
    return value === null || value === undefined ? "–" : String(value);
  }

  // --- the API ------------------------------------------------------------------------

  async function api(method, path) {
    const headers = { Accept: "application/json" };
    if (state.token) headers.Authorization = "Bearer " + state.token;
    let response;
    try {
      response = await fetch(path, { method, headers, cache: "no-store", credentials: "omit" });
    } catch (error) {
      throw new HttpError(0, "Cannot reach the server.");
    }
    if (response.status === 204) return null;
    let body = null;
    try {
      body = await response.json();
    } catch (error) {
      body = null;
    }
    if (!response.ok) {
      throw new HttpError(response.status, (body && body.error) || response.statusText);
    }
    return body;
  }

  // Whether the token may do ``action`` on ``name`` (the server checks anyway): the same
  // globs as the server's scopes, ``*`` being any run of characters.
  function globMatch(glob, name) {
    const parts = glob.split("*");
    if (parts.length === 1) return glob === name;
    const head = parts[0];
    const tail = parts[parts.length - 1];
    if (name.length < head.length + tail.length) return false;
    if (!name.startsWith(head) || !name.endsWith(tail)) return false;
    let at = head.length;
    const end = name.length - tail.length;
    for (const part of parts.slice(1, -1)) {
      const found = name.indexOf(part, at);
      if (found < 0 || found + part.length > end) return false;
      at = found + part.length;
    }
    return true;
  }

  function may(action, name) {
    if (state.scopes === null || state.scopes === undefined) return true;
    return (state.scopes[action] || []).some((glob) => globMatch(glob, name));
  }

  // --- notices, token ------------------------------------------------------------------

  function notice(text) {
    const node = $("notice");
    if (!text) {
      node.hidden = true;
      setText(node, "");
      return;
    }
    setText(node, text);
    node.hidden = false;
  }

  function askToken(why) {
    if (state.asking) return;
    state.asking = true;
    state.auth = true;
    $("token-button").hidden = false;
    setText($("token-why"), why);
    const input = $("token-input");
    input.value = "";
    const dialog = $("token-dialog");
    if (!dialog.open) dialog.showModal();
    input.focus();
  }

  // Everything read with the previous token, off the page: a forgotten or refused token
  // leaves nothing it showed behind.
  function clearData() {
    state.generation += 1;
    window.clearTimeout(state.timer);
    state.scopes = undefined;
    state.channelRows.clear();
    $("channels").tBodies[0].replaceChildren();
    for (const id of ["server", "topics", "rates", "peek", "channel-stats"]) {
      $(id).replaceChildren();
    }
    delete $("rates").dataset.text;
    for (const id of ["server-line", "updated", "channels-note", "topics-note", "rates-note"]) {
      setText($(id), "");
    }
    setText($("chart-label"), "No rates yet");
    $("adds-line").setAttribute("points", "");
    $("deliveries-line").setAttribute("points", "");
    state.topicsKey = "";
    state.processes.clear();
    state.adds.length = 0;
    state.deliveries.length = 0;
    state.peekRows.forEach((rows) => rows.clear());
    state.total = undefined;
    $("actions").hidden = true;
    $("actions-denied").hidden = true;
    $("peek-denied").hidden = true;
    result("", true);
  }

  function forgetToken() {
    state.token = null;
    sessionStorage.removeItem(TOKEN_KEY);
  }

  function useToken(token) {
    clearData();
    state.token = token || null;
    if (state.token) sessionStorage.setItem(TOKEN_KEY, state.token);
    else sessionStorage.removeItem(TOKEN_KEY);
    state.scopes = undefined;
    state.asking = false;
    route();
  }

  function setUpToken() {
    $("token-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const token = $("token-input").value.trim();
      if (!token) {
        $("token-input").focus();
        return;
      }
      $("token-dialog").close();
      useToken(token);
    });
    $("token-forget").addEventListener("click", () => {
      $("token-dialog").close();
      useToken(null);
    });
    $("token-dialog").addEventListener("cancel", () => {
      // Escape: keep the current token and go on (a page without one asks again).
      state.asking = false;
      window.setTimeout(route, 0);
    });
    $("token-button").addEventListener("click", () => {
      askToken(
        state.token
          ? "Replace the token this page uses, or forget it."
          : "This server checks tokens (--auth): enter one.",
      );
    });
  }

  function failed(error) {
    if (error instanceof HttpError && error.status === 401) {
      const refused = state.token !== null;
      forgetToken();
      clearData();
      askToken(
        refused
          ? "The server refused this token (unknown, revoked or expired): enter another."
          : "This server checks tokens (--auth): enter one to see what it may read.",
      );
      return;
    }
    if (error instanceof HttpError && error.status === 0) {
      notice("Cannot reach the server; trying again every 2 s.");
      return;
    }
    notice(error instanceof HttpError ? `${error.status}: ${error.message}` : String(error));
  }

  // --- polling ------------------------------------------------------------------------

  // Run ``poll`` now and then every POLL_MS until the view changes; one request chain at
  // a time (the next starts when the last answered).
  function every(poll) {
    const generation = ++state.generation;
    window.clearTimeout(state.timer);
    const tick = async () => {
      if (generation !== state.generation || state.asking) return;
      if (!document.hidden) {
        try {
          await poll(() => generation === state.generation);
          if (generation === state.generation) notice("");
        } catch (error) {
          if (generation === state.generation) failed(error);
        }
      }
      if (generation === state.generation && !state.asking) {
        state.timer = window.setTimeout(tick, POLL_MS);
      }
    };
    tick();
  }

  function stamp() {
    setText($("updated"), "updated " + new Date().toLocaleTimeString());
  }

  // --- the overview -------------------------------------------------------------------

  function field(dl, key, label, value) {
    let dd = dl.querySelector(`dd[data-key="${key}"]`);
    if (dd === null) {
      dl.append(el("dt", { text: label }));
      dd = el("dd", { dataset: { key } });
      dl.append(dd);
    }
    setText(dd, value);
  }

  function remember(server) {
    const now = Date.now();
    // Without read:* no pid: one process per host, as far as the page can tell.
    const key = server.pid === null ? server.hostname : server.hostname + " pid " + server.pid;
    const known = state.processes.get(key) || { key };
    if (server.counters) {
      const adds = server.counters["msg-add"];
      const deliveries = server.counters["delivered"];
      if (known.sample && known.id === server.id) {
        const seconds = (now - known.sample.at) / 1000;
        const added = adds - known.sample.adds;
        const delivered = deliveries - known.sample.deliveries;
        if (seconds > 0 && added >= 0 && delivered >= 0) {
          known.rate = { adds: added / seconds, deliveries: delivered / seconds };
        }
      }
      known.sample = { at: now, adds, deliveries };
    }
    known.id = server.id;
    known.seen = now;
    known.waiters = server.waiters;
    state.processes.set(key, known);
    for (const [name, process] of state.processes) {
      if (now - process.seen > PROCESS_TTL_MS) state.processes.delete(name);
    }
    return key;
  }

  function sampleRates() {
    let adds = 0;
    let deliveries = 0;
    let any = false;
    for (const process of state.processes.values()) {
      if (process.rate) {
        adds += process.rate.adds;
        deliveries += process.rate.deliveries;
        any = true;
      }
    }
    if (!any) return;
    for (const [series, value] of [
      [state.adds, adds],
      [state.deliveries, deliveries],
    ]) {
      series.push(value);
      if (series.length > HISTORY) series.shift();
    }
  }

  function drawChart() {
    const top = Math.max(1, ...state.adds, ...state.deliveries);
    const points = (series) =>
      series
        .map((value, i) => {
          const x = ((HISTORY - series.length + i) / (HISTORY - 1)) * 300;
          const y = 100 - (value / top) * 96;
          return x.toFixed(1) + "," + y.toFixed(1);
        })
        .join(" ");
    $("adds-line").setAttribute("points", points(state.adds));
    $("deliveries-line").setAttribute("points", points(state.deliveries));
    const last = (series) => (series.length ? series[series.length - 1] : 0);
    const text =
      `adds ${last(state.adds).toFixed(1)}/s, deliveries ${last(state.deliveries).toFixed(1)}/s` +
      ` (top of the chart ${top.toFixed(1)}/s, last ${Math.round((HISTORY * POLL_MS) / 60000)} min)`;
    const legend = $("rates");
    if (legend.dataset.text !== text) {
      legend.dataset.text = text;
      legend.replaceChildren(
        el("span", { class: "key adds" }),
        `adds ${last(state.adds).toFixed(1)}/s  `,
        el("span", { class: "key deliveries" }),
        `deliveries ${last(state.deliveries).toFixed(1)}/s`,
        el("span", { class: "muted", text: ` · top ${top.toFixed(1)}/s` }),
      );
      setText($("chart-label"), text);
    }
  }

  function renderServer(server, processKey) {
    const dl = $("server");
    const processes = [...state.processes.values()];
    field(dl, "id", "Server id", server.id);
    field(dl, "version", "Version", server.version);
    field(dl, "process", "Answering", processKey);
    field(
      dl,
      "processes",
      "Processes seen",
      `${processes.length} (those that answered this page in the last minute)`,
    );
    field(dl, "database", "Database", server.database === null ? "– (needs read:*)" : server.database);
    const uptime = server.uptime === null ? "– (needs read:*)" : duration(server.uptime);
    field(dl, "uptime", "Uptime", uptime);
    const waiting = processes.filter((p) => typeof p.waiters === "number");
    field(
      dl,
      "waiters",
      "Long-poll waiters",
      waiting.length
        ? `${waiting.reduce((sum, p) => sum + p.waiters, 0)} (in the processes seen)`
        : "– (needs read:*)",
    );
    field(dl, "auth", "Access control", server.auth ? "on (--auth)" : "off");
    if (server.listener !== null) {
      field(dl, "listener", "Listening (PostgreSQL)", server.listener ? "yes" : "no");
    }
    setText(
      $("server-line"),
      `${server.version} · ${processKey}` +
        (server.uptime === null ? "" : ` · up ${duration(server.uptime)}`),
    );
    setText(
      $("rates-note"),
      server.counters === null
        ? "The rates need a token with read:* (they count every channel)."
        : "From the counters of the processes that answer, read every 2 s; server-wide " +
            "(the counters have no channel).",
    );
  }

  function createChannelRow(channel) {
    const cells = {
      ready: el("td", { class: "num" }),
      hidden: el("td", { class: "num" }),
      delayed: el("td", { class: "num" }),
      age: el("td", { class: "num" }),
      dead: el("td"),
    };
    const tr = el(
      "tr",
      { dataset: { channel: channel.name } },
      el("td", { class: "name" }, channelLink(channel.name)),
      cells.ready,
      cells.hidden,
      cells.delayed,
      cells.age,
      cells.dead,
    );
    return { tr, cells, deadKey: null };
  }

  function deadBadges(channel) {
    const badges = [];
    if (channel.dead_from.length) {
      badges.push(el("span", { class: "badge", text: "dead channel of " + channel.dead_from.join(", ") }));
    }
    for (const dead of channel.dead_to) {
      badges.push(el("span", { class: "badge", text: "feeds " + dead }));
    }
    return badges;
  }

  function updateChannelRow(row, channel) {
    setText(row.cells.ready, count(channel.ready));
    setText(row.cells.hidden, count(channel.hidden));
    setText(row.cells.delayed, count(channel.delayed));
    setText(row.cells.age, channel.ready ? duration(channel.oldest_ready_age) : "–");
    const deadKey = JSON.stringify([channel.dead_from, channel.dead_to]);
    if (row.deadKey !== deadKey) {
      row.deadKey = deadKey;
      row.cells.dead.replaceChildren(...deadBadges(channel));
    }
  }

  function renderChannels(overview) {
    const tbody = $("channels").tBodies[0];
    syncRows(
      tbody,
      state.channelRows,
      overview.channels,
      (c) => c.name,
      createChannelRow,
      updateChannelRow,
    );
    const shown = overview.channels.length;
    let note = shown ? "" : "No channels yet (or none this token may see).";
    if (overview.channels_total > shown) {
      note = `${shown} of ${overview.channels_total} channels shown: the deepest ones.`;
    }
    if (overview.channels.some((c) => c.ready === null)) {
      note += " – : not counted (the token may not read it, or it is past the deepest ones).";
    }
    setText($("channels-note"), note.trim());
  }

  function subscriptionTable(subscriptions) {
    const head = el(
      "tr",
      {},
      ...["Channel", "Priority", "Timeout", "Deliver", "Linger", "Delay", "Dead channel"].map(
        (label) => el("th", { scope: "col", text: label }),
      ),
    );
    const rows = subscriptions.map((s) =>
      el(
        "tr",
        {},
        el("td", { class: "name" }, channelLink(s.channel)),
        ...[s.priority, s.timeout + " s", s.deliver || "no limit", s.linger ? s.linger + " s" : "keep"]
          .concat([s.delay ? s.delay + " s" : "0"])
          .map((value) => el("td", { text: String(value) })),
        el("td", { class: "name" }, s.dead === null ? "–" : channelLink(s.dead)),
      ),
    );
    return el(
      "div",
      { class: "table-wrap" },
      el("table", {}, el("thead", {}, head), el("tbody", {}, ...rows)),
    );
  }

  function renderTopics(overview) {
    // Rebuilt only when something changed (topics change rarely; focus stays otherwise).
    const key = JSON.stringify(overview.topics);
    if (key === state.topicsKey) return;
    state.topicsKey = key;
    const sections = overview.topics.map((topic) =>
      el(
        "section",
        { class: "topic" },
        el("h4", { text: topic.name }),
        topic.subscriptions.length
          ? subscriptionTable(topic.subscriptions)
          : el("p", { class: "muted", text: "No subscriber this token may see." }),
      ),
    );
    $("topics").replaceChildren(...sections);
    let note = overview.topics.length ? "" : "No topics with subscribers.";
    if (overview.subscriptions_truncated) note = "The first 1,000 subscriptions only.";
    setText($("topics-note"), note);
  }

  async function pollOverview(current) {
    const overview = await api("GET", "/overview");
    if (!current()) return;
    state.scopes = overview.scopes;
    state.auth = overview.server.auth;
    $("token-button").hidden = !state.auth;
    const processKey = remember(overview.server);
    sampleRates();
    renderServer(overview.server, processKey);
    drawChart();
    renderChannels(overview);
    renderTopics(overview);
    stamp();
  }

  // --- a channel's page ---------------------------------------------------------------

  function bodyPreview(message) {
    if (message.encoding === "utf-8") {
      const text = message.body;
      if (text.length <= BODY_SHOWN) return el("code", { text });
      return el(
        "details",
        {},
        el("summary", { text: text.slice(0, BODY_SHOWN) + "…" }),
        el("pre", { text }),
      );
    }
    let bytes;
    try {
      bytes = Uint8Array.from(atob(message.body), (c) => c.charCodeAt(0));
    } catch (error) {
      return el("code", { text: message.body.slice(0, BODY_SHOWN) });
    }
    const hex = [...bytes.slice(0, BYTES_SHOWN)]
      .map((b) => b.toString(16).padStart(2, "0"))
      .join(" ");
    return el(
      "span",
      {},
      el("span", { class: "muted", text: `${bytes.length} bytes, hex: ` }),
      el("code", { text: hex + (bytes.length > BYTES_SHOWN ? " …" : "") }),
    );
  }

  function createMessageRow(channel, message) {
    const cells = {
      priority: el("td", { class: "num" }),
      delivered: el("td", { class: "num" }),
      age: el("td", { class: "num" }),
      type: el("td", { class: "wide" }),
      body: el("td", { class: "body" }),
      dead: el("td"),
    };
    const tr = el(
      "tr",
      { dataset: { id: String(message.id) } },
      el("td", { class: "num", text: String(message.id) }),
      cells.priority,
      cells.delivered,
      cells.age,
      cells.type,
      cells.body,
      cells.dead,
    );
    if (may("consume", channel)) {
      const button = el("button", {
        type: "button",
        class: "small secondary",
        text: "Delete",
        title: `Delete message ${message.id}`,
      });
      button.setAttribute("aria-label", `Delete message ${message.id}`);
      button.classList.add("delete");
      button.disabled = state.busy;
      button.addEventListener("click", () => deleteMessage(channel, message.id));
      tr.append(el("td", {}, button));
    } else {
      tr.append(el("td"));
    }
    return { tr, cells, bodyKey: null };
  }

  function updateMessageRow(row, message) {
    setText(row.cells.priority, message.priority);
    setText(row.cells.delivered, message.delivered);
    setText(row.cells.age, duration(message.received));
    setText(row.cells.type, message.content_type);
    const bodyKey = message.encoding + ":" + message.body;
    if (row.bodyKey !== bodyKey) {
      row.bodyKey = bodyKey;
      row.cells.body.replaceChildren(bodyPreview(message));
    }
    setText(
      row.cells.dead,
      message.dead_from === null ? "" : `from ${message.dead_from} (${message.dead_reason})`,
    );
  }

  function peekSection(stateName) {
    let section = $("peek-" + stateName);
    if (section !== null) return section;
    const headings = ["Id", "Priority", "Deliveries", "Age", "Content type", "Body", "Dead letter", ""];
    section = el(
      "section",
      { id: "peek-" + stateName, class: "panel" },
      el("h4", { text: stateName[0].toUpperCase() + stateName.slice(1) }),
      el("p", { class: "muted empty", text: "None." }),
      el(
        "div",
        { class: "table-wrap" },
        el(
          "table",
          {},
          el(
            "thead",
            {},
            el(
              "tr",
              {},
              ...headings.map((label, i) =>
                el("th", {
                  scope: "col",
                  text: label,
                  class: i === 4 ? "wide" : i < 4 && i > 0 ? "num" : "",
                }),
              ),
            ),
          ),
          el("tbody"),
        ),
      ),
    );
    $("peek").append(section);
    return section;
  }

  function renderPeek(channel, stateName, messages) {
    const section = peekSection(stateName);
    const tbody = section.querySelector("tbody");
    syncRows(
      tbody,
      state.peekRows.get(stateName),
      messages,
      (m) => m.id,
      (m) => createMessageRow(channel, m),
      updateMessageRow,
    );
    section.querySelector(".empty").hidden = messages.length > 0;
    section.querySelector(".table-wrap").hidden = messages.length === 0;
  }

  function renderDetail(channel, detail, topics) {
    const dl = $("channel-stats");
    field(dl, "ready", "Ready", detail.ready);
    field(dl, "hidden", "Hidden (leased)", detail.hidden);
    field(dl, "delayed", "Delayed", detail.delayed);
    field(dl, "age", "Oldest ready", detail.ready ? duration(detail.oldest_ready_age) : "–");
    field(
      dl,
      "dead_from",
      "Dead letters from",
      detail.dead_from.length ? detail.dead_from.join(", ") : "none",
    );
    if (topics !== null) {
      field(dl, "topics", "Subscribed to", topics.length ? topics.join(", ") : "no topic");
    }
    state.total = detail.ready + detail.hidden + detail.delayed;
  }

  async function pollChannel(channel, current) {
    const path = "/channels/" + enc(channel);
    const [detail, topics] = await Promise.all([
      api("GET", path + "/stats?detail"),
      api("GET", path + "/topics").then((answer) => answer.topics, () => null),
    ]);
    if (!current()) return;
    renderDetail(channel, detail, topics);
    const denied = $("peek-denied");
    if (!may("consume", channel)) {
      setText(denied, "Peeking needs a token with consume on this channel.");
      denied.hidden = false;
      stamp();
      return;
    }
    try {
      const peeks = await Promise.all(
        STATES.map((s) => api("GET", `${path}/peek?n=${PEEK_N}&state=${s}`)),
      );
      if (!current()) return;
      denied.hidden = true;
      STATES.forEach((s, i) => renderPeek(channel, s, peeks[i].messages));
    } catch (error) {
      if (!(error instanceof HttpError) || error.status !== 403) throw error;
      setText(denied, "403 Not allowed: peeking needs consume on this channel.");
      denied.hidden = false;
    }
    stamp();
  }

  async function loadScopes() {
    // A page opened at a channel learns the token's scopes from the overview once.
    if (state.scopes !== undefined) return;
    try {
      const overview = await api("GET", "/overview");
      state.scopes = overview.scopes;
      state.auth = overview.server.auth;
      $("token-button").hidden = !state.auth;
    } catch (error) {
      if (error instanceof HttpError && error.status === 401) throw error;
    }
  }

  // --- actions ------------------------------------------------------------------------

  function confirmAction(title, text, label) {
    const dialog = $("confirm");
    if (typeof dialog.showModal !== "function") return Promise.resolve(window.confirm(text));
    setText($("confirm-title"), title);
    setText($("confirm-text"), text);
    setText($("confirm-ok"), label);
    dialog.returnValue = "";
    dialog.showModal();
    $("confirm-cancel").focus();
    return new Promise((resolve) => {
      dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok"), {
        once: true,
      });
    });
  }

  function result(text, ok) {
    const node = $("action-result");
    node.className = "result " + (ok ? "ok" : "error");
    setText(node, text);
  }

  function refusal(error, action, channel) {
    if (error instanceof HttpError && error.status === 403) {
      return `403 Not allowed: this token's scopes do not cover ${action} on ${channel}.`;
    }
    if (error instanceof HttpError && error.status === 401) {
      failed(error);
      return "401: the token was refused.";
    }
    return error instanceof HttpError ? `${error.status}: ${error.message}` : String(error);
  }

  function setBusy(busy) {
    state.busy = busy;
    const deletes = $("peek").querySelectorAll("button.delete");
    const buttons = [$("redrive-button"), $("drain-button"), ...deletes];
    for (const button of buttons) button.disabled = busy;
  }

  // One action at a time: its buttons stay disabled until the server answered.
  async function act(channel, action, request, done) {
    if (state.busy) return;
    setBusy(true);
    try {
      const answer = await request();
      result(done(answer), true);
    } catch (error) {
      result(refusal(error, action, channel), false);
    } finally {
      setBusy(false);
    }
    if (state.view === channel) showChannel(channel, false);
  }

  async function deleteMessage(channel, id) {
    if (state.busy) return;
    const sure = await confirmAction(
      "Delete a message",
      `Delete message ${id} of ${channel}, whatever its state? This cannot be undone.`,
      "Delete",
    );
    if (!sure) return;
    await act(
      channel,
      "consume",
      () => api("DELETE", `/messages/${id}`),
      () => `Deleted message ${id}.`,
    );
  }

  function setUpActions() {
    const redrive = $("redrive-form");
    redrive.elements.target.addEventListener("change", () => {
      $("redrive-to").hidden = redrive.elements.target.value !== "other";
    });
    redrive.addEventListener("submit", async (event) => {
      event.preventDefault();
      if (state.busy) return;
      const channel = state.view;
      const input = redrive.elements.n;
      const n = input.value.trim();
      const other = redrive.elements.target.value === "other";
      const to = redrive.elements.to.value;
      // A number input that cannot parse what was typed ("5-") has the value "": that is
      // an error, not "all".
      if (input.validity.badInput || (n && !/^[1-9][0-9]*$/.test(n))) {
        result("How many: a whole number of at least 1, or empty for all.", false);
        redrive.elements.n.focus();
        return;
      }
      if (other && !to) {
        result("Name the channel to send them to.", false);
        redrive.elements.to.focus();
        return;
      }
      const what = n ? `up to ${n} ready dead letters` : "every ready dead letter";
      const where = other ? `to ${to}` : "each to the channel it came from";
      const sure = await confirmAction(
        "Redrive dead letters",
        `Move ${what} of ${channel} ${where}, with their deliveries reset?`,
        "Redrive",
      );
      if (!sure) return;
      const query = new URLSearchParams();
      if (n) query.set("n", n);
      if (other) query.set("to", to);
      const suffix = query.toString() ? "?" + query.toString() : "";
      await act(
        channel,
        "manage",
        () => api("POST", `/channels/${enc(channel)}/redrive${suffix}`),
        (answer) => `Moved ${answer.moved} dead letter${answer.moved === 1 ? "" : "s"}.`,
      );
    });
    $("drain-form").addEventListener("submit", async (event) => {
      event.preventDefault();
      if (state.busy) return;
      const channel = state.view;
      const how =
        state.total === undefined
          ? "all the messages (how many is not known yet)"
          : `all ${state.total} messages`;
      const sure = await confirmAction(
        "Drain a channel",
        `Discard ${how} of ${channel} (ready, hidden and delayed)? This cannot be undone.`,
        "Drain",
      );
      if (!sure) return;
      await act(
        channel,
        "manage",
        () => api("DELETE", "/channels/" + enc(channel)),
        () => `Drained ${channel}.`,
      );
    });
  }

  // --- views --------------------------------------------------------------------------

  function showOverview(focus) {
    state.view = null;
    $("channel-view").hidden = true;
    $("overview-view").hidden = false;
    document.title = "Linger";
    if (focus) $("overview-title").focus();
    every(pollOverview);
  }

  function showChannel(channel, fresh) {
    if (fresh) {
      state.peekRows.forEach((rows) => rows.clear());
      $("peek").replaceChildren();
      $("channel-stats").replaceChildren();
      state.total = undefined; // not the previous channel's
      result("", true);
      $("redrive-form").reset();
      $("redrive-to").hidden = true;
    }
    state.view = channel;
    $("overview-view").hidden = true;
    $("channel-view").hidden = false;
    setText($("channel-name"), channel);
    document.title = channel + " · Linger";
    if (fresh) $("channel-title").focus();
    const note = $("channel-note");
    note.hidden = !unreachable(channel);
    if (unreachable(channel)) {
      setText(
        note,
        `A channel named "${channel}" cannot be read from this page: browsers rewrite ` +
          "that name in a URL path. Its counts are on the overview; to peek, drain or " +
          "redrive it, use a client (or curl --path-as-is with %2E for each dot).",
      );
      state.generation += 1; // nothing to poll
      window.clearTimeout(state.timer);
      $("actions").hidden = true;
      $("actions-denied").hidden = true;
      $("peek-denied").hidden = true;
      return;
    }
    every(async (current) => {
      await loadScopes();
      if (!current()) return;
      const manage = may("manage", channel);
      $("actions").hidden = !manage;
      const denied = $("actions-denied");
      denied.hidden = manage;
      setText(denied, manage ? "" : "Drain and redrive need a token with manage on this channel.");
      await pollChannel(channel, current);
    });
  }

  function route() {
    if (state.asking) return;
    const match = /^#\/channel\/(.+)$/.exec(location.hash);
    let channel = null;
    if (match) {
      try {
        channel = decodeURIComponent(match[1]);
      } catch (error) {
        channel = null;
      }
    }
    if (channel === null) showOverview(state.view !== null);
    else showChannel(channel, channel !== state.view);
  }

  document.addEventListener("DOMContentLoaded", () => {
    setUpToken();
    setUpActions();
    window.addEventListener("hashchange", route);
    document.addEventListener("visibilitychange", () => {
      if (!document.hidden) route();
    });
    route();
  });
})();
