/* popdrop public event page (/e/{event_id}): countdown, live stock, RSVP.
 * Loaded as a file so the page runs under `script-src 'self'`; the stream URL is its
 * script tag's data-stream attribute. */
(function () {
  "use strict";
  var stream = document.currentScript && document.currentScript.dataset.stream;
  // Countdown: the server already wrote the target time; this only makes it tick. A
  // countdown to the opening (data-then-*) counts on to the start once it reaches zero.
  var box = document.getElementById("countdown");
  var target = box && box.dataset.target ? Date.parse(box.dataset.target) : NaN;
  if (!isNaN(target)) {
    var out = box.querySelector(".countdown-value");
    var tick = function () {
      var left = Math.max(0, Math.floor((target - Date.now()) / 1000));
      var d = Math.floor(left / 86400), h = Math.floor(left % 86400 / 3600);
      var m = Math.floor(left % 3600 / 60), s = left % 60;
      var pad = function (n) { return (n < 10 ? "0" : "") + n; };
      out.textContent = (d ? d + "d " : "") + pad(h) + ":" + pad(m) + ":" + pad(s);
      if (left > 0) { return; }
      var then = box.dataset.thenTarget ? Date.parse(box.dataset.thenTarget) : NaN;
      if (!isNaN(then)) {
        box.querySelector(".countdown-label").textContent = box.dataset.thenLabel || "";
        delete box.dataset.thenTarget;
        target = then;
        tick();
        return;
      }
      clearInterval(timer);
    };
    var timer = setInterval(tick, 1000);
    tick();
  }

  // Live stock from the SSE stream. A row at 0 says "Sold out" and hides its Buy form;
  // when units come back (a hold expired, the host added stock) the form shows again.
  // Bundle rows (loaded later into #bundles) count whole bundles: the scarcest of their
  // components ("variant:qty …" in data-components) at that lane decides.
  var counts = document.querySelectorAll(".stock-count");
  var stock = {};
  var stockKey = function (variant, lane) { return variant + "@" + lane; };
  var setRow = function (el, available) {
    el.dataset.available = available;
    el.textContent = available > 0 ? available + " left" : "Sold out";
    el.classList.toggle("sold-out", available === 0);
    var row = el.closest("li");
    var buyForm = row && row.querySelector(".buy-form");
    if (!buyForm) { return; }
    buyForm.hidden = available === 0;
    var button = buyForm.querySelector("button[type=submit]");
    if (button) { button.disabled = available === 0; }
  };
  var bundleLeft = function (el) {
    var left = Infinity;
    (el.dataset.components || "").split(" ").forEach(function (part) {
      var bits = part.split(":");
      var have = stock[stockKey(bits[0], el.dataset.lane)];
      if (have !== undefined && Number(bits[1]) > 0) {
        left = Math.min(left, Math.floor(have / Number(bits[1])));
      }
    });
    return left === Infinity ? Number(el.dataset.available) : left;
  };
  counts.forEach(function (el) {
    if (el.dataset.variant) { stock[stockKey(el.dataset.variant, el.dataset.lane)] = Number(el.dataset.available); }
  });
  if (counts.length && window.EventSource && stream) {
    var hint = document.getElementById("live-hint");
    var source = new EventSource(stream);
    source.addEventListener("availability", function (message) {
      var rows = JSON.parse(message.data);
      rows.forEach(function (row) {
        stock[stockKey(row.variant_id, row.lane_id)] = row.available;
        var el = document.querySelector(
          '.stock-count[data-variant="' + row.variant_id + '"][data-lane="' + row.lane_id + '"]');
        if (el) { setRow(el, row.available); }
      });
      document.querySelectorAll(".bundle-count").forEach(function (el) { setRow(el, bundleLeft(el)); });
      if (hint) { hint.textContent = "Stock updates live."; hint.classList.remove("stale"); }
    });
    source.onerror = function () {
      if (hint) { hint.textContent = "Reconnecting… stock may be out of date."; hint.classList.add("stale"); }
    };
  }

  // RSVP: JSON to the public API; a full slot offers the waiting list.
  var form = document.getElementById("rsvp-form");
  if (!form) { return; }
  // Before the opening the form is hidden; it shows itself at opens_at, no reload.
  var opensAt = form.dataset.opensAt ? Date.parse(form.dataset.opensAt) : NaN;
  if (form.hidden && !isNaN(opensAt)) {
    var openWhenDue = function () {
      if (Date.now() < opensAt) { return; }
      clearInterval(waiting);
      form.hidden = false;
      var note = document.getElementById("rsvp-opens");
      if (note) { note.parentNode.removeChild(note); }
    };
    var waiting = setInterval(openWhenDue, 250);
    openWhenDue();
  }
  var result = document.getElementById("rsvp-result");
  var show = function (kind, html) {
    result.innerHTML = '<div class="alert ' + kind + '" role="status">' + html + "</div>";
  };
  var esc = function (text) {
    var span = document.createElement("span");
    span.textContent = String(text);
    return span.innerHTML;
  };
  var send = function (waitlist) {
    var data = new FormData(form);
    var slot = form.querySelector("input[name=slot_id]:checked");
    var body = {
      slot_id: slot ? Number(slot.value) : 0,
      places: Number(data.get("places") || 1),
      consent: form.querySelector("input[name=consent]").checked,
      consent_text: document.getElementById("consent-text").textContent.trim(),
      waitlist: waitlist
    };
    var email = String(data.get("email") || "").trim();
    var phone = String(data.get("phone") || "").trim();
    if (email) { body.email = email; }
    if (phone) { body.phone = phone; }
    if (!body.consent) { show("bad", "Please tick the consent box."); return; }
    var button = form.querySelector("button[type=submit]");
    button.disabled = true;
    fetch(form.dataset.action, {
      method: "POST",
      headers: {"Content-Type": "application/json", "Accept": "application/json"},
      body: JSON.stringify(body)
    }).then(function (response) {
      return response.json().then(function (json) { return {status: response.status, json: json}; });
    }).then(function (answer) {
      var json = answer.json;
      if (answer.status === 201) {
        var r = json.rsvp;
        if (r.status === "confirmed") {
          show("good", "<strong>You're in!</strong> " + r.places + " place" + (r.places > 1 ? "s" : "") +
            " confirmed for " + esc(slot.parentNode.querySelector(".slot-time").textContent) +
            ". We'll send the details to " + esc(r.email || r.phone) + ".");
        } else {
          show("good", "<strong>You're on the waiting list.</strong> We'll contact " +
            esc(r.email || r.phone) + " as soon as a place frees up.");
        }
        var badge = form.querySelector('.slot-left[data-slot="' + r.slot_id + '"]');
        var left = badge ? parseInt(badge.textContent, 10) - (r.status === "confirmed" ? r.places : 0) : NaN;
        if (!isNaN(left)) {
          badge.textContent = left > 0 ? left + " place" + (left !== 1 ? "s" : "") + " left" : "Full · waiting list";
        }
        form.querySelectorAll("input, button").forEach(function (el) { el.disabled = true; });
        return;
      }
      if (json.reason === "slot_full") {
        show("warn", "This slot is full — join the waiting list? " +
          '<button type="button" class="button" id="join-waitlist">Join the waiting list</button>');
        document.getElementById("join-waitlist").addEventListener("click", function () { send(true); });
      } else {
        show("bad", esc(json.message || "Something went wrong; please try again."));
      }
    }).catch(function () {
      show("bad", "The network is down; please try again.");
    }).then(function () { button.disabled = result.querySelector(".alert.good") !== null; });
  };
  form.addEventListener("submit", function (submit) { submit.preventDefault(); send(false); });
})();
