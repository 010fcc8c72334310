// Live status: polls /gui/admin/status.json and draws line charts on <canvas> (no library).
(function () {
  "use strict";
  var COLORS = ["#1f5fbf", "#1e7a3c", "#b3261e", "#9a6700"];
  var LABELS = {received: "messages received", sent: "recipients sent", queue_messages: "queued",
                inbound_connections: "inbound", outbound_connections: "outbound",
                memory_bytes: "memory"};

  function series(data, name, rate, scale) {
    var f = data.history.fields, s = data.history.samples;
    var ti = f.indexOf("time"), vi = f.indexOf(name), out = [];
    for (var i = 0; i < s.length; i++) {
      if (s[i][vi] === null) continue;
      if (rate) {
        if (i === 0) continue;
        var dt = s[i][ti] - s[i - 1][ti];
        if (dt <= 0) continue;
        out.push([s[i][ti], Math.max(0, (s[i][vi] - s[i - 1][vi]) * 60 / dt)]);
      } else {
        out.push([s[i][ti], s[i][vi] * scale]);
      }
    }
    return out;
  }

  function niceStep(v, whole) {  // a round step so that 4 steps cover v; whole: 1, 2, 5, 10...
    if (v <= 0) return whole ? 1 : 0.25;
    var raw = v / 4, p = Math.pow(10, Math.floor(Math.log10(raw))), m = raw / p;
    var step = (m <= 1 ? 1 : m <= 2 ? 2 : (m <= 2.5 && !whole) ? 2.5 : m <= 5 ? 5 : 10) * p;
    return whole ? Math.max(1, Math.round(step)) : step;
  }

  function clock(t) {  // 24-hour HH:MM:SS, as the logs write times
    var d = new Date(t * 1000), p = function (n) { return (n < 10 ? "0" : "") + n; };
    return p(d.getHours()) + ":" + p(d.getMinutes()) + ":" + p(d.getSeconds());
  }

  function fmt(v) {
    if (v >= 1e6) return (v / 1e6).toFixed(1) + "M";
    if (v >= 1e4) return (v / 1e3).toFixed(0) + "k";
    if (v >= 100 || v === Math.round(v)) return String(Math.round(v));
    return v < 1 ? v.toFixed(2) : v.toFixed(1);
  }

  function draw(canvas, data) {
    var names = canvas.getAttribute("data-series").split(",");
    var rate = canvas.getAttribute("data-rate") === "1";
    var scale = parseFloat(canvas.getAttribute("data-scale") || "1");
    var ratio = window.devicePixelRatio || 1;
    var w = canvas.clientWidth || canvas.width, h = canvas.clientHeight || canvas.height;
    canvas.width = w * ratio; canvas.height = h * ratio;
    var ctx = canvas.getContext("2d");
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    ctx.clearRect(0, 0, w, h);
    var all = names.map(function (n) { return series(data, n, rate, scale); });
    var t0 = Infinity, t1 = -Infinity, vmax = 0;
    all.forEach(function (s) { s.forEach(function (p) {
      t0 = Math.min(t0, p[0]); t1 = Math.max(t1, p[0]); vmax = Math.max(vmax, p[1]); }); });
    var L = 44, R = 8, T = 18, B = 20, pw = w - L - R, ph = h - T - B;
    vmax = niceStep(vmax, canvas.getAttribute("data-integer") === "1") * 4;
    ctx.font = "11px system-ui, sans-serif"; ctx.fillStyle = "#5b6677"; ctx.strokeStyle = "#e3e7ee";
    ctx.lineWidth = 1;
    var ticks = [];
    for (var g = 0; g <= 4; g++) {
      var y = T + ph - ph * g / 4;
      ctx.beginPath(); ctx.moveTo(L, y + 0.5); ctx.lineTo(L + pw, y + 0.5); ctx.stroke();
      ticks.push(fmt(vmax * g / 4));
      ctx.textAlign = "right"; ctx.fillText(ticks[g], L - 6, y + 4);
    }
    canvas.setAttribute("data-ticks", ticks.join(" "));  // what the axis says, for tests
    if (!isFinite(t0) || t1 <= t0) {
      ctx.textAlign = "center"; ctx.fillText("collecting samples…", L + pw / 2, T + ph / 2);
    } else {
      ctx.textAlign = "left";
      ctx.fillText(clock(t0), L, h - 5);
      ctx.textAlign = "right";
      ctx.fillText(clock(t1), L + pw, h - 5);
      canvas.setAttribute("data-clock", clock(t0) + " " + clock(t1));
    }
    all.forEach(function (s, k) {
      ctx.strokeStyle = COLORS[k % COLORS.length]; ctx.lineWidth = 2; ctx.beginPath();
      s.forEach(function (p, i) {
        var x = L + (t1 > t0 ? (p[0] - t0) / (t1 - t0) : 1) * pw, y = T + ph - p[1] / vmax * ph;
        if (i === 0) ctx.moveTo(x, y); else ctx.lineTo(x, y);
      });
      ctx.stroke();
      ctx.fillStyle = COLORS[k % COLORS.length]; ctx.textAlign = "left";
      var last = s.length ? fmt(s[s.length - 1][1]) : "–";
      ctx.fillText("■ " + (LABELS[names[k]] || names[k]) + " " + last, L + 4 + k * 170, 12);
    });
    canvas.setAttribute("data-points", String(all[0].length));
  }

  function tiles(now) {
    var els = document.querySelectorAll("#tiles [data-k]");
    for (var i = 0; i < els.length; i++) {
      var k = els[i].getAttribute("data-k"), v;
      if (k === "memory_mb") v = (now.memory_bytes / 1048576).toFixed(1);
      else if (k === "paused") v = now.paused ? "paused" : "on";
      else v = now[k] === null ? "–" : String(now[k]);
      els[i].textContent = v;
    }
  }

  function dests(list) {
    var body = document.querySelector("#dests tbody");
    if (!body) return;
    body.textContent = "";
    if (!list.length) {
      var tr = body.insertRow(), td = tr.insertCell();
      td.colSpan = 9; td.className = "empty"; td.textContent = "The queue is empty.";
      return;
    }
    list.forEach(function (d) {
      var tr = body.insertRow(), a = document.createElement("a");
      a.href = "/gui/admin/queue/domain/" + encodeURIComponent(d.domain); a.textContent = d.domain;
      tr.insertCell().appendChild(a);
      [d.state, d.why, d.running, d.ready, d.messages, d.recipients, d.next_retry, d.last]
        .forEach(function (v, i) { var c = tr.insertCell();
                                   c.textContent = v === null ? "" : String(v);
                                   if (i === 7) c.className = "log"; });
    });
  }

  function sources(list) {  // the sending sources' table, when the page has one
    var body = document.querySelector("#sources tbody");
    if (!body || !list) return;
    body.textContent = "";
    list.forEach(function (s) {
      var tr = body.insertRow();
      tr.setAttribute("data-source", s.source);
      var today = s.today.map(function (t) { return t.text; }).join(", ") || "none yet";
      [s.source, s.ip, s.helo, s.pools_text, s.rdns_text, s.connections, s.warmup_text, today]
        .forEach(function (v, i) { var c = tr.insertCell(); c.textContent = String(v);
                                   if (i === 4) c.className = s.rdns_problem ? "bad" : "log";
                                   if (i === 7) c.className = "today"; });
    });
  }

  function refresh() {
    fetch("/gui/admin/status.json", {credentials: "same-origin"})
      .then(function (r) { if (r.status === 401) { location.href = "/gui/login"; } return r.json(); })
      .then(function (data) {
        tiles(data.now); dests(data.destinations); sources(data.sources);
        var cs = document.querySelectorAll("canvas[data-series]");
        for (var i = 0; i < cs.length; i++) draw(cs[i], data);
        document.body.setAttribute("data-refreshed", String(Date.now()));
      })
      .catch(function () {})
      .then(function () { setTimeout(refresh, 2000); });
  }
  refresh();
})();
