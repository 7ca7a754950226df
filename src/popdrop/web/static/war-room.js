/* popdrop war room (operators): one uPlot chart per group of figures, the tiles, the drops'
 * states and the paused banner, kept live from the war room's SSE stream.
 * Loaded as a file so the page runs under `script-src 'self'`: the first snapshot is the
 * page's JSON data block (#war-room-data), the stream URL its script tag's data-stream. */
(function () {
  "use strict";
  var script = document.currentScript;
  var stream = script && script.dataset.stream;
  var root = document.getElementById("war-room");
  var block = document.getElementById("war-room-data");
  if (!root || !block) { return; }
  var snapshot = JSON.parse(block.textContent);
  var zone = snapshot.zone || "UTC";
  var charts = {};
  var CHART_HEIGHT = 200;
  var BADGES = { scheduled: "warn", sending: "good", paused: "warn", done: "good", cancelled: "bad" };

  function clock(iso) {
    try {
      return new Intl.DateTimeFormat(undefined, {
        hour: "2-digit", minute: "2-digit", second: "2-digit", hour12: false, timeZone: zone
      }).format(new Date(iso));
    } catch (e) { return iso; }
  }

  function each(selector, fn) {
    Array.prototype.forEach.call(root.querySelectorAll(selector), fn);
  }

  // ------------------------------------------------------------- charts
  function widthOf(el) { return Math.max(240, Math.floor(el.clientWidth)); }

  function dataOf(snap, group) {
    var data = [snap.minutes];
    group.series.forEach(function (s) { data.push(snap.series[s.key] || []); });
    return data;
  }

  function makeChart(snap, group) {
    var el = root.querySelector('[data-chart="' + group.key + '"]');
    if (!el || !window.uPlot) { return; }
    var series = [{ label: "Time" }];
    group.series.forEach(function (s) {
      series.push({ label: s.label, stroke: s.color, width: 2, points: { show: false } });
    });
    var opts = {
      width: widthOf(el),
      height: CHART_HEIGHT,
      tzDate: function (ts) { return window.uPlot.tzDate(new Date(ts * 1000), zone); },
      scales: { x: { time: true }, y: { range: function (u, min, max) { return [0, Math.max(4, max)]; } } },
      axes: [{}, { size: 40 }],
      legend: { live: false },
      cursor: { drag: { x: false, y: false } },
      series: series
    };
    charts[group.key] = new window.uPlot(opts, dataOf(snap, group), el);
  }

  function drawCharts(snap) {
    (snap.groups || []).forEach(function (group) {
      if (charts[group.key]) {
        charts[group.key].setData(dataOf(snap, group));
      } else {
        makeChart(snap, group);
      }
    });
  }

  var resizing = null;
  window.addEventListener("resize", function () {
    clearTimeout(resizing);
    resizing = setTimeout(function () {
      Object.keys(charts).forEach(function (key) {
        var el = root.querySelector('[data-chart="' + key + '"]');
        if (el) { charts[key].setSize({ width: widthOf(el), height: CHART_HEIGHT }); }
      });
    }, 150);
  });

  // ------------------------------------------------------------- tiles, drops, banners
  function setText(el, text) { if (el && el.textContent !== text) { el.textContent = text; } }

  function updateTiles(snap) {
    snap.tiles.forEach(function (tile) {
      var el = root.querySelector('[data-tile="' + tile.key + '"]');
      if (!el) { return; }
      setText(el.querySelector('[data-role="value"]'), tile.display);
      setText(el.querySelector('[data-role="detail"]'), tile.detail);
      var reason = el.querySelector('[data-role="reason"]');
      setText(reason, tile.reason || "");
      if (reason) { reason.hidden = !tile.reason; }
      el.classList.toggle("alert", !!tile.alert);
      el.dataset.alert = tile.alert ? "yes" : "no";
    });
    each("[data-total]", function (el) {
      var total = snap.totals[el.dataset.total];
      if (total !== undefined) { setText(el, total.toLocaleString("en")); }
    });
  }

  function updateDrops(snap) {
    snap.drops.forEach(function (drop) {
      var el = root.querySelector('.wr-drop[data-drop="' + drop.id + '"]');
      if (!el) { return; }
      el.dataset.status = drop.status;
      var badge = el.querySelector('[data-role="status"] .badge');
      if (badge) {
        badge.className = "badge " + (BADGES[drop.status] || "") + " status-" + drop.status;
        badge.dataset.status = drop.status;
        setText(badge, drop.status);
      }
      var reason = el.querySelector('[data-role="reason"]');
      setText(reason, drop.paused_reason || "");
      if (reason) { reason.hidden = !drop.paused_reason; }
      Array.prototype.forEach.call(el.querySelectorAll("form[data-action]"), function (form) {
        form.hidden = drop.actions.indexOf(form.dataset.action) < 0;
      });
    });
  }

  function updateBanners(snap) {
    var banner = document.getElementById("paused-banner");
    if (banner) {
      var paused = snap.drops.filter(function (d) { return d.status === "paused"; });
      banner.textContent = "";
      paused.forEach(function (d) {
        var p = document.createElement("p");
        p.dataset.drop = d.id;
        var strong = document.createElement("strong");
        strong.textContent = d.name + ": " + (d.auto_paused ? "auto-paused" : "paused") + ".";
        p.appendChild(strong);
        p.appendChild(document.createTextNode(" " + (d.paused_reason || "")));
        banner.appendChild(p);
      });
      banner.hidden = paused.length === 0;
    }
    var alerts = document.getElementById("alerts");
    if (alerts) {
      var list = alerts.querySelector("ul") || alerts.appendChild(document.createElement("ul"));
      list.textContent = "";
      snap.alerts.forEach(function (reason) {
        var li = document.createElement("li");
        li.textContent = reason;
        list.appendChild(li);
      });
      alerts.hidden = snap.alerts.length === 0;
    }
  }

  function updateStock(snap) {
    (snap.stock || []).forEach(function (s) {
      var row = root.querySelector('tr[data-product="' + s.product_id + '"]');
      if (!row) { return; }
      row.classList.toggle("low", !!s.low);
      setText(row.querySelector('[data-role="left"]'), s.left.toLocaleString("en"));
    });
  }

  function apply(snap) {
    snapshot = snap;
    drawCharts(snap);
    updateTiles(snap);
    updateDrops(snap);
    updateBanners(snap);
    updateStock(snap);
    setText(document.getElementById("updated"), clock(snap.generated_at));
    root.dataset.updated = snap.generated_at;
  }

  apply(snapshot);

  // ------------------------------------------------------------- the stream
  if (!window.EventSource || !stream) { return; }
  var state = document.getElementById("live-state");
  var source = new EventSource(stream);
  source.addEventListener("snapshot", function (message) {
    setText(state, "Live");
    root.classList.remove("stale");
    apply(JSON.parse(message.data));
  });
  source.addEventListener("error", function () {
    // EventSource reconnects by itself; say so until the next snapshot.
    setText(state, "Reconnecting…");
    root.classList.add("stale");
  });
})();
