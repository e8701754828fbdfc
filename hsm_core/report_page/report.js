// Draws the sweep report from the JSON in #hsm-report-data (hsm_core/report.py builds it).
// No library and no network: SVG for the timeline (one <g class="attempt"> per attempt, with
// data-job, data-attempt, data-source and data-outcome), canvas for the value plots.
"use strict";
(function () {
  const began = performance.now();
  const data = JSON.parse(document.getElementById("hsm-report-data").textContent);
  const byId = (id) => document.getElementById(id);
  const OUTCOMES = {
    completed: "completed", failed: "failed", retried: "failed, then run again", lost: "lost (its machine or link)",
    running: "running", interrupted: "interrupted (its launcher stopped first)",
  };
  // Rows leave out their empty fields (report.without_empty): put them back.
  data.attempts.forEach((a) => {
    a.gpus = a.gpus || []; a.cause = a.cause || null; a.where = a.where || null; a.adopted = !!a.adopted;
    if (a.ran === undefined) a.ran = null;
    if (a.end === undefined) a.end = null;
  });
  data.jobs.forEach((job) => {
    job.value = job.value === undefined ? null : job.value;
    job.cause = job.cause || null;
    job.metrics = numbersOf(job.value);
  });
  function numbersOf(value) {
    if (typeof value === "number") return { value: value };
    const found = {};
    if (value && typeof value === "object") Object.keys(value).forEach((k) => { if (typeof value[k] === "number") found[k] = value[k]; });
    return found;
  }
  const jobsByNum = new Map(data.jobs.map((job) => [job.num, job]));
  // What sets a job apart: its overrides but those every job shares (shown once, above the values).
  const shared = new Set(Object.keys(data.fixed));
  function ownOverrides(job) {
    if (!job) return "";
    const own = job.overrides.filter((item) => !shared.has(item.split("=")[0].replace(/^[+~]+/, "")));
    return own.join(" ") || "(no overrides of its own)";
  }
  const attemptsOf = new Map();
  data.attempts.forEach((attempt) => {
    if (!attemptsOf.has(attempt.job)) attemptsOf.set(attempt.job, []);
    attemptsOf.get(attempt.job).push(attempt);
  });

  function esc(text) {
    return String(text).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
  }
  function seconds(s) {
    if (s === null || s === undefined) return "-";
    if (s < 60) return s.toFixed(s < 10 ? 2 : 1) + " s";
    if (s < 3600) return Math.floor(s / 60) + " min " + String(Math.round(s % 60)).padStart(2, "0") + " s";
    return Math.floor(s / 3600) + " h " + String(Math.round((s % 3600) / 60)).padStart(2, "0") + " min";
  }
  function elapsed(t) {
    const whole = Math.round(t), h = Math.floor(whole / 3600), m = Math.floor((whole % 3600) / 60), s = whole % 60;
    return (h ? h + ":" + String(m).padStart(2, "0") : String(m)) + ":" + String(s).padStart(2, "0");
  }
  function moment(t) { // a time from the first launch, as precise as the sweep is short
    return full[1] < 120 ? t.toFixed(1) + " s" : elapsed(t);
  }
  function clock(t) {
    return new Date((data.origin + t) * 1000).toLocaleString();
  }
  function shortValue(v) {
    if (typeof v === "number") return Number.isInteger(v) ? String(v) : v.toPrecision(5).replace(/\.?0+(e|$)/, "$1");
    if (v === null || v === undefined) return "";
    if (typeof v === "object") return Object.entries(v).map(([k, x]) => k + "=" + shortValue(x)).join(", ");
    return String(v);
  }
  function causeLines(cause, lines) {
    const kept = String(cause || "").split("\n").filter((line) => line.trim());
    return kept.slice(-lines).join("\n");
  }
  function runTime(a) {
    return a.end === null || a.ran === null ? null : Math.max(0, a.end - a.ran);
  }
  function lastAttempt(num) {
    const list = attemptsOf.get(num);
    return list ? list[list.length - 1] : null;
  }
  function badge(status) {
    return '<span class="badge o-' + esc(status) + '">' + esc(status) + "</span>";
  }

  // -- the tooltip ---------------------------------------------------------------------------
  const tip = byId("hsm-tooltip");
  function showTip(html, event) {
    tip.innerHTML = html;
    tip.hidden = false;
    const x = event.clientX + 14, y = event.clientY + 14;
    const w = tip.offsetWidth, h = tip.offsetHeight;
    tip.style.left = Math.max(4, Math.min(x, window.innerWidth - w - 8)) + "px";
    tip.style.top = (y + h > window.innerHeight - 4 ? Math.max(4, event.clientY - h - 10) : y) + "px";
  }
  function hideTip() {
    tip.hidden = true;
  }
  function attemptText(a) {
    const job = jobsByNum.get(a.job), lane = data.lanes[a.lane];
    const total = (attemptsOf.get(a.job) || []).length;
    const waited = a.ran !== null ? a.ran - a.queued : (a.end || 0) - a.queued;
    let html = '<div class="t">#' + a.job + " &middot; attempt " + a.attempt + " of " + total + " &middot; " +
      esc(OUTCOMES[a.outcome] || a.outcome) + "</div>";
    html += '<div class="mono">' + esc(ownOverrides(job)) + "</div>";
    html += "<div>on " + esc(a.source) + (lane ? ", " + esc(lane.label) : "") + (a.where ? " &middot; " + esc(a.where) : "") + "</div>";
    html += "<div>" + (waited > 0.05 ? "waited " + seconds(waited) + " for its machine's scheduler, " : "") +
      (a.outcome === "running" ? "running for " : "ran ") + seconds(runTime(a) || 0) +
      " (from " + esc(clock(a.queued)) + ")</div>";
    if (a.adopted) html += "<div>adopted: it ran on while no launcher followed it, and a later launch took it over</div>";
    if (job && a.outcome === "completed" && job.value !== null) html += "<div>returned " + esc(shortValue(job.value)) + "</div>";
    if (a.cause) html += "<pre>" + esc(causeLines(a.cause, 6)) + "</pre>";
    return html;
  }

  // -- the header and the sources ------------------------------------------------------------
  const live = data.state === "running" && data.rewritten_every > 0;
  function header() {
    const s = data.summary;
    const span = data.launches.length ? data.launches[data.launches.length - 1].end : 0;
    const counts = Object.keys(s).filter((k) => s[k]).map((k) => '<span class="count">' + s[k] + " " + badge(k) + "</span>").join(" ");
    const launches = data.launches.filter((launch) => !launch.batch).length;
    const resumed = (launches > 1 ? " &middot; " + launches + " launches (resumed " + (launches - 1) + "&times;)" : "") +
      (data.launches.length > launches ? " &middot; " + data.launches.length + " batches" : "");
    byId("head").innerHTML = "<h1>Sweep report</h1>" +
      '<div class="dir">' + esc(data.sweep_dir) + "</div>" +
      '<div class="facts"><span>state: <b>' + esc(data.state) + "</b></span>" +
      "<span>" + data.jobs.length + " jobs, " + data.attempts.length + " attempts: " + (counts || "none yet") + "</span>" +
      "<span>" + seconds(span || 0) + " from the first launch" + resumed + "</span>" +
      (shared.size ? '<span>every job: <span class="mono">' + esc(Object.entries(data.fixed).map(([k, v]) => k + "=" + v)
        .join(" ")) + "</span></span>" : "") +
      '<span class="muted">written ' + esc(new Date(data.generated * 1000).toLocaleString()) + "</span>" +
      (live ? '<span id="live">the launcher rewrites this page every ' + seconds(data.rewritten_every) +
        ': it reloads itself while the sweep runs <button type="button" id="pause">stop reloading</button></span>' : "") +
      "</div>";
    if (live) {
      const reloading = setTimeout(() => location.reload(), Math.max(2, data.rewritten_every) * 1000);
      byId("pause").addEventListener("click", () => { clearTimeout(reloading); byId("live").textContent = "reloading stopped"; });
    }
  }

  function sources() {
    if (!data.sources.length) {
      byId("sources").innerHTML = '<p class="muted">No source has run a job yet.</p>';
      return;
    }
    let rows = "";
    data.sources.forEach((s) => {
      const outcomes = Object.keys(s.outcomes).filter((k) => s.outcomes[k])
        .map((k) => '<span class="count">' + s.outcomes[k] + " " + badge(k) + "</span>").join(" ");
      const use = s.utilisation === null ? "-" : '<span class="bar"><i style="width:' + (100 * s.utilisation).toFixed(1) +
        '%"></i></span>' + (100 * s.utilisation).toFixed(1) + "%";
      rows += "<tr><td><b>" + esc(s.name) + '</b></td><td class="num">' + s.slots + '</td><td class="num">' + s.attempts +
        "</td><td>" + outcomes + '</td><td class="num">' + seconds(s.busy) + '</td><td class="num">' + seconds(s.available) +
        "</td><td>" + use + '</td><td class="num">' + seconds(s.waiting) + '</td><td class="num">' + seconds(s.mean_run) + "</td></tr>";
    });
    byId("sources").innerHTML = "<table><thead><tr><th>source</th><th class=num>slots</th><th class=num>attempts</th>" +
      "<th>outcomes</th><th class=num>busy slot-time</th><th class=num>offered slot-time</th><th>use</th>" +
      "<th class=num>waited for scheduler</th><th class=num>mean run</th></tr></thead><tbody>" + rows + "</tbody></table>";
  }

  // -- the timeline --------------------------------------------------------------------------
  const LANE = 16, HEAD = 18, AXIS = 22, LEFT = 190, RIGHT = 12;
  const full = [0, data.launches.concat(data.attempts).reduce((most, item) => Math.max(most, item.end || 0), 1e-3)];
  let view = full.slice();
  const zoomKey = "hsm-report-zoom:" + data.sweep_dir; // a reloaded page of a running sweep keeps its zoom
  try {
    const kept = JSON.parse(sessionStorage.getItem(zoomKey) || "null");
    if (live && Array.isArray(kept) && kept.length === 2 && kept[0] < kept[1]) view = kept;
  } catch (e) { /* storage off, or not ours */ }
  const laneY = [];
  let timelineHeight = AXIS;
  (function placeLanes() {
    let y = AXIS, previous = null;
    data.lanes.forEach((lane, i) => {
      if (lane.source !== previous) { y += HEAD; previous = lane.source; }
      laneY[i] = y;
      y += LANE;
    });
    timelineHeight = y + 6;
  })();

  function ticks(from, to, width) {
    const steps = [0.1, 0.2, 0.5, 1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 14400, 21600, 43200, 86400];
    const wanted = (to - from) / Math.max(2, width / 110);
    const step = steps.find((s) => s >= wanted) || 86400 * Math.ceil(wanted / 86400);
    const list = [];
    for (let t = Math.ceil(from / step) * step; t <= to; t += step) list.push(t);
    return { list, step };
  }

  function tickLabel(at, step, last) {
    if (step < 1) return at.toFixed(1) + " s";
    return last < 120 ? Math.round(at) + " s" : elapsed(at);
  }

  function drawTimeline() {
    const box = byId("timeline");
    const width = Math.max(640, box.clientWidth);
    const plot = width - LEFT - RIGHT, span = view[1] - view[0];
    const x = (t) => LEFT + ((t - view[0]) / span) * plot;
    const out = ['<svg xmlns="http://www.w3.org/2000/svg" width="' + width + '" height="' + timelineHeight + '">',
      '<defs><pattern id="hatch" width="4" height="4" patternUnits="userSpaceOnUse" patternTransform="rotate(45)">' +
      '<rect width="4" height="4" fill="#fff"/><rect width="2" height="4" fill="var(--completed)"/></pattern>' +
      '<pattern id="no-launcher" width="6" height="6" patternUnits="userSpaceOnUse" patternTransform="rotate(45)">' +
      '<rect width="1" height="6" fill="#c9ced6"/></pattern>' +
      '<clipPath id="plot"><rect x="' + LEFT + '" y="0" width="' + plot + '" height="' + timelineHeight + '"/></clipPath></defs>'];
    // lanes and their labels
    let previous = null;
    data.lanes.forEach((lane, i) => {
      if (lane.source !== previous) {
        out.push('<text class="source-label" x="4" y="' + (laneY[i] - 5) + '">' + esc(lane.source) + "</text>");
        previous = lane.source;
      }
      if (i % 2 === 0) out.push('<rect class="lane-band" x="' + LEFT + '" y="' + laneY[i] + '" width="' + plot + '" height="' + LANE + '"/>');
      out.push('<text class="lane-label" x="14" y="' + (laneY[i] + 12) + '">' + esc(lane.label) + "</text>");
    });
    // the time axis
    const t = ticks(view[0], view[1], plot);
    out.push('<g class="axis">');
    t.list.forEach((at) => {
      const px = x(at).toFixed(1);
      out.push('<line class="grid" x1="' + px + '" x2="' + px + '" y1="' + (AXIS - 4) + '" y2="' + timelineHeight + '"/>' +
        '<text x="' + px + '" y="12" text-anchor="middle">' + tickLabel(at, t.step, view[1]) + "</text>");
    });
    out.push("</g><g clip-path=\"url(#plot)\">");
    // launches: a dashed line at each (hatching before it, where no launcher ran), a faint one at
    // each later batch of an adaptive sweeper (its launcher was there, asking the sweeper)
    let launchNumber = 1;
    data.launches.forEach((launch, i) => {
      const next = data.launches[i + 1];
      if (next && !next.batch && next.start - launch.end > span / 500) {
        out.push('<rect class="no-launcher" x="' + x(launch.end).toFixed(1) + '" y="' + AXIS + '" width="' +
          Math.max(1, x(next.start) - x(launch.end)).toFixed(1) + '" height="' + (timelineHeight - AXIS) + '"/>');
      }
      if (i === 0) return;
      const px = x(launch.start).toFixed(1);
      if (launch.batch) {
        out.push('<line class="batch-line" x1="' + px + '" x2="' + px + '" y1="' + AXIS + '" y2="' + timelineHeight + '"/>');
        return;
      }
      launchNumber += 1;
      out.push('<line class="launch-line" x1="' + px + '" x2="' + px + '" y1="' + AXIS + '" y2="' + timelineHeight +
        '"/><text class="launch-label" x="' + (x(launch.start) + 3).toFixed(1) + '" y="' + (AXIS + 9) + '">launch ' +
        launchNumber + "</text>");
    });
    // the attempts
    const minimum = 1.5;
    data.attempts.forEach((a, i) => {
      const end = a.end === null ? view[1] : a.end;
      if (end < view[0] || a.queued > view[1]) return;
      const y = laneY[a.lane] + 2, h = LANE - 4;
      const x0 = x(a.queued), xr = x(a.ran === null ? end : a.ran), x1 = Math.max(x(end), x0 + minimum);
      let g = '<g class="attempt o-' + a.outcome + (a.adopted ? " adopted" : "") + '" data-i="' + i + '" data-job="' + a.job +
        '" data-attempt="' + a.attempt + '" data-source="' + esc(a.source) + '" data-outcome="' + a.outcome + '">';
      if (xr - x0 > 0.5) g += '<rect class="wait" x="' + x0.toFixed(1) + '" y="' + y + '" width="' + (xr - x0).toFixed(1) + '" height="' + h + '"/>';
      const rx = Math.min(xr, x1 - minimum);
      g += '<rect class="run" x="' + rx.toFixed(1) + '" y="' + y + '" width="' + (x1 - rx).toFixed(1) + '" height="' + h + '"/></g>';
      out.push(g);
    });
    // a source lost, back, quarantined or gone: a marker on its first lane
    data.source_changes.forEach((c, i) => {
      const lane = data.lanes.findIndex((l) => l.source === c.source);
      if (lane < 0 || c.time < view[0] || c.time > view[1]) return;
      const px = x(c.time), py = laneY[lane] - 1;
      out.push('<path class="change change-' + esc(c.change) + '" data-change="' + i + '" d="M' + (px - 5).toFixed(1) + " " +
        (py - 8) + "L" + (px + 5).toFixed(1) + " " + (py - 8) + "L" + px.toFixed(1) + " " + py + 'Z"/>');
    });
    out.push('</g><rect class="selection" id="selection" x="0" y="' + AXIS + '" width="0" height="' + (timelineHeight - AXIS) + '"/></svg>');
    box.innerHTML = out.join("");
    if (picked !== null) box.querySelectorAll('g.attempt[data-job="' + picked + '"]').forEach((g) => g.classList.add("picked"));
  }

  function legend() {
    byId("legend").innerHTML = Object.keys(OUTCOMES).map((k) => '<span class="o-' + k + '">' + esc(OUTCOMES[k]) + "</span>").join("") +
      '<span class="wait">waiting for the scheduler</span><span class="adopted">adopted from an earlier launch</span>' +
      '<button id="zoom-out" type="button"' + (view[0] === full[0] && view[1] === full[1] ? " hidden" : "") +
      ">show the whole sweep</button>";
    byId("zoom-out").addEventListener("click", () => zoom(full.slice()));
  }

  function zoom(range) {
    view = range;
    try { sessionStorage.setItem(zoomKey, JSON.stringify(view)); } catch (e) { /* storage off: zoom is not kept */ }
    byId("zoom-out").hidden = view[0] === full[0] && view[1] === full[1];
    drawTimeline();
  }

  function timelineEvents() {
    const box = byId("timeline");
    let dragFrom = null;
    const timeAt = (event) => {
      const rect = box.getBoundingClientRect(), plot = rect.width - LEFT - RIGHT;
      const frac = Math.min(1, Math.max(0, (event.clientX - rect.left - LEFT) / plot));
      return { t: view[0] + frac * (view[1] - view[0]), px: event.clientX - rect.left };
    };
    box.addEventListener("mousemove", (event) => {
      const selection = byId("selection");
      if (dragFrom !== null && selection) {
        const at = timeAt(event).px;
        selection.setAttribute("x", Math.min(dragFrom.px, at));
        selection.setAttribute("width", Math.abs(at - dragFrom.px));
        hideTip();
        return;
      }
      const g = event.target.closest ? event.target.closest("g.attempt") : null;
      if (g) {
        showTip(attemptText(data.attempts[Number(g.dataset.i)]), event);
        return;
      }
      const mark = event.target.closest ? event.target.closest("[data-change]") : null;
      if (mark) {
        const c = data.source_changes[Number(mark.dataset.change)];
        showTip('<div class="t">' + esc(c.source) + ": " + esc(c.change) + "</div><div>at " + esc(clock(c.time)) +
          "</div>" + (c.reason ? "<pre>" + esc(causeLines(c.reason, 4)) + "</pre>" : ""), event);
        return;
      }
      hideTip();
    });
    box.addEventListener("mouseleave", hideTip);
    box.addEventListener("mousedown", (event) => {
      if (event.button === 0) dragFrom = timeAt(event);
    });
    window.addEventListener("mouseup", (event) => {
      if (dragFrom === null) return;
      const to = timeAt(event);
      const from = dragFrom;
      dragFrom = null;
      if (Math.abs(to.px - from.px) > 4) zoom([Math.min(from.t, to.t), Math.max(from.t, to.t)]);
      else if (byId("selection")) byId("selection").setAttribute("width", 0);
    });
    box.addEventListener("dblclick", () => zoom(full.slice()));
  }

  // -- slow, failed, retried, idle -----------------------------------------------------------
  function lists() {
    const overrides = (num) => esc(ownOverrides(jobsByNum.get(num)));
    byId("slowest").innerHTML = data.slowest.length ? "<table><thead><tr><th class=num>job</th><th>overrides</th><th>source</th>" +
      "<th class=num>ran</th><th>outcome</th></tr></thead><tbody>" + data.slowest.map((a) =>
      '<tr data-job="' + a.job + '"><td class="num">#' + a.job + '</td><td class="mono">' + overrides(a.job) + "</td><td>" + esc(a.source) +
        '</td><td class="num">' + seconds(runTime(a)) + "</td><td>" + badge(a.outcome) + "</td></tr>").join("") +
      "</tbody></table>" : '<p class="muted">No attempt has run yet.</p>';
    const troubled = data.jobs.filter((job) => job.attempts > 1 || ["failed", "lost", "interrupted"].includes(job.status));
    byId("retried").innerHTML = troubled.length ? "<table><thead><tr><th class=num>job</th><th>overrides</th><th>attempts</th>" +
      "</tr></thead><tbody>" + troubled.slice(0, 200).map((job) => {
        const chips = (attemptsOf.get(job.num) || []).map((a) => badge(a.outcome) + " " + esc(a.source) +
          (a.cause ? ' <span class="cause mono">' + esc(causeLines(a.cause, 1)) + "</span>" : "")).join("<br>");
        const never = job.attempts === 0 && job.cause ? badge(job.status) + ' never ran: <span class="cause mono">' +
          esc(causeLines(job.cause, 1)) + "</span>" : "";
        return '<tr data-job="' + job.num + '"><td class="num">#' + job.num + '</td><td class="mono">' + esc(ownOverrides(job)) + "</td><td>" +
          (chips || never) + "</td></tr>";
      }).join("") + "</tbody></table>" + (troubled.length > 200 ? '<p class="muted">and ' + (troubled.length - 200) +
      " more (see the jobs table)</p>" : "") : '<p class="muted">No job failed or ran twice.</p>';
    byId("idle").innerHTML = data.idle_gaps.length ? "<table><thead><tr><th>source</th><th>slot</th><th>from</th><th>to</th>" +
      "<th class=num>idle</th></tr></thead><tbody>" + data.idle_gaps.map((gap) => "<tr><td>" + esc(gap.source) + "</td><td>" +
      esc(gap.lane) + "</td><td>" + moment(gap.start) + "</td><td>" + moment(gap.end) + '</td><td class="num">' +
      seconds(gap.seconds) + "</td></tr>").join("") + '</tbody></table><p class="hint">The longest stretches in which a slot' +
      " that a launch offered ran nothing (times from the first launch).</p>" : '<p class="muted">No slot sat idle for a second or more.</p>';
  }

  // -- the values ----------------------------------------------------------------------------
  let metric = data.metrics[0];
  const VIRIDIS = ["#440154", "#482878", "#3e4989", "#31688e", "#26828e", "#1f9e89", "#35b779", "#6ece58", "#b5de2b", "#fde725"];
  function scaleOf(values, log) {
    let low = values.reduce((a, b) => Math.min(a, b), Infinity), high = values.reduce((a, b) => Math.max(a, b), -Infinity);
    if (log) { low = Math.log10(low); high = Math.log10(high); }
    if (low === high) { low -= 0.5; high += 0.5; }
    const pad = (high - low) * 0.05;
    return { low: low - pad, high: high + pad, log, at: (v) => ((log ? Math.log10(v) : v) - (low - pad)) / (high - low + 2 * pad) };
  }
  function canvasOf(width, height) {
    const canvas = document.createElement("canvas"), ratio = window.devicePixelRatio || 1;
    canvas.width = width * ratio; canvas.height = height * ratio;
    canvas.style.width = width + "px"; canvas.style.height = height + "px";
    const ctx = canvas.getContext("2d");
    ctx.scale(ratio, ratio);
    ctx.font = "11px system-ui, sans-serif";
    return { canvas, ctx };
  }
  function jitter(num) {
    const s = Math.sin(num * 12.9898) * 43758.5453;
    return s - Math.floor(s) - 0.5;
  }
  function tickValues(scale) {
    if (scale.log) {
      const list = [];
      for (let e = Math.ceil(scale.low); e <= Math.floor(scale.high); e++) list.push(Math.pow(10, e));
      return list;
    }
    const step = Math.pow(10, Math.floor(Math.log10((scale.high - scale.low) / 4)));
    const mult = [1, 2, 5, 10].find((m) => (scale.high - scale.low) / (step * m) <= 6) || 10;
    const list = [];
    for (let v = Math.ceil(scale.low / (step * mult)) * step * mult; v <= scale.high; v += step * mult) list.push(v);
    return list;
  }

  // A value axis is logarithmic when the values are positive and span two decades or more.
  function logFor(values) {
    let low = Infinity, high = -Infinity;
    values.forEach((v) => { low = Math.min(low, v); high = Math.max(high, v); });
    return low > 0 && high / low >= 100;
  }

  function slice(param, points) {
    const W = 340, H = 230, L = 56, B = 36, T = 10, R = 10;
    const { canvas, ctx } = canvasOf(W, H);
    const ys = points.map((p) => p.y), yScale = scaleOf(ys, logFor(ys));
    const py = (v) => T + (1 - yScale.at(v)) * (H - T - B);
    let px;
    ctx.strokeStyle = "#d9dee5"; ctx.fillStyle = "#5f6b7a";
    if (param.kind === "numeric") {
      const xScale = scaleOf(points.map((p) => p.x), param.log);
      px = (p) => L + xScale.at(p.x) * (W - L - R);
      tickValues(xScale).forEach((v) => {
        const at = px({ x: v });
        ctx.beginPath(); ctx.moveTo(at, T); ctx.lineTo(at, H - B); ctx.stroke();
        ctx.textAlign = "center"; ctx.fillText(shortValue(v), at, H - B + 14);
      });
    } else {
      const values = param.values, band = (W - L - R) / values.length;
      px = (p) => L + band * (values.indexOf(p.x) + 0.5 + 0.6 * jitter(p.num));
      values.forEach((v, i) => {
        ctx.textAlign = "center";
        ctx.fillText(String(v).slice(0, 14), L + band * (i + 0.5), H - B + 14);
      });
    }
    tickValues(yScale).forEach((v) => {
      const at = py(v);
      ctx.beginPath(); ctx.moveTo(L, at); ctx.lineTo(W - R, at); ctx.stroke();
      ctx.textAlign = "right"; ctx.fillText(shortValue(v), L - 4, at + 4);
    });
    ctx.textAlign = "center"; ctx.fillStyle = "#1d2330";
    ctx.fillText(param.name + (param.log ? " (log)" : ""), L + (W - L - R) / 2, H - 6);
    ctx.globalAlpha = points.length > 500 ? 0.45 : 0.8;
    ctx.fillStyle = "#3b82c4";
    const placed = points.map((p) => ({ p, x: px(p), y: py(p.y) }));
    if (placed.length > 2000) placed.forEach((d) => ctx.fillRect(d.x - 2, d.y - 2, 4, 4)); // fast for big sweeps
    else placed.forEach((d) => { ctx.beginPath(); ctx.arc(d.x, d.y, 3, 0, 2 * Math.PI); ctx.fill(); });
    canvas.addEventListener("mousemove", (event) => {
      const rect = canvas.getBoundingClientRect(), mx = event.clientX - rect.left, my = event.clientY - rect.top;
      let best = null, bestD = 64;
      placed.forEach((d) => { const dd = (d.x - mx) ** 2 + (d.y - my) ** 2; if (dd < bestD) { bestD = dd; best = d; } });
      if (best) {
        const job = jobsByNum.get(best.p.num);
        showTip('<div class="t">#' + job.num + " &middot; " + esc(metric) + " = " + esc(shortValue(best.p.y)) + '</div><div class="mono">' +
          esc(ownOverrides(job)) + "</div>", event);
      } else hideTip();
    });
    canvas.addEventListener("mouseleave", hideTip);
    const figure = document.createElement("figure");
    figure.appendChild(canvas);
    const caption = document.createElement("figcaption");
    caption.textContent = metric + (yScale.log ? " (log)" : "") + " against " + param.name + " (" +
      (param.kind === "numeric" ? "each dot a job" : "jittered within each value") + ")";
    figure.appendChild(caption);
    return figure;
  }

  function parallel(rows) {
    const axes = data.params.concat([{ name: metric, kind: "numeric", log: logFor(rows.map((r) => r.metrics[metric])),
      metric: true }]);
    const W = Math.max(640, byId("parallel").clientWidth), H = 300, T = 24, B = 24, L = 50, R = 50;
    const { canvas, ctx } = canvasOf(W, H);
    const step = (W - L - R) / (axes.length - 1);
    const scales = axes.map((axis) => {
      if (axis.kind !== "numeric") return { at: (v) => (axis.values.indexOf(v) + 0.5) / axis.values.length };
      return scaleOf(rows.map((r) => (axis.metric ? r.metrics[metric] : r.params[axis.name])).filter((v) => v !== null && v !== undefined), axis.log);
    });
    const colour = scales[scales.length - 1];
    ctx.globalAlpha = rows.length > 1000 ? 0.25 : 0.6;
    ctx.lineWidth = 1;
    const buckets = VIRIDIS.map(() => []); // one path per colour: one stroke each, fast for 10,000 lines
    rows.forEach((r) => buckets[Math.max(0, Math.min(9, Math.floor(colour.at(r.metrics[metric]) * 10)))].push(r));
    buckets.forEach((bucket, b) => {
      ctx.strokeStyle = VIRIDIS[b];
      ctx.beginPath();
      bucket.forEach((r) => axes.forEach((axis, i) => {
        const v = axis.metric ? r.metrics[metric] : r.params[axis.name];
        const y = T + (1 - scales[i].at(v)) * (H - T - B);
        if (i === 0) ctx.moveTo(L, y); else ctx.lineTo(L + i * step, y);
      }));
      ctx.stroke();
    });
    ctx.globalAlpha = 1;
    axes.forEach((axis, i) => {
      const x = L + i * step;
      ctx.strokeStyle = "#1d2330"; ctx.beginPath(); ctx.moveTo(x, T); ctx.lineTo(x, H - B); ctx.stroke();
      ctx.fillStyle = "#1d2330"; ctx.textAlign = "center"; ctx.fillText(axis.name, x, 14);
      ctx.fillStyle = "#5f6b7a";
      const labels = axis.kind === "numeric" ? tickValues(scales[i]).map((v) => [v, scales[i].at(v)])
        : axis.values.map((v) => [v, scales[i].at(v)]);
      labels.forEach(([v, at]) => {
        ctx.textAlign = i === axes.length - 1 ? "left" : "right";
        ctx.fillText(String(shortValue(v)).slice(0, 10), x + (i === axes.length - 1 ? 4 : -4), T + (1 - at) * (H - T - B) + 4);
      });
    });
    const figure = document.createElement("figure");
    figure.appendChild(canvas);
    const caption = document.createElement("figcaption");
    caption.textContent = "Parallel coordinates: each line a job, through its parameters to its " + metric + " (coloured by it)";
    figure.appendChild(caption);
    byId("parallel").replaceChildren(figure);
  }

  function values() {
    const controls = byId("values-controls");
    if (!data.metrics.length) {
      controls.innerHTML = '<p class="muted">No job has returned a number yet. Return a number, or a dict of numbers, from' +
        " your task function to see it against the parameters here.</p>";
      return;
    }
    if (!data.params.length) {
      controls.innerHTML = '<p class="muted">The jobs share every override: there is no swept parameter to plot against.</p>';
      return;
    }
    controls.innerHTML = data.metrics.length > 1 ? '<label>value <select id="metric">' + data.metrics.map((m) =>
      "<option" + (m === metric ? " selected" : "") + ">" + esc(m) + "</option>").join("") + "</select></label>" : "";
    if (byId("metric")) byId("metric").addEventListener("change", (event) => { metric = event.target.value; plots(); });
    plots();
  }

  function plots() {
    const rows = data.jobs.filter((job) => typeof job.metrics[metric] === "number");
    byId("slices").replaceChildren(...data.params.map((param) => slice(param, rows
      .filter((job) => job.params[param.name] !== null && job.params[param.name] !== undefined && (!param.log || job.params[param.name] > 0))
      .map((job) => ({ num: job.num, x: job.params[param.name], y: job.metrics[metric] })))));
    if (data.params.length > 1) parallel(rows.filter((job) => data.params.every((p) => job.params[p.name] !== null && job.params[p.name] !== undefined)));
  }

  // -- the jobs table ------------------------------------------------------------------------
  const PAGE = 100;
  const textValues = data.jobs.some((job) => job.value !== null && !Object.keys(job.metrics).length);
  const columns = [{ name: "job", get: (j) => j.num, num: true, show: (j) => "#" + j.num }]
    .concat(data.params.map((p) => ({ name: p.name, get: (j) => j.params[p.name], num: p.kind === "numeric", show: (j) => shortValue(j.params[p.name]) })))
    .concat(data.metrics.map((m) => ({ name: m, get: (j) => j.metrics[m], num: true, show: (j) => shortValue(j.metrics[m]) })))
    .concat(textValues ? [{ name: "returned", get: (j) => shortValue(j.value), show: (j) => shortValue(j.value) }] : [])
    .concat([
      { name: "status", get: (j) => j.status, show: (j) => badge(j.status), html: true },
      { name: "attempts", get: (j) => j.attempts, num: true, show: (j) => String(j.attempts) },
      { name: "ran", get: (j) => { const a = lastAttempt(j.num); return a ? runTime(a) : null; }, num: true, show: (j) => { const a = lastAttempt(j.num); return a ? seconds(runTime(a)) : "-"; } },
      { name: "source", get: (j) => { const a = lastAttempt(j.num); return a ? a.source : ""; }, show: (j) => { const a = lastAttempt(j.num); return a ? a.source : "-"; } },
    ]);
  let order = data.jobs.slice(), sortBy = 0, ascending = true, page = 0;

  function sortTable(index) {
    ascending = sortBy === index ? !ascending : true;
    sortBy = index;
    const get = columns[index].get;
    order.sort((a, b) => {
      const x = get(a), y = get(b);
      const missing = (x === null || x === undefined) - (y === null || y === undefined);
      if (missing) return missing; // jobs without the value go last, either way
      const c = typeof x === "number" && typeof y === "number" ? x - y : String(x).localeCompare(String(y), undefined, { numeric: true });
      return ascending ? c : -c;
    });
    page = 0;
    drawTable();
  }

  function drawTable() {
    const pages = Math.max(1, Math.ceil(order.length / PAGE));
    const head = columns.map((c, i) => '<th class="sortable' + (c.num ? " num" : "") + '" data-col="' + i + '"' +
      (i === sortBy ? ' aria-sort="' + (ascending ? "ascending" : "descending") + '"' : "") + ">" + esc(c.name) + "</th>").join("");
    const body = order.slice(page * PAGE, (page + 1) * PAGE).map((job) => '<tr data-job="' + job.num + '"' +
      (job.num === picked ? ' class="picked"' : "") + ">" + columns.map((c) =>
      "<td" + (c.num ? ' class="num"' : "") + ">" + (c.html ? c.show(job) : esc(c.show(job))) + "</td>").join("") + "</tr>").join("");
    byId("table").innerHTML = "<table><thead><tr>" + head + "</tr></thead><tbody>" + body + "</tbody></table>" +
      (pages > 1 ? '<div class="pager"><button type="button" data-page="-1"' + (page === 0 ? " disabled" : "") + ">previous</button>" +
        "<span>page " + (page + 1) + " of " + pages + " (" + order.length + " jobs)</span>" +
        '<button type="button" data-page="1"' + (page === pages - 1 ? " disabled" : "") + ">next</button></div>" : "");
  }

  function tableEvents() {
    byId("table").addEventListener("click", (event) => {
      const th = event.target.closest("th[data-col]");
      if (th) { sortTable(Number(th.dataset.col)); return; }
      const button = event.target.closest("button[data-page]");
      if (button) { page += Number(button.dataset.page); drawTable(); }
    });
  }

  // A job picked (a click on its row in a table, or on one of its bars): its attempts outlined.
  let picked = null;
  function pick(num) {
    picked = picked === num ? null : num;
    document.querySelectorAll("g.attempt.picked").forEach((g) => g.classList.remove("picked"));
    document.querySelectorAll("tr.picked").forEach((tr) => tr.classList.remove("picked"));
    if (picked === null) return;
    document.querySelectorAll('g.attempt[data-job="' + picked + '"]').forEach((g) => g.classList.add("picked"));
    document.querySelectorAll('tr[data-job="' + picked + '"]').forEach((tr) => tr.classList.add("picked"));
  }
  function pickEvents() {
    ["table", "slowest", "retried"].forEach((id) => byId(id).addEventListener("click", (event) => {
      const row = event.target.closest("tbody tr[data-job]");
      if (!row) return;
      pick(Number(row.dataset.job));
      const box = byId("timeline").getBoundingClientRect();
      if (box.bottom < 0 || box.top > window.innerHeight) byId("timeline").scrollIntoView({ block: "center" });
    }));
    byId("timeline").addEventListener("click", (event) => {
      const g = event.target.closest ? event.target.closest("g.attempt") : null;
      if (g) pick(Number(g.dataset.job));
    });
  }

  const timings = {}; // milliseconds each part took to draw: window.hsmReport.timings
  [["header", header], ["sources", sources], ["legend", legend], ["timeline", drawTimeline], ["lists", lists],
    ["values", values], ["table", drawTable]].forEach(([name, draw]) => {
    const from = performance.now();
    draw();
    timings[name] = Math.round(performance.now() - from);
  });
  timelineEvents();
  tableEvents();
  pickEvents();
  let resizing = null;
  window.addEventListener("resize", () => {
    clearTimeout(resizing);
    resizing = setTimeout(() => { drawTimeline(); if (data.params.length > 1 && data.metrics.length) plots(); }, 150);
  });
  window.hsmReport = { data, renderMs: performance.now() - began, timings };
  document.documentElement.dataset.rendered = "true";
})();
