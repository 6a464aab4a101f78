// spotbox console: the fleet (presence, latest status) from /robots and /stats, open alerts from /alerts and recent
// rejections from /rejections, all kept live by the /feed event stream; for the selected robot a battery chart over a
// chosen time range (downsampled history), its position plot, recent statuses and recent rejections.
// No build step and no library: every URL is relative so the page also works behind a path prefix.
// Rendering is batched: events only mark robots dirty, and one animation frame renders the rows that changed.
"use strict";

(() => {
  const SECOND_MS = 1000;
  const MINUTE_MS = 60 * SECOND_MS;
  const HOUR_MS = 60 * MINUTE_MS;
  const TRACK_MS = 5 * MINUTE_MS;
  const STATS_REFRESH_MS = 30 * SECOND_MS; // the rejected counts are a sliding hour: resync them now and then
  const TICK_MS = 5 * SECOND_MS; // "last seen" ages and the chart's time window move on
  const RENDER_MS = 250;
  const VIRTUAL_FROM = 200; // a fleet larger than this shows only the rows in (and near) view
  const OVERSCAN = 15;
  const RESORT_MS = 1000; // live updates re-sort the table at most this often (a click sorts at once)
  const FEED_RETRY_MS = 5 * SECOND_MS;
  const MAX_POSITIONS = 600;
  const SHOWN_POSITIONS = 10;
  const SHOWN_REJECTIONS = 20;
  const SHOWN_ALERTS = 100;
  const ALERTS_RENDER_MS = 500; // an alert storm (a site losing power) redraws the alert list at most this often
  // Time ranges of the battery chart: span, bucket (the server's downsampling interval) and its name.
  const RANGES = {
    "1h": { span: HOUR_MS, bucket: MINUTE_MS, interval: "1m", label: "1-minute average" },
    "6h": { span: 6 * HOUR_MS, bucket: 5 * MINUTE_MS, interval: "5m", label: "5-minute average" },
    "24h": { span: 24 * HOUR_MS, bucket: 15 * MINUTE_MS, interval: "15m", label: "15-minute average" },
    "7d": { span: 7 * 24 * HOUR_MS, bucket: HOUR_MS, interval: "1h", label: "1-hour average" },
  };
  const PRESENCE_ORDER = { online: 0, stale: 1, offline: 2, unknown: 3 };

  const robots = new Map(); // serial -> entry (see robot())
  let ordered = []; // every robot, in the table's order
  let windowDirty = false; // the rows to show changed (order, filter, scrolling, robots added)
  let shownCount = 0;
  let rowHeight = 0;
  const alerts = new Map(); // id -> open alert
  const totals = { received: null, valid: null, rejected: null };
  const sort = { key: "serial", dir: 1 };
  const filter = { serial: "", state: "" };
  const dirty = new Set();
  let frame = 0;
  let resortDue = false;
  let lastSort = 0;
  let resortTimer = 0;
  let alertsDirty = false;
  let alertsRendered = 0;
  let alertsTimer = 0;
  let anyRegistered = false;
  let range = "1h";
  // The selected robot: {serial, range, buckets: Map(bucket start -> {sum, count}), positions: Map(id -> status)}.
  let view = null;

  const $ = (selector) => document.querySelector(selector);

  async function getJSON(url) {
    const response = await fetch(url, { headers: { Accept: "application/json" } });
    if (!response.ok) throw new Error(`${url.split("?")[0]} answered HTTP ${response.status}`);
    return response.json();
  }

  const time = (iso) => Date.parse(iso);
  const isoAgo = (ms) => new Date(Date.now() - ms).toISOString();
  const isNewer = (a, b) => !b || time(a.ts) > time(b.ts) || (time(a.ts) === time(b.ts) && a.id > b.id);
  const lower = (value) => (value ? value.toLowerCase() : "\u2013");

  function ago(iso) {
    if (!iso) return "\u2013";
    const seconds = Math.max(0, Math.round((Date.now() - time(iso)) / 1000));
    if (seconds < 60) return `${seconds} s ago`;
    if (seconds < 3600) return `${Math.floor(seconds / 60)} min ago`;
    if (seconds < 86400) return `${Math.floor(seconds / 3600)} h ago`;
    return new Date(iso).toLocaleString();
  }

  function robot(serial) {
    let entry = robots.get(serial);
    if (!entry) {
      entry = {
        serial, latest: null, lastSeen: null, rejected: 0, lastRejection: null,
        presence: "unknown", presenceSince: null, registered: null, row: null, cells: null, shown: {},
      };
      robots.set(serial, entry);
      place(entry);
    }
    return entry;
  }

  function markDirty(entry) {
    dirty.add(entry);
    schedule();
  }

  // Changes are drawn a few times a second, not at every frame: a busy fleet changes some row all the time, and
  // each drawn frame costs the browser style, layout and paint work whatever the number of rows changed.
  function schedule() {
    if (!frame) frame = setTimeout(() => requestAnimationFrame(flush), RENDER_MS);
  }

  // ---- fleet table -------------------------------------------------------------------------------------------

  const COLUMNS = ["presence", "battery", "charging", "driving", "last-seen", "rejected"];

  function createRow(entry) {
    const row = document.createElement("tr");
    row.dataset.serial = entry.serial;
    const cells = {};
    for (const name of COLUMNS) {
      const td = document.createElement("td");
      td.className = name;
      cells[name] = td;
    }
    const first = document.createElement("th");
    first.scope = "row";
    first.className = "serial";
    const button = document.createElement("button");
    button.type = "button";
    button.textContent = entry.serial;
    const mark = document.createElement("span");
    mark.className = "unregistered";
    mark.textContent = "unregistered";
    mark.title = "This robot publishes but is not registered (POST /robots)";
    mark.hidden = true;
    first.append(button, mark);
    const dot = document.createElement("span");
    dot.className = "dot";
    const label = document.createElement("span");
    label.className = "label";
    cells.presence.append(dot, label);
    const bar = document.createElement("span");
    bar.className = "bar";
    bar.append(document.createElement("span"));
    const value = document.createElement("span");
    value.className = "value";
    cells.battery.append(bar, value);
    cells.rejected.classList.add("wide");
    cells.charging.classList.add("wide");
    cells.driving.classList.add("narrow-hide");
    row.append(cells.presence, first, cells.battery, cells.charging, cells.driving, cells["last-seen"], cells.rejected);
    row.addEventListener("click", () => select(entry.serial));
    entry.row = row;
    entry.cells = { ...cells, serialMark: mark, dot, label, bar: bar.firstChild, value };
  }

  // Into its place in the current order (binary search): one insertion, not a re-sort of the fleet.
  function place(entry) {
    let [low, high] = [0, ordered.length];
    while (low < high) {
      const middle = (low + high) >> 1;
      if (compare(ordered[middle], entry) < 0) low = middle + 1;
      else high = middle;
    }
    ordered.splice(low, 0, entry);
    windowDirty = true;
  }

  // Write a property only when it changed: most updates change one or two cells of one row.
  function put(entry, key, target, property, next) {
    if (entry.shown[key] === next) return;
    entry.shown[key] = next;
    if (property === "text") target.textContent = next;
    else if (property === "hidden") target.hidden = next;
    else if (property.startsWith("data-")) target.dataset[property.slice(5)] = next;
    else target.setAttribute(property, next);
  }

  function renderRow(entry) {
    if (!entry.row) createRow(entry);
    const c = entry.cells;
    const latest = entry.latest;
    const level = latest ? latest.battery_level : null;
    put(entry, "presence", c.dot, "data-presence", entry.presence);
    put(entry, "presence-label", c.label, "text", entry.presence);
    put(entry, "presence-title", c.presence, "title", entry.presenceSince ? `since ${new Date(entry.presenceSince).toLocaleString()}` : "");
    put(entry, "unregistered", c.serialMark, "hidden", !(anyRegistered && entry.registered === false));
    put(entry, "bar", c.bar, "style", `width: ${level || 0}%`);
    put(entry, "level", c.bar, "data-level", level === null ? "" : level < 20 ? "low" : level < 50 ? "mid" : "high");
    put(entry, "battery", c.value, "text", level === null ? "\u2013" : `${level} %`);
    put(entry, "charging", c.charging, "text", latest ? lower(latest.battery_status) : "\u2013");
    put(entry, "charging-state", c.charging, "data-state", latest ? latest.battery_status : "");
    put(entry, "driving", c.driving, "text", latest ? lower(latest.driving_status) : "\u2013");
    put(entry, "last-seen", c["last-seen"], "text", ago(entry.lastSeen));
    put(entry, "rejected", c.rejected, "text", String(entry.rejected));
    put(entry, "rejected-title", c.rejected, "title", entry.lastRejection || "");
    put(entry, "rejected-nonzero", c.rejected, "data-nonzero", entry.rejected > 0 ? "yes" : "no");
    put(entry, "selected", entry.row, "data-selected", view !== null && view.serial === entry.serial ? "yes" : "no");
  }

  function flash(entry, name) {
    if (!entry.row) return;
    entry.row.classList.remove(name);
    void entry.row.offsetWidth; // restart the highlight animation
    entry.row.classList.add(name);
  }

  function alertingSerials() {
    const serials = new Set();
    for (const alert of alerts.values()) serials.add(alert.serial_number);
    return serials;
  }

  let alerting = new Set();

  function matches(entry) {
    if (filter.serial && !entry.serial.toLowerCase().includes(filter.serial)) return false;
    if (filter.state === "alerting") return alerting.has(entry.serial);
    return !filter.state || entry.presence === filter.state;
  }

  function compare(a, b) {
    const value = (entry) => {
      const latest = entry.latest;
      switch (sort.key) {
        case "presence": return PRESENCE_ORDER[entry.presence] ?? 9;
        case "battery": return latest ? latest.battery_level : -1;
        case "charging": return latest ? latest.battery_status : "";
        case "driving": return latest ? latest.driving_status : "";
        case "last-seen": return entry.lastSeen ? time(entry.lastSeen) : 0;
        case "rejected": return entry.rejected;
        default: return entry.serial;
      }
    };
    const [x, y] = [value(a), value(b)];
    if (x < y) return -sort.dir;
    if (x > y) return sort.dir;
    return a.serial < b.serial ? -1 : a.serial > b.serial ? 1 : 0;
  }

  function resort() {
    const sorted = [...ordered].sort(compare);
    if (sorted.every((entry, index) => ordered[index] === entry)) return;
    ordered = sorted;
    windowDirty = true;
  }

  // The rows in the table: every matching robot, or for a large fleet only those in (or near) the scrolled view,
  // with spacer rows standing in for the others. A change to a robot off screen costs no DOM work at all.
  function renderWindow() {
    windowDirty = false;
    const list = ordered.filter(matches);
    shownCount = list.length;
    let [start, end] = [0, list.length];
    const height = rowHeight || 48;
    if (list.length > VIRTUAL_FROM) {
      const scroller = $("#fleet .scroll");
      start = Math.max(0, Math.floor(scroller.scrollTop / height) - OVERSCAN);
      end = Math.min(list.length, start + Math.ceil(scroller.clientHeight / height) + 2 * OVERSCAN);
    }
    const shown = list.slice(start, end);
    for (const entry of shown) {
      if (!entry.row || entry.stale) {
        entry.stale = false;
        renderRow(entry);
      }
    }
    const body = $("#fleet-table tbody");
    const rows = shown.map((entry) => entry.row);
    const current = [...body.rows].filter((row) => !row.classList.contains("spacer"));
    if (rows.length !== current.length || rows.some((row, index) => row !== current[index])) {
      body.replaceChildren(...rows);
    }
    spacer(body, "top", start * height, true);
    spacer(body, "bottom", (list.length - end) * height, false);
    if (!rowHeight && rows.length > 0) rowHeight = rows[0].getBoundingClientRect().height || 0;
  }

  function spacer(body, name, pixels, first) {
    let row = body.querySelector(`tr.spacer.${name}`);
    if (pixels <= 0) {
      if (row) row.remove();
      return;
    }
    if (!row) {
      row = document.createElement("tr");
      row.className = `spacer ${name}`;
      row.setAttribute("aria-hidden", "true");
      row.append(document.createElement("td"));
      row.firstChild.colSpan = 7;
    }
    row.style.height = `${pixels}px`;
    if (first && body.firstChild !== row) body.prepend(row);
    if (!first && body.lastChild !== row) body.append(row);
  }

  function flush() {
    frame = 0;
    if (alertsDirty && Date.now() - alertsRendered >= ALERTS_RENDER_MS) {
      alertsDirty = false;
      alertsRendered = Date.now();
      const before = alerting;
      alerting = alertingSerials();
      if (filter.state === "alerting" && (before.size !== alerting.size || [...before].some((s) => !alerting.has(s)))) {
        windowDirty = true;
      }
      renderAlerts();
    }
    for (const entry of dirty) {
      if (entry.row && entry.row.isConnected) renderRow(entry);
      else entry.stale = true;
      if (filter.state || filter.serial) windowDirty = true;
    }
    const sortedBy = sort.key !== "serial" && dirty.size > 0;
    dirty.clear();
    const now = Date.now();
    if (resortDue || (sortedBy && now - lastSort >= RESORT_MS)) {
      resortDue = false;
      lastSort = now;
      resort();
    } else if (sortedBy && !resortTimer) {
      resortTimer = setTimeout(() => {
        resortTimer = 0;
        resortDue = true;
        schedule();
      }, RESORT_MS);
    }
    if (windowDirty) renderWindow();
    renderCounts();
    if (alertsDirty && !alertsTimer) {
      alertsTimer = setTimeout(() => {
        alertsTimer = 0;
        schedule();
      }, ALERTS_RENDER_MS);
    }
  }

  function renderCounts() {
    const counts = { online: 0, stale: 0, offline: 0, unknown: 0 };
    for (const entry of robots.values()) counts[entry.presence] = (counts[entry.presence] || 0) + 1;
    for (const state of ["online", "stale", "offline"]) $(`#count-${state}`).textContent = String(counts[state]);
    $("#fleet-empty").hidden = robots.size > 0;
    $("#fleet-count").textContent = robots.size ? `${shownCount} of ${robots.size}` : "";
  }

  function note(text) {
    const element = $("#fleet-note");
    element.textContent = text;
    element.hidden = !text;
  }

  function renderTotals() {
    for (const key of ["received", "valid", "rejected"]) {
      $(`#stat-${key}`).textContent = totals[key] === null ? "\u2013" : String(totals[key]);
    }
  }

  function bump(key) {
    if (totals[key] !== null) totals[key] += 1;
  }

  function setConnection(state, text) {
    const element = $("#connection");
    element.dataset.state = state;
    element.textContent = text;
  }

  function setupTable() {
    for (const th of document.querySelectorAll("#fleet-table thead th[data-sort]")) {
      th.querySelector("button").addEventListener("click", () => {
        const key = th.dataset.sort;
        sort.dir = sort.key === key ? -sort.dir : 1;
        sort.key = key;
        for (const other of document.querySelectorAll("#fleet-table thead th[data-sort]")) {
          other.setAttribute("aria-sort", other === th ? (sort.dir > 0 ? "ascending" : "descending") : "none");
        }
        resort();
        renderWindow();
        renderCounts();
      });
    }
    $("#fleet .scroll").addEventListener("scroll", () => {
      windowDirty = true;
      requestAnimationFrame(() => {
        if (windowDirty) renderWindow();
      });
    }, { passive: true });
    const refilter = () => {
      filter.serial = $("#filter-serial").value.trim().toLowerCase();
      filter.state = $("#filter-state").value;
      windowDirty = true;
      schedule();
    };
    $("#filter-serial").addEventListener("input", refilter);
    $("#filter-state").addEventListener("change", refilter);
  }

  // ---- alerts ------------------------------------------------------------------------------------------------

  // The newest version of each alert the feed brought while a snapshot was being fetched: it may be older.
  const alertEvents = new Map();

  function newestAlert(a, b) {
    return !b || time(a.updated_at) >= time(b.updated_at) ? a : b;
  }

  function onAlert(alert) {
    alertEvents.set(alert.id, newestAlert(alert, alertEvents.get(alert.id)));
    if (alert.open) alerts.set(alert.id, alert);
    else alerts.delete(alert.id);
    alertsDirty = true;
    schedule();
  }

  function renderAlerts() {
    const list = $("#alert-list");
    const shown = [...alerts.values()]
      .sort((a, b) => time(b.created_at) - time(a.created_at) || (b.id > a.id ? 1 : -1))
      .slice(0, SHOWN_ALERTS);
    list.replaceChildren(...shown.map(alertItem));
    $("#alerts-count").textContent = String(alerts.size);
    $("#alerts-count").dataset.nonzero = alerts.size > 0 ? "yes" : "no";
    $("#alerts-empty").hidden = alerts.size > 0;
  }

  function alertItem(alert) {
    const item = document.createElement("li");
    item.dataset.id = alert.id;
    item.dataset.state = alert.state;
    item.dataset.severity = alert.severity;
    item.dataset.acknowledged = String(alert.acknowledged);
    const head = document.createElement("div");
    const severity = document.createElement("span");
    severity.className = "severity";
    severity.textContent = alert.severity;
    const serial = document.createElement("button");
    serial.type = "button";
    serial.className = "link";
    serial.textContent = alert.serial_number;
    serial.addEventListener("click", () => select(alert.serial_number));
    const state = document.createElement("span");
    state.className = "state";
    state.textContent = alert.state;
    head.append(severity, " ", serial, " ", state);
    const message = document.createElement("p");
    message.className = "message";
    message.textContent = `${alert.rule}: ${alert.message}`;
    const when = document.createElement("p");
    when.className = "when";
    const since = alert.activated_at || alert.created_at;
    when.textContent = `since ${new Date(since).toLocaleString()}` +
      (alert.cleared_at ? `, cleared ${new Date(alert.cleared_at).toLocaleTimeString()}` : "");
    item.append(head, message, when);
    if (alert.acknowledged) {
      const by = document.createElement("p");
      by.className = "acknowledged";
      by.textContent = `acknowledged${alert.acknowledged_by ? ` by ${alert.acknowledged_by}` : ""}`;
      item.append(by);
    } else {
      const button = document.createElement("button");
      button.type = "button";
      button.className = "ack";
      button.textContent = "Acknowledge";
      button.addEventListener("click", () => acknowledge(alert.id, button));
      item.append(button);
    }
    return item;
  }

  async function acknowledge(id, button) {
    button.disabled = true;
    try {
      // With --users the server asks for a login (HTTP Basic): the browser shows its login dialog.
      const response = await fetch(`alerts/${encodeURIComponent(id)}/ack`, { method: "POST" });
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      onAlert(await response.json());
    } catch (error) {
      button.disabled = false;
      button.textContent = `Acknowledge (failed: ${error.message})`;
    }
  }

  // One load of a kind at a time, in the order asked: a call while one is on its way makes it run once more when it
  // ends. Two overlapping loads could land out of order, the older snapshot last: the /stats totals stepped back,
  // and a second alerts load cleared the events the first one merged, whose older snapshot then overwrote an alert
  // event that came in between (an alert shown pending after it had become active).
  function oneAtATime(load) {
    let running = null;
    let again = false;
    return () => {
      if (running) {
        again = true;
        return running;
      }
      running = (async () => {
        try {
          do {
            again = false;
            await load();
          } while (again);
        } finally {
          running = null;
        }
      })();
      return running;
    };
  }

  const loadAlerts = oneAtATime(loadAlertsOnce);

  async function loadAlertsOnce() {
    alertEvents.clear(); // from now on, what the feed brings is newer than or as new as the snapshot
    const open = new Map();
    let query = "alerts?state=open&limit=1000";
    try {
      for (;;) {
        const page = await getJSON(query);
        for (const alert of page.items) open.set(alert.id, alert);
        if (!page.next_cursor || open.size >= 5000) break;
        query = `alerts?state=open&limit=1000&cursor=${encodeURIComponent(page.next_cursor)}`;
      }
    } catch (error) {
      $("#alerts-empty").textContent = `Alerts unavailable (${error.message}).`;
      return;
    }
    // Newer wins: an alert event that came while the snapshot was on its way is not overwritten by it.
    alerts.clear();
    for (const [id, alert] of open) {
      const newest = newestAlert(alertEvents.get(id) || alert, alert);
      if (newest.open) alerts.set(id, newest);
    }
    for (const [id, alert] of alertEvents) {
      if (alert.open && !open.has(id)) alerts.set(id, alert);
    }
    alertEvents.clear();
    alertsDirty = true;
    schedule();
  }

  // ---- loading and live updates -----------------------------------------------------------------------------

  const loadRobots = oneAtATime(loadRobotsOnce);

  async function loadRobotsOnce() {
    try {
      const body = await getJSON("robots");
      anyRegistered = body.items.some((item) => item.registered);
      for (const item of body.items) {
        const entry = robot(item.serial_number);
        // The feed may already have delivered something newer while this request was in flight.
        if (item.latest && isNewer(item.latest, entry.latest)) entry.latest = item.latest;
        if (item.last_seen && (!entry.lastSeen || time(item.last_seen) > time(entry.lastSeen))) {
          entry.lastSeen = item.last_seen;
        }
        if (!entry.presenceSince || (item.presence_since && time(item.presence_since) >= time(entry.presenceSince))) {
          entry.presence = item.presence;
          entry.presenceSince = item.presence_since;
        }
        entry.registered = item.registered;
        dirty.add(entry);
      }
      for (const entry of robots.values()) dirty.add(entry); // the unregistered marks may have changed
      schedule();
      note("");
    } catch (error) {
      note(`Fleet list unavailable (${error.message}); robots appear as they publish.`);
    }
  }

  const loadStats = oneAtATime(loadStatsOnce);

  async function loadStatsOnce() {
    try {
      const body = await getJSON("stats");
      totals.received = body.received;
      totals.valid = body.valid;
      totals.rejected = body.rejected;
      const perRobot = body.robots || {};
      for (const entry of robots.values()) {
        const rejected = perRobot[entry.serial] ? perRobot[entry.serial].rejected : 0;
        if (rejected !== entry.rejected) {
          entry.rejected = rejected;
          dirty.add(entry);
        }
      }
      for (const [serial, counts] of Object.entries(perRobot)) {
        if (!robots.has(serial) && counts.rejected > 0) {
          const entry = robot(serial);
          entry.rejected = counts.rejected;
          dirty.add(entry);
        }
      }
      schedule();
      $("#summary").classList.remove("unavailable");
    } catch (error) {
      // Without /stats the counts are the ones seen live since the page opened.
      $("#summary").classList.add("unavailable");
      $("#summary").title = `Statistics unavailable (${error.message}); counting live events only`;
    }
    renderTotals();
  }

  function rejectionText(rejection) {
    // The reason usually names its field already ("battery_level: 150 is greater than ..."): say it once.
    return rejection.reason.startsWith(rejection.field) ? rejection.reason : `${rejection.field}: ${rejection.reason}`;
  }

  function rejectionItem(rejection, withSerial) {
    const item = document.createElement("li");
    const when = new Date(time(rejection.received_at) || Date.now()).toLocaleTimeString();
    item.textContent = `${when} ${withSerial ? `${rejection.serial_number} \u2013 ` : ""}${rejectionText(rejection)}`;
    if (rejection.payload !== undefined) item.title = rejection.payload;
    return item;
  }

  function showRejections(list, empty, items, withSerial) {
    list.replaceChildren(...items.slice(0, SHOWN_REJECTIONS).map((r) => rejectionItem(r, withSerial)));
    empty.hidden = items.length > 0;
  }

  const loadRejections = oneAtATime(loadRejectionsOnce);

  async function loadRejectionsOnce() {
    try {
      const body = await getJSON(`rejections?limit=${SHOWN_REJECTIONS}`);
      showRejections($("#rejections"), $("#rejections-empty"), body.items, true);
    } catch (error) {
      $("#rejections-empty").textContent = `Rejections unavailable (${error.message}); showing live ones.`;
    }
  }

  function prependRejection(list, empty, rejection, withSerial) {
    list.prepend(rejectionItem(rejection, withSerial));
    while (list.children.length > SHOWN_REJECTIONS) list.lastElementChild.remove();
    empty.hidden = true;
  }

  function onStatus(status) {
    const entry = robot(status.serial_number);
    if (isNewer(status, entry.latest)) entry.latest = status;
    if (!entry.lastSeen || time(status.received_at) > time(entry.lastSeen)) entry.lastSeen = status.received_at;
    bump("received");
    bump("valid");
    totalsDirty();
    markDirty(entry);
    if (view && view.serial === status.serial_number) {
      addToView(view, status);
      renderDetailSoon();
    }
  }

  function onRejected(rejection) {
    const entry = robot(rejection.serial_number);
    entry.rejected += 1;
    entry.lastRejection = rejectionText(rejection);
    bump("received");
    bump("rejected");
    totalsDirty();
    markDirty(entry);
    flash(entry, "rejected");
    prependRejection($("#rejections"), $("#rejections-empty"), rejection, true);
    if (view && view.serial === rejection.serial_number) {
      prependRejection($("#detail-rejections"), $("#detail-rejections-empty"), rejection, false);
    }
  }

  function onPresence(change) {
    const entry = robot(change.serial_number);
    entry.presence = change.presence;
    entry.presenceSince = change.presence_since;
    markDirty(entry);
    if (view && view.serial === change.serial_number) renderDetailSoon();
  }

  let totalsFrame = 0;
  function totalsDirty() {
    if (!totalsFrame) totalsFrame = requestAnimationFrame(() => { totalsFrame = 0; renderTotals(); });
  }

  let opened = false;

  // Store and forward (--forward): each upstream target's link and lag, shown only when spotbox forwards.
  const loadForward = oneAtATime(loadForwardOnce);

  async function loadForwardOnce() {
    const element = document.getElementById("uplink");
    try {
      const { targets } = await getJSON("forward");
      element.hidden = targets.length === 0;
      element.replaceChildren(
        ...targets.map((target) => {
          const item = document.createElement("span");
          item.className = "chip";
          item.dataset.state = target.state;
          const lag = target.lag_rows === 0 ? "up to date" : `${target.lag_rows} behind (${Math.round(target.lag_seconds)} s)`;
          item.textContent = `uplink ${target.state}: ${lag}`;
          item.title = `${target.target}${target.last_error ? ` \u2014 ${target.last_error}` : ""}`;
          return item;
        }),
      );
    } catch (error) {
      element.hidden = true;
    }
  }

  function reloadAll(withView) {
    loadForward();
    loadRobots();
    loadStats();
    loadAlerts();
    loadRejections();
    if (withView && view) select(view.serial);
  }

  function connectFeed() {
    setConnection("connecting", "connecting\u2026");
    const feed = new EventSource("feed");
    feed.addEventListener("open", () => {
      setConnection("live", "live");
      // Events sent before the stream was up (the first snapshot may be older than it) or while it was down
      // (presence, alerts, rejections are not replayed) are lost: reload the console from the API.
      reloadAll(opened);
      opened = true;
    });
    feed.addEventListener("status", (event) => onStatus(JSON.parse(event.data)));
    feed.addEventListener("rejected", (event) => onRejected(JSON.parse(event.data)));
    feed.addEventListener("presence", (event) => onPresence(JSON.parse(event.data)));
    feed.addEventListener("alert", (event) => onAlert(JSON.parse(event.data)));
    feed.addEventListener("error", () => {
      if (feed.readyState !== EventSource.CLOSED) {
        // The browser reconnects by itself; the next "open" reloads the console.
        setConnection("reconnecting", "reconnecting\u2026");
        return;
      }
      // A refused stream (not 200, e.g. spotbox restarting) is not retried by the browser: retry from a fresh
      // snapshot rather than replaying an unbounded backlog.
      setConnection("offline", "live feed unavailable, retrying");
      setTimeout(connectFeed, FEED_RETRY_MS);
    });
  }

  // ---- the selected robot -----------------------------------------------------------------------------------

  function addToView(target, status) {
    if (target.positions.has(status.id)) return;
    target.positions.set(status.id, status);
    if (target.positions.size > MAX_POSITIONS) target.positions.delete(target.positions.keys().next().value);
    addToBucket(target, status);
  }

  function addToBucket(target, status) {
    // Fold a status into its bucket, as the server's average does.
    const size = RANGES[target.range].bucket;
    const start = Math.floor(time(status.ts) / size) * size;
    const bucket = target.buckets.get(start) || { sum: 0, count: 0 };
    bucket.sum += status.battery_level;
    bucket.count += 1;
    target.buckets.set(start, bucket);
  }

  async function loadChart(target) {
    const spec = RANGES[target.range];
    const path = `robots/${encodeURIComponent(target.serial)}/history`;
    const query = `interval=${spec.interval}&agg=avg&start_time=${encodeURIComponent(isoAgo(spec.span))}`;
    const chart = await getJSON(`${path}?${query}`);
    target.buckets.clear();
    for (const item of chart.items) {
      if (item.battery_level === undefined || item.battery_level === null) continue;
      if (item.bucket) {
        target.buckets.set(time(item.bucket), { sum: item.battery_level * item.count, count: item.count });
      } else {
        addToBucket(target, item); // a plain history row (a spotbox without downsampling)
      }
    }
  }

  async function loadView(target) {
    const path = `robots/${encodeURIComponent(target.serial)}/history`;
    const trackQuery = `limit=1000&start_time=${encodeURIComponent(isoAgo(TRACK_MS))}`;
    const [, recent, latestRows, rejections] = await Promise.all([
      loadChart(target),
      getJSON(`${path}?${trackQuery}`),
      // A robot reporting past timestamps has no "last five minutes": its latest row still shows.
      getJSON(`robots/${encodeURIComponent(target.serial)}`).catch(() => null),
      getJSON(`rejections?serial=${encodeURIComponent(target.serial)}&limit=${SHOWN_REJECTIONS}`).catch(() => ({ items: [] })),
    ]);
    const live = [...target.positions.values()];
    target.positions.clear();
    for (const item of recent.items.slice(-MAX_POSITIONS)) target.positions.set(item.id, item);
    if (target.positions.size === 0 && latestRows && latestRows.latest) {
      target.positions.set(latestRows.latest.id, latestRows.latest);
    }
    for (const status of live) if (!target.positions.has(status.id)) target.positions.set(status.id, status);
    target.rejections = rejections.items;
  }

  async function select(serial) {
    const target = { serial, range, buckets: new Map(), positions: new Map(), rejections: [] };
    view = target;
    for (const entry of robots.values()) dirty.add(entry);
    schedule();
    history.replaceState(null, "", `#${encodeURIComponent(serial)}`);
    $("#detail").hidden = false;
    $("#detail-hint").hidden = true;
    $("#detail-title").textContent = serial;
    $("#detail-error").hidden = true;
    delete $("#detail").dataset.loaded;
    renderDetail();
    try {
      await loadView(target);
    } catch (error) {
      if (view !== target) return;
      $("#detail-error").textContent = `History unavailable: ${error.message}`;
      $("#detail-error").hidden = false;
    }
    if (view === target) {
      $("#detail").dataset.loaded = "true";
      showRejections($("#detail-rejections"), $("#detail-rejections-empty"), target.rejections, false);
      renderDetail();
    }
  }

  async function setRange(name) {
    range = name;
    for (const button of document.querySelectorAll("#range button")) {
      button.setAttribute("aria-pressed", String(button.dataset.range === name));
    }
    if (!view) return;
    const target = view;
    target.range = name;
    delete $("#detail").dataset.loaded;
    try {
      await loadChart(target);
    } catch (error) {
      $("#detail-error").textContent = `History unavailable: ${error.message}`;
      $("#detail-error").hidden = false;
    }
    if (view === target) {
      $("#detail").dataset.loaded = "true";
      renderDetail();
    }
  }

  let detailFrame = 0;
  function renderDetailSoon() {
    if (!detailFrame) detailFrame = requestAnimationFrame(() => { detailFrame = 0; renderDetail(); });
  }

  function renderDetail() {
    if (!view) return;
    const entry = robots.get(view.serial);
    const latest = entry ? entry.latest : null;
    $("#detail-dot").dataset.presence = entry ? entry.presence : "unknown";
    $("#detail-dot").title = entry ? entry.presence : "unknown";
    $("#detail-latest").textContent = latest
      ? `${entry.presence}: battery ${latest.battery_level} %, ${lower(latest.battery_status)}, ${lower(latest.driving_status)}` +
        (latest.current_drive_id ? ` (drive ${latest.current_drive_id})` : "") +
        ` at ${latest.location.latitude.toFixed(5)}, ${latest.location.longitude.toFixed(5)},` +
        ` height ${latest.location.height.toFixed(1)} m`
      : "no valid status yet";
    $("#range-note").textContent = RANGES[view.range].label;
    drawChart();
    drawTrack();
    renderPositions();
  }

  function drawChart() {
    const spec = RANGES[view.range];
    const end = Date.now();
    const begin = end - spec.span;
    const points = [...view.buckets.entries()]
      .filter(([start]) => start >= begin - spec.bucket && start <= end)
      .sort((a, b) => a[0] - b[0])
      .map(([start, bucket]) => [start, bucket.sum / bucket.count]);
    window.spotboxCharts.battery($("#battery-chart"), points, begin, end, spec.bucket);
  }

  function shownPositions() {
    const all = [...view.positions.values()].sort((a, b) => time(a.ts) - time(b.ts) || a.id - b.id);
    const since = Date.now() - TRACK_MS;
    const recent = all.filter((status) => time(status.ts) >= since);
    return recent.length > 0 ? recent : all.slice(-SHOWN_POSITIONS);
  }

  function drawTrack() {
    window.spotboxCharts.track($("#track"), shownPositions().map((status) => status.location));
  }

  function renderPositions() {
    const rows = shownPositions().slice(-SHOWN_POSITIONS).reverse().map((status) => {
      const row = document.createElement("tr");
      const values = [
        new Date(time(status.ts)).toLocaleTimeString([], { hourCycle: "h23" }),
        `${status.battery_level} %`,
        status.location.latitude.toFixed(5),
        status.location.longitude.toFixed(5),
        lower(status.driving_status),
      ];
      for (const value of values) {
        const td = document.createElement("td");
        td.textContent = value;
        row.append(td);
      }
      return row;
    });
    $("#positions tbody").replaceChildren(...rows);
  }

  // ---- start ------------------------------------------------------------------------------------------------

  function start() {
    renderTotals();
    setupTable();
    for (const button of document.querySelectorAll("#range button")) {
      button.addEventListener("click", () => setRange(button.dataset.range));
    }
    // Subscribe first, then take the snapshot: nothing is missed between them, and newer wins when both have it.
    connectFeed();
    loadRobots().then(() => {
      const wanted = decodeURIComponent(location.hash.slice(1));
      if (wanted) select(wanted);
    });
    loadStats();
    loadAlerts();
    loadRejections();
    loadForward();
    setInterval(loadStats, STATS_REFRESH_MS);
    setInterval(loadForward, STATS_REFRESH_MS);
    setInterval(() => {
      for (const entry of robots.values()) dirty.add(entry);
      schedule();
      renderDetailSoon();
    }, TICK_MS);
  }

  start();
})();
