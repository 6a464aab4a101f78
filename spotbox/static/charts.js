// SVG drawing for the spotbox console, without a library: the battery chart and the position plot.
// Both mark their root with data-points (how many points are drawn) for the tests and for styling.
"use strict";

window.spotboxCharts = (() => {
  const SVG_NS = "http://www.w3.org/2000/svg";
  const HOUR_MS = 3600 * 1000;

  function svg(parent, tag, attributes, text) {
    const element = document.createElementNS(SVG_NS, tag);
    for (const [name, value] of Object.entries(attributes)) element.setAttribute(name, String(value));
    if (text !== undefined) element.textContent = text;
    parent.append(element);
    return element;
  }

  function timeLabel(t, span) {
    const date = new Date(t);
    if (span > 2 * 24 * HOUR_MS) return date.toLocaleDateString([], { weekday: "short", day: "numeric" });
    return date.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
  }

  function empty(root, x, y, text) {
    svg(root, "text", { class: "empty", x, y, "text-anchor": "middle" }, text);
  }

  // A tick step of about `count` ticks over `span` ms, on a round duration.
  function tickStep(span, count) {
    const steps = [5, 10, 15, 30, 60, 120, 180, 360, 720, 1440].map((minutes) => minutes * 60 * 1000);
    return steps.find((step) => span / step <= count) || steps[steps.length - 1];
  }

  // points: [[bucket start ms, battery level 0-100]], oldest first, drawn between begin and end (ms).
  function battery(chart, points, begin, end, bucketMs) {
    chart.replaceChildren();
    chart.dataset.points = String(points.length);
    const [width, height] = [600, 220];
    const [left, right, top, bottom] = [44, 12, 10, 24];
    const x = (t) => left + ((Math.max(t, begin) - begin) / (end - begin)) * (width - left - right);
    const y = (level) => top + (1 - level / 100) * (height - top - bottom);
    for (const level of [0, 25, 50, 75, 100]) {
      svg(chart, "line", { class: "grid", x1: left, x2: width - right, y1: y(level), y2: y(level) });
      svg(chart, "text", { class: "axis", x: left - 6, y: y(level) + 4, "text-anchor": "end" }, `${level} %`);
    }
    // The low-battery band: where the default alert rule opens.
    svg(chart, "rect", { class: "low", x: left, y: y(20), width: width - left - right, height: y(0) - y(20) });
    const step = tickStep(end - begin, 7);
    for (let t = Math.ceil(begin / step) * step; t <= end; t += step) {
      svg(chart, "line", { class: "grid", x1: x(t), x2: x(t), y1: top, y2: height - bottom });
      svg(chart, "text", { class: "axis", x: x(t), y: height - 6, "text-anchor": "middle" }, timeLabel(t, end - begin));
    }
    if (points.length === 0) {
      empty(chart, width / 2, height / 2, "no status in this time range");
      return;
    }
    // A gap of more than two buckets (the robot was silent) breaks the line instead of bridging it.
    let segment = [];
    const segments = [segment];
    for (const [index, [t, level]] of points.entries()) {
      if (index > 0 && t - points[index - 1][0] > 2 * bucketMs) {
        segment = [];
        segments.push(segment);
      }
      segment.push(`${x(t).toFixed(1)},${y(level).toFixed(1)}`);
    }
    for (const line of segments) {
      if (line.length > 1) {
        svg(chart, "polyline", { class: "battery", points: line.join(" ") });
      } else {
        // A lone bucket (statuses sparser than the buckets) is a dot: a one-point line would not show.
        const [cx, cy] = line[0].split(",");
        svg(chart, "circle", { class: "point", cx, cy, r: 2.5 });
      }
    }
    const [lastStart, lastLevel] = points[points.length - 1];
    const dot = svg(chart, "circle", { class: "battery", cx: x(lastStart), cy: y(lastLevel), r: 4 });
    svg(dot, "title", {}, `${Math.round(lastLevel)} % (average of the bucket from ${timeLabel(lastStart, 0)})`);
  }

  // A "nice" length in metres (1, 2 or 5 times a power of ten) at most `max`.
  function niceMetres(max) {
    const power = 10 ** Math.floor(Math.log10(max));
    return [5, 2, 1].map((f) => f * power).find((length) => length <= max) || power;
  }

  const metres = (m) => (m >= 1000 ? `${(m / 1000).toFixed(m >= 10000 ? 0 : 1)} km` : `${m.toFixed(m < 1 ? 1 : 0)} m`);

  // locations: [{latitude, longitude}], oldest first; the latest one is marked. Axes in degrees, a scale in metres.
  function track(root, locations) {
    root.replaceChildren();
    root.dataset.points = String(locations.length);
    const size = 300;
    const [left, right, top, bottom] = [66, 10, 10, 34];
    const [plotW, plotH] = [size - left - right, size - top - bottom];
    svg(root, "rect", { class: "frame", x: left, y: top, width: plotW, height: plotH });
    if (locations.length === 0) {
      empty(root, left + plotW / 2, top + plotH / 2, "no positions");
      return;
    }
    // Equirectangular projection around the track: fine at the scale of a site. Square metres per pixel.
    const lats = locations.map((p) => p.latitude);
    const lons = locations.map((p) => p.longitude);
    const midLat = (Math.min(...lats) + Math.max(...lats)) / 2;
    const midLon = (Math.min(...lons) + Math.max(...lons)) / 2;
    const mPerDegLat = 111320;
    const mPerDegLon = 111320 * Math.cos((midLat * Math.PI) / 180);
    const spanM = Math.max(
      (Math.max(...lats) - Math.min(...lats)) * mPerDegLat,
      (Math.max(...lons) - Math.min(...lons)) * mPerDegLon,
      10, // at least 10 m across: a robot standing still is a dot, not an error
    ) * 1.15;
    const scale = Math.min(plotW, plotH) / spanM; // pixels per metre
    const px = (p) => left + plotW / 2 + (p.longitude - midLon) * mPerDegLon * scale;
    const py = (p) => top + plotH / 2 - (p.latitude - midLat) * mPerDegLat * scale;
    // Axes: three ticks each, in degrees (5 decimals: about a metre).
    const halfLon = plotW / 2 / scale / mPerDegLon;
    const halfLat = plotH / 2 / scale / mPerDegLat;
    for (const f of [-0.8, 0, 0.8]) {
      const lon = midLon + f * halfLon;
      const lat = midLat + f * halfLat;
      const gx = px({ longitude: lon });
      const gy = py({ latitude: lat });
      svg(root, "line", { class: "grid", x1: gx, x2: gx, y1: top, y2: top + plotH });
      svg(root, "line", { class: "grid", x1: left, x2: left + plotW, y1: gy, y2: gy });
      svg(root, "text", { class: "axis", x: gx, y: top + plotH + 12, "text-anchor": "middle" }, lon.toFixed(5));
      svg(root, "text", { class: "axis", x: left - 4, y: gy + 3, "text-anchor": "end" }, lat.toFixed(5));
    }
    svg(root, "text", { class: "axis", x: left + plotW / 2, y: size - 2, "text-anchor": "middle" }, "longitude");
    svg(root, "text", { class: "axis", x: 10, y: top + plotH / 2, "text-anchor": "middle", transform: `rotate(-90 10 ${top + plotH / 2})` }, "latitude");
    // Scale bar, bottom right inside the frame.
    const length = niceMetres((plotW / 3) / scale);
    const barX = left + plotW - 8 - length * scale;
    const barY = top + plotH - 10;
    svg(root, "line", { class: "scale", x1: barX, x2: barX + length * scale, y1: barY, y2: barY });
    svg(root, "text", { class: "axis scale-label", x: barX + (length * scale) / 2, y: barY - 4, "text-anchor": "middle" }, metres(length));
    svg(root, "polyline", {
      class: "track",
      points: locations.map((p) => `${px(p).toFixed(1)},${py(p).toFixed(1)}`).join(" "),
    });
    const last = locations[locations.length - 1];
    const marker = svg(root, "circle", { class: "track latest", cx: px(last), cy: py(last), r: 6 });
    svg(marker, "title", {}, `latest: ${last.latitude.toFixed(5)}, ${last.longitude.toFixed(5)}`);
  }

  return { battery, track };
})();
