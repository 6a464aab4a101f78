// spotbox dashboard: the fleet from /robots and /stats, kept live by the /feed event stream, and for the
// selected robot a battery chart (downsampled history) and its recent positions (plain history).
// No build step and no library: every URL is relative so the page also works behind a path prefix.
"use strict";

(() => {
  const MINUTE_MS = 60 * 1000;
  const HOUR_MS = 60 * MINUTE_MS;
  const TRACK_MS = 5 * MINUTE_MS;
  const STATS_REFRESH_MS = 30 * 1000; // the rejected counts are a sliding hour: resync them now and then
  const TICK_MS = 5 * 1000; // "last seen" ages and the chart's time window move on
  const FEED_RETRY_MS = 5 * 1000;
  const MAX_POSITIONS = 600;
  const SHOWN_POSITIONS = 10;
  const SHOWN_REJECTIONS = 20;

  const robots = new Map(); // serial -> {serial, latest, lastSeen, rejected, lastRejection}
  const totals = { received: null, valid: null, rejected: null };
  // The selected robot: {serial, buckets: Map(bucket start -> {sum, count}), positions: Map(row id -> status)}.
  let view = null;

  const $ = (selector) => document.querySelector(selector);

  async function getJSON(url) {
    const response = await fetch(url, { headers: { Accept: "application/json" } });
    if (!response.ok) {
      throw new Error(`${url.split("?")[0]} answered HTTP ${response.status}`);
    }
    return response.json();
  }

  const time = (iso) => Date.parse(iso);
  const isoAgo = (ms) => new Date(Date.now() - ms).toISOString();
  const isNewer = (a, b) => !b || time(a.ts) > time(b.ts) || (time(a.ts) === time(b.ts) && a.id > b.id);

  function robot(serial) {
    let entry = robots.get(serial);
    if (!entry) {
      entry = { serial, latest: null, lastSeen: null, rejected: 0, lastRejection: null };
      robots.set(serial, entry);
    }
    return entry;
  }

  function ago(iso) {
    if (!iso) return "\u2013";
    const seconds = Math.max(0, Math.round((Date.now() - time(iso)) / 1000));
    if (seconds < 60) return `${seconds} s ago`;
    if (seconds < 3600) return `${Math.floor(seconds / 60)} min ago`;
    if (seconds < 86400) return `${Math.floor(seconds / 3600)} h ago`;
    return new Date(iso).toLocaleString();
  }

  const lower = (value) => (value ? value.toLowerCase() : "\u2013");

  // ---- fleet table -------------------------------------------------------------------------------------------

  function cell(row, name) {
    return row.querySelector(`td.${name}`);
  }

  function createRow(serial) {
    const row = document.createElement("tr");
    row.dataset.serial = serial;
    const first = document.createElement("th");
    first.scope = "row";
    const button = document.createElement("button");
    button.type = "button";
    button.textContent = serial;
    first.append(button);
    row.append(first);
    for (const name of ["battery", "charging", "driving", "last-seen", "rejected"]) {
      const td = document.createElement("td");
      td.className = name;
      row.append(td);
    }
    const battery = cell(row, "battery");
    const bar = document.createElement("span");
    bar.className = "bar";
    bar.append(document.createElement("span"));
    const value = document.createElement("span");
    value.className = "value";
    battery.append(bar, value);
    row.addEventListener("click", () => select(serial));
    // Rows stay ordered by serial, as /robots lists them.
    const body = $("#fleet-table tbody");
    const next = [...body.rows].find((other) => other.dataset.serial > serial);
    body.insertBefore(row, next || null);
    return row;
  }

  function renderRow(entry, flash) {
    const row = document.querySelector(`#fleet-table tr[data-serial="${CSS.escape(entry.serial)}"]`) ||
      createRow(entry.serial);
    const latest = entry.latest;
    const level = latest ? latest.battery_level : null;
    const bar = cell(row, "battery").querySelector(".bar > span");
    bar.style.width = `${level || 0}%`;
    bar.dataset.level = level === null ? "" : level < 20 ? "low" : level < 50 ? "mid" : "high";
    cell(row, "battery").querySelector(".value").textContent = level === null ? "\u2013" : `${level} %`;
    cell(row, "charging").textContent = latest ? lower(latest.battery_status) : "\u2013";
    cell(row, "charging").dataset.state = latest ? latest.battery_status : "";
    cell(row, "driving").textContent = latest ? lower(latest.driving_status) : "\u2013";
    cell(row, "driving").title = latest && latest.current_drive_id ? `drive ${latest.current_drive_id}` : "";
    cell(row, "last-seen").textContent = ago(entry.lastSeen);
    cell(row, "last-seen").title = entry.lastSeen || "";
    cell(row, "rejected").textContent = String(entry.rejected);
    cell(row, "rejected").title = entry.lastRejection || "";
    cell(row, "rejected").classList.toggle("nonzero", entry.rejected > 0);
    row.classList.toggle("selected", view !== null && view.serial === entry.serial);
    if (flash) {
      row.classList.remove(flash);
      void row.offsetWidth; // restart the highlight animation
      row.classList.add(flash);
    }
    $("#fleet-empty").hidden = robots.size > 0;
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

  // ---- loading and live updates -----------------------------------------------------------------------------

  async function loadRobots() {
    try {
      const body = await getJSON("robots");
      for (const item of body.items) {
        const entry = robot(item.serial_number);
        // The feed may already have delivered something newer while this request was in flight.
        if (item.latest && isNewer(item.latest, entry.latest)) entry.latest = item.latest;
        if (!entry.lastSeen || time(item.last_seen) > time(entry.lastSeen)) entry.lastSeen = item.last_seen;
        renderRow(entry);
      }
      note("");
    } catch (error) {
      note(`Fleet list unavailable (${error.message}); robots appear as they publish.`);
    }
  }

  async function loadStats() {
    try {
      const body = await getJSON("stats");
      totals.received = body.received;
      totals.valid = body.valid;
      totals.rejected = body.rejected;
      const perRobot = body.robots || {};
      for (const entry of robots.values()) {
        entry.rejected = perRobot[entry.serial] ? perRobot[entry.serial].rejected : 0;
        renderRow(entry);
      }
      for (const [serial, counts] of Object.entries(perRobot)) {
        if (!robots.has(serial) && counts.rejected > 0) {
          robot(serial).rejected = counts.rejected;
          renderRow(robots.get(serial));
        }
      }
      $("#summary").classList.remove("unavailable");
    } catch (error) {
      // Without /stats the counts are the ones seen live since the page opened.
      $("#summary").classList.add("unavailable");
      $("#summary").title = `Statistics unavailable (${error.message}); counting live events only`;
    }
    renderTotals();
  }

  function onStatus(status) {
    const entry = robot(status.serial_number);
    if (isNewer(status, entry.latest)) entry.latest = status;
    if (!entry.lastSeen || time(status.received_at) > time(entry.lastSeen)) entry.lastSeen = status.received_at;
    bump("received");
    bump("valid");
    renderTotals();
    renderRow(entry, "updated");
    if (view && view.serial === status.serial_number) {
      addToView(view, status);
      renderDetail();
    }
  }

  function onRejected(rejection) {
    const entry = robot(rejection.serial_number);
    entry.rejected += 1;
    // The reason usually names its field already ("battery_level: 150 is greater than ..."): say it once.
    const reason = rejection.reason.startsWith(rejection.field)
      ? rejection.reason
      : `${rejection.field}: ${rejection.reason}`;
    entry.lastRejection = reason;
    bump("received");
    bump("rejected");
    renderTotals();
    renderRow(entry, "rejected");
    const item = document.createElement("li");
    const when = new Date(time(rejection.received_at) || Date.now()).toLocaleTimeString();
    item.textContent = `${when} ${rejection.serial_number} \u2013 ${reason}`;
    const list = $("#rejections");
    list.prepend(item);
    while (list.children.length > SHOWN_REJECTIONS) list.lastElementChild.remove();
    $("#rejections-empty").hidden = true;
  }

  function connectFeed() {
    setConnection("connecting", "connecting\u2026");
    const feed = new EventSource("feed");
    feed.addEventListener("open", () => setConnection("live", "live"));
    feed.addEventListener("status", (event) => onStatus(JSON.parse(event.data)));
    feed.addEventListener("rejected", (event) => onRejected(JSON.parse(event.data)));
    feed.addEventListener("error", () => {
      if (feed.readyState !== EventSource.CLOSED) {
        // The browser reconnects by itself, sending Last-Event-ID: spotbox replays what was missed.
        setConnection("reconnecting", "reconnecting\u2026");
        return;
      }
      // A refused stream (not 200, e.g. spotbox restarting) is not retried by the browser: retry from a fresh
      // snapshot rather than replaying an unbounded backlog.
      setConnection("offline", "live feed unavailable, retrying");
      setTimeout(() => {
        connectFeed();
        loadRobots();
        loadStats();
      }, FEED_RETRY_MS);
    });
  }

  // ---- the selected robot -----------------------------------------------------------------------------------

  function addToView(target, status) {
    if (target.positions.has(status.id)) return;
    target.positions.set(status.id, status);
    if (target.positions.size > MAX_POSITIONS) {
      target.positions.delete(target.positions.keys().next().value);
    }
    addToBucket(target, status);
  }

  function addToBucket(target, status) {
    // Fold a status into its 1-minute bucket, as the server's average does.
    const start = Math.floor(time(status.ts) / MINUTE_MS) * MINUTE_MS;
    const bucket = target.buckets.get(start) || { sum: 0, count: 0 };
    bucket.sum += status.battery_level;
    bucket.count += 1;
    target.buckets.set(start, bucket);
  }

  async function loadView(target) {
    const path = `robots/${encodeURIComponent(target.serial)}/history`;
    const chartQuery = `interval=1m&agg=avg&start_time=${encodeURIComponent(isoAgo(HOUR_MS))}`;
    const trackQuery = `limit=1000&start_time=${encodeURIComponent(isoAgo(TRACK_MS))}`;
    const [chart, positions] = await Promise.all([
      getJSON(`${path}?${chartQuery}`),
      (async () => {
        const items = [];
        let page = await getJSON(`${path}?${trackQuery}`);
        items.push(...page.items);
        while (page.next_cursor) {
          page = await getJSON(`${path}?${trackQuery}&cursor=${encodeURIComponent(page.next_cursor)}`);
          items.push(...page.items);
        }
        return items;
      })(),
    ]);
    const live = [...target.positions.values()];
    target.positions.clear();
    for (const item of positions.slice(-MAX_POSITIONS)) target.positions.set(item.id, item);
    for (const item of chart.items) {
      if (item.battery_level === undefined || item.battery_level === null) continue;
      if (item.bucket) {
        target.buckets.set(time(item.bucket), { sum: item.battery_level * item.count, count: item.count });
      } else {
        // A plain history row (a spotbox without downsampling): fold it into its minute here.
        addToBucket(target, item);
      }
    }
    // Statuses that arrived live while loading and are not in the loaded rows yet.
    for (const status of live) {
      if (!target.positions.has(status.id)) addToView(target, status);
    }
  }

  async function select(serial) {
    const target = { serial, buckets: new Map(), positions: new Map() };
    view = target;
    for (const entry of robots.values()) renderRow(entry);
    history.replaceState(null, "", `#${encodeURIComponent(serial)}`);
    $("#detail").hidden = false;
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
      renderDetail();
    }
  }

  function renderDetail() {
    if (!view) return;
    const latest = robots.has(view.serial) ? robots.get(view.serial).latest : null;
    $("#detail-latest").textContent = latest
      ? `battery ${latest.battery_level} %, ${lower(latest.battery_status)}, ${lower(latest.driving_status)}` +
        (latest.current_drive_id ? ` (drive ${latest.current_drive_id})` : "") +
        ` at ${latest.location.latitude.toFixed(5)}, ${latest.location.longitude.toFixed(5)}`
      : "no valid status yet";
    drawChart();
    drawTrack();
    renderPositions();
  }

  // ---- drawing (charts.js draws; this picks what) -------------------------------------------------------------

  function drawChart() {
    const end = Date.now();
    const begin = end - HOUR_MS;
    const points = [...view.buckets.entries()]
      .filter(([start]) => start >= begin - MINUTE_MS && start <= end)
      .sort((a, b) => a[0] - b[0])
      .map(([start, bucket]) => [start, bucket.sum / bucket.count]);
    window.spotboxCharts.battery($("#battery-chart"), points, begin, end, MINUTE_MS);
  }

  function shownPositions() {
    const all = [...view.positions.values()].sort((a, b) => time(a.ts) - time(b.ts) || a.id - b.id);
    const since = Date.now() - TRACK_MS;
    const recent = all.filter((status) => time(status.ts) >= since);
    // A robot reporting past timestamps has no "last five minutes": show its last positions instead.
    return recent.length > 0 ? recent : all.slice(-SHOWN_POSITIONS);
  }

  function drawTrack() {
    window.spotboxCharts.track($("#track"), shownPositions().map((status) => status.location));
  }

  function renderPositions() {
    const body = $("#positions tbody");
    const rows = shownPositions().slice(-SHOWN_POSITIONS).reverse().map((status) => {
      const row = document.createElement("tr");
      const values = [
        new Date(time(status.ts)).toLocaleTimeString(),
        status.location.latitude.toFixed(5),
        status.location.longitude.toFixed(5),
        status.location.height.toFixed(1),
        lower(status.driving_status),
      ];
      for (const value of values) {
        const td = document.createElement("td");
        td.textContent = value;
        row.append(td);
      }
      return row;
    });
    body.replaceChildren(...rows);
  }

  // ---- start ------------------------------------------------------------------------------------------------

  function start() {
    renderTotals();
    // Subscribe first, then take the snapshot: nothing is missed between them, and newer wins when both have it.
    connectFeed();
    loadRobots().then(() => {
      const wanted = decodeURIComponent(location.hash.slice(1));
      if (wanted) select(wanted);
    });
    loadStats();
    setInterval(loadStats, STATS_REFRESH_MS);
    setInterval(() => {
      for (const entry of robots.values()) renderRow(entry);
      renderDetail();
    }, TICK_MS);
  }

  start();
})();
