// SVG drawing for the spotbox dashboard, without a library: the battery chart and the position track.
// Both mark their root with data-points (how many points are drawn) for the tests and for styling.
"use strict";

window.spotboxCharts = (() => {
  const SVG_NS = "http://www.w3.org/2000/svg";

  function svg(parent, tag, attributes, text) {
    const element = document.createElementNS(SVG_NS, tag);
    for (const [name, value] of Object.entries(attributes)) element.setAttribute(name, String(value));
    if (text !== undefined) element.textContent = text;
    parent.append(element);
    return element;
  }

  const clock = (t) => new Date(t).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });

  function empty(root, x, y, text) {
    svg(root, "text", { class: "empty", x, y, "text-anchor": "middle" }, text);
  }

  // points: [[bucket start ms, battery level 0-100]], oldest first, drawn between begin and end (ms).
  function battery(chart, points, begin, end, bucketMs) {
    chart.replaceChildren();
    chart.dataset.points = String(points.length);
    const [width, height] = [600, 220];
    const [left, right, top, bottom] = [40, 10, 10, 24];
    const x = (t) => left + ((Math.max(t, begin) - begin) / (end - begin)) * (width - left - right);
    const y = (level) => top + (1 - level / 100) * (height - top - bottom);
    for (const level of [0, 25, 50, 75, 100]) {
      svg(chart, "line", { class: "grid", x1: left, x2: width - right, y1: y(level), y2: y(level) });
      svg(chart, "text", { class: "axis", x: left - 6, y: y(level) + 4, "text-anchor": "end" }, `${level}`);
    }
    const tick = 15 * 60 * 1000;
    for (let t = Math.ceil(begin / tick) * tick; t <= end; t += tick) {
      svg(chart, "text", { class: "axis", x: x(t), y: height - 6, "text-anchor": "middle" }, clock(t));
    }
    if (points.length === 0) {
      empty(chart, width / 2, height / 2, "no status in the last hour");
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
    for (const line of segments) svg(chart, "polyline", { class: "battery", points: line.join(" ") });
    const [lastStart, lastLevel] = points[points.length - 1];
    const dot = svg(chart, "circle", { class: "battery", cx: x(lastStart), cy: y(lastLevel), r: 4 });
    svg(dot, "title", {}, `${Math.round(lastLevel)} % (average of the bucket from ${clock(lastStart)})`);
  }

  // locations: [{latitude, longitude}], oldest first; the last one is marked.
  function track(root, locations) {
    root.replaceChildren();
    root.dataset.points = String(locations.length);
    const [size, pad] = [240, 16];
    if (locations.length === 0) {
      empty(root, size / 2, size / 2, "no positions");
      return;
    }
    // Equirectangular projection around the track: fine at the scale of a site.
    const lats = locations.map((p) => p.latitude);
    const lons = locations.map((p) => p.longitude);
    const [minLat, maxLat] = [Math.min(...lats), Math.max(...lats)];
    const [minLon, maxLon] = [Math.min(...lons), Math.max(...lons)];
    const scaleLon = Math.cos((((minLat + maxLat) / 2) * Math.PI) / 180);
    const spanX = (maxLon - minLon) * scaleLon;
    const spanY = maxLat - minLat;
    const scale = (size - 2 * pad) / (Math.max(spanX, spanY) || 1e-6);
    const offsetX = (size - spanX * scale) / 2;
    const offsetY = (size - spanY * scale) / 2;
    const px = (p) => offsetX + (p.longitude - minLon) * scaleLon * scale;
    const py = (p) => size - offsetY - (p.latitude - minLat) * scale;
    svg(root, "polyline", {
      class: "track",
      points: locations.map((p) => `${px(p).toFixed(1)},${py(p).toFixed(1)}`).join(" "),
    });
    const last = locations[locations.length - 1];
    svg(root, "circle", { class: "track", cx: px(last), cy: py(last), r: 5 });
  }

  return { battery, track };
})();
