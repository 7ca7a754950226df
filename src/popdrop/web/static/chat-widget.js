/* popdrop chat widget. Embed with one tag:
 *   <script src="https://HOST/static/chat-widget.js" data-org="demo" data-ref="qr"></script>
 * Optional data-target="#some-div" renders inline there instead of a floating launcher.
 * Talks JSON over a WebSocket to /ws/chat/{org}; the signed visitor token and the
 * transcript live in localStorage so a reload resumes the conversation.
 * Vanilla JS, no build step. */
(function () {
  "use strict";
  var script = document.currentScript;
  if (!script) { return; }
  var org = script.getAttribute("data-org") || "";
  var ref = script.getAttribute("data-ref") || "";
  var targetSel = script.getAttribute("data-target");
  var title = script.getAttribute("data-title") || "Chat with us";
  var origin = new URL(script.src, location.href).origin;
  var wsOrigin = origin.replace(/^http/, "ws");
  var KEY = "popdrop-chat:" + org;
  var MAX_LOG = 80;
  var uid = 0;

  function store(name, value) {
    try {
      if (value === null) { localStorage.removeItem(KEY + ":" + name); }
      else { localStorage.setItem(KEY + ":" + name, JSON.stringify(value)); }
    } catch (e) { /* private mode: no resume */ }
  }
  function load(name) {
    try { return JSON.parse(localStorage.getItem(KEY + ":" + name) || "null"); }
    catch (e) { return null; }
  }

  function el(tag, attrs, children) {
    var node = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (k) {
      if (k === "text") { node.textContent = attrs[k]; }
      else if (k === "class") { node.className = attrs[k]; }
      else { node.setAttribute(k, attrs[k]); }
    });
    (children || []).forEach(function (c) { if (c) { node.appendChild(c); } });
    return node;
  }

  var CSS = [
    ".pd-chat{--pd-accent:#e4572e;font:15px/1.4 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;color:#111;background:#fff;display:flex;flex-direction:column;border:1px solid #ddd;border-radius:12px;overflow:hidden;box-sizing:border-box}",
    ".pd-chat *{box-sizing:border-box}",
    ".pd-inline{width:100%;max-width:560px;height:min(80vh,720px);margin:0 auto}",
    ".pd-float{position:fixed;right:16px;bottom:80px;width:380px;height:min(70vh,640px);z-index:2147483000;box-shadow:0 8px 32px rgba(0,0,0,.2)}",
    ".pd-float[hidden]{display:none}",
    ".pd-launch{position:fixed;right:16px;bottom:16px;z-index:2147483000;background:var(--pd-accent,#e4572e);color:#fff;border:0;border-radius:24px;padding:12px 18px;font:600 15px system-ui,sans-serif;cursor:pointer}",
    "@media (max-width:480px){.pd-float{right:0;left:0;bottom:0;top:0;width:100%;height:100%;border-radius:0}.pd-inline{height:calc(100vh - 90px);border-radius:0}}",
    ".pd-head{display:flex;align-items:center;justify-content:space-between;padding:10px 14px;background:#111;color:#fff;font-weight:600}",
    ".pd-head button{background:none;border:0;color:#fff;font-size:20px;cursor:pointer}",
    ".pd-log{flex:1;overflow-y:auto;padding:12px;display:flex;flex-direction:column;gap:8px;background:#f6f6f4}",
    ".pd-msg{max-width:88%;align-self:flex-start;background:#fff;border-radius:12px;padding:8px 12px;white-space:pre-wrap;word-wrap:break-word;box-shadow:0 1px 1px rgba(0,0,0,.06)}",
    ".pd-me{align-self:flex-end;background:#111;color:#fff}",
    ".pd-note{align-self:center;font-size:13px;color:#666;background:none;box-shadow:none}",
    ".pd-replies{display:flex;flex-wrap:wrap;gap:6px;margin-top:6px}",
    ".pd-replies button,.pd-replies a{border:1px solid var(--pd-accent,#e4572e);background:#fff;color:var(--pd-accent,#e4572e);border-radius:16px;padding:6px 12px;font:inherit;cursor:pointer;text-decoration:none;min-height:36px}",
    ".pd-replies button:disabled{opacity:.45;cursor:default}",
    ".pd-chat button:focus-visible,.pd-chat a:focus-visible,.pd-chat input:focus-visible,.pd-carousel:focus-visible{outline:3px solid #1a73e8;outline-offset:2px}",
    ".pd-carousel{display:flex;gap:10px;overflow-x:auto;scroll-snap-type:x mandatory;padding:4px 2px 8px;max-width:100%;align-self:stretch}",
    ".pd-card{flex:0 0 220px;scroll-snap-align:start;background:#fff;border-radius:12px;overflow:hidden;box-shadow:0 1px 3px rgba(0,0,0,.12);display:flex;flex-direction:column;white-space:normal}",
    ".pd-msg.pd-card{max-width:260px;padding:0}",
    ".pd-card img{width:100%;height:140px;object-fit:cover;background:#eee}",
    ".pd-card-body{padding:8px 10px;display:flex;flex-direction:column;gap:4px}",
    ".pd-card h3{font-size:15px;margin:0}",
    ".pd-price{font-weight:700}",
    ".pd-left{font-size:13px;color:#555}",
    ".pd-sold{color:#b42318;font-weight:600}",
    ".pd-card ul{margin:0;padding-left:18px;font-size:13px}",
    ".pd-count{font-variant-numeric:tabular-nums;font-weight:700;font-size:18px;display:block}",
    ".pd-img{max-width:100%;border-radius:8px;display:block}",
    ".pd-qr img{width:200px;height:200px;display:block;margin:6px 0;background:#fff;image-rendering:pixelated}",
    ".pd-form{display:flex;gap:6px;padding:8px;border-top:1px solid #ddd;background:#fff}",
    ".pd-form input{flex:1;min-width:0;font:inherit;padding:10px;border:1px solid #bbb;border-radius:8px}",
    ".pd-form button{font:inherit;font-weight:600;padding:10px 14px;border:0;border-radius:8px;background:var(--pd-accent,#e4572e);color:#fff;cursor:pointer}",
    ".pd-sr{position:absolute;width:1px;height:1px;overflow:hidden;clip:rect(0 0 0 0);white-space:nowrap}",
  ].join("\n");

  function injectCss() {
    if (document.getElementById("pd-chat-css")) { return; }
    var style = el("style", { id: "pd-chat-css" });
    style.textContent = CSS;
    document.head.appendChild(style);
  }

  // ------------------------------------------------------------ layout

  var root, log, form, input, panel, launcher, ws, lastViaButton = false;
  var history = load("log") || [];
  var token = load("visitor");
  var retries = 0, closedByUs = false, queue = [];

  function build() {
    injectCss();
    uid += 1;
    var inputId = "pd-input-" + uid;
    log = el("div", { class: "pd-log", role: "log", "aria-live": "polite", "aria-label": "Conversation" });
    input = el("input", { id: inputId, type: "text", autocomplete: "off", maxlength: "500", placeholder: "Type a message…" });
    form = el("form", { class: "pd-form" }, [
      el("label", { for: inputId, class: "pd-sr", text: "Message" }),
      input,
      el("button", { type: "submit", text: "Send" }),
    ]);
    form.addEventListener("submit", function (ev) {
      ev.preventDefault();
      var text = input.value.trim();
      if (!text) { return; }
      input.value = "";
      lastViaButton = false;
      mine(text);
      send({ type: "text", text: text });
    });
    var target = targetSel ? document.querySelector(targetSel) : null;
    if (target) {
      root = el("section", { class: "pd-chat pd-inline", "aria-label": title }, [log, form]);
      target.appendChild(root);
    } else {
      var close = el("button", { type: "button", "aria-label": "Close chat", text: "×" });
      root = el("section", { class: "pd-chat pd-float", "aria-label": title, hidden: "" }, [
        el("div", { class: "pd-head" }, [el("span", { text: title }), close]),
        log,
        form,
      ]);
      launcher = el("button", { type: "button", class: "pd-launch", "aria-expanded": "false", text: title });
      launcher.addEventListener("click", function () { toggle(root.hasAttribute("hidden")); });
      close.addEventListener("click", function () { toggle(false); });
      root.addEventListener("keydown", function (ev) { if (ev.key === "Escape") { toggle(false); } });
      document.body.appendChild(root);
      document.body.appendChild(launcher);
    }
    panel = root;
  }

  function toggle(open) {
    if (open) {
      panel.removeAttribute("hidden");
      launcher.setAttribute("aria-expanded", "true");
      input.focus();
    } else {
      panel.setAttribute("hidden", "");
      launcher.setAttribute("aria-expanded", "false");
      launcher.focus();
    }
  }

  function scrollDown() { log.scrollTop = log.scrollHeight; }

  function remember(entry) {
    history.push(entry);
    if (history.length > MAX_LOG) { history = history.slice(history.length - MAX_LOG); }
    store("log", history);
  }

  function mine(text, silent) {
    log.appendChild(el("div", { class: "pd-msg pd-me", text: text }));
    if (!silent) { remember({ who: "me", text: text }); }
    scrollDown();
  }

  function note(text) {
    log.appendChild(el("div", { class: "pd-msg pd-note", role: "status", text: text }));
    scrollDown();
  }

  // ------------------------------------------------------------ messages

  function safeUrl(url) {
    try {
      var u = new URL(url, origin);
      return u.protocol === "https:" || u.protocol === "http:" ? u.href : null;
    } catch (e) { return null; }
  }

  function replyButtons(buttons) {
    var box = el("div", { class: "pd-replies" });
    (buttons || []).forEach(function (b) {
      if (b.payload) {
        var btn = el("button", { type: "button", class: "pd-reply", "data-payload": b.payload, text: b.label });
        btn.addEventListener("click", function () {
          if (btn.disabled) { return; }
          lastViaButton = true;
          mine(b.label);
          send({ type: "button", payload: b.payload });
          disableReplies();
        });
        box.appendChild(btn);
      } else if (b.url && safeUrl(b.url)) {
        box.appendChild(el("a", { href: safeUrl(b.url), target: "_blank", rel: "noopener", text: b.label }));
      }
    });
    return box.childNodes.length ? box : null;
  }

  function disableReplies() {
    Array.prototype.forEach.call(log.querySelectorAll("button.pd-reply"), function (b) { b.disabled = true; });
  }

  function card(c, standalone) {
    var body = el("div", { class: "pd-card-body" }, [el("h3", { text: c.title })]);
    if (c.price) { body.appendChild(el("span", { class: "pd-price", text: c.price })); }
    if (c.available !== null && c.available !== undefined) {
      body.appendChild(c.available <= 0
        ? el("span", { class: "pd-left pd-sold", text: "Sold out" })
        : el("span", { class: "pd-left", text: c.available + " left" }));
    }
    var lines = (c.text || "").split(/\n/).map(function (s) { return s.replace(/^[-•*]\s*/, "").trim(); })
      .filter(Boolean);
    if (lines.length > 1) {
      body.appendChild(el("ul", {}, lines.map(function (l) { return el("li", { text: l }); })));
    } else if (lines.length === 1) {
      body.appendChild(el("p", { text: lines[0], style: "margin:0;font-size:13px" }));
    }
    if (c.url && safeUrl(c.url)) {
      body.appendChild(el("a", { href: safeUrl(c.url), target: "_blank", rel: "noopener", text: "Details" }));
    }
    var actions = replyButtons(c.buttons);
    if (actions) { body.appendChild(actions); }
    var img = c.image_url && safeUrl(c.image_url)
      ? el("img", { src: safeUrl(c.image_url), alt: c.title, loading: "lazy" }) : null;
    return el("article", { class: standalone ? "pd-msg pd-card" : "pd-card" }, [img, body]);
  }

  function pad(n) { return n < 10 ? "0" + n : String(n); }
  function left(to) {
    var s = Math.max(0, Math.floor((to - Date.now()) / 1000));
    if (s <= 0) { return "now"; }
    var d = Math.floor(s / 86400), h = Math.floor(s % 86400 / 3600), m = Math.floor(s % 3600 / 60);
    return (d ? d + "d " : "") + pad(h) + ":" + pad(m) + ":" + pad(s % 60);
  }
  var ticking = [];
  function tick() {
    ticking = ticking.filter(function (t) { return document.body.contains(t.node); });
    ticking.forEach(function (t) { t.node.textContent = left(t.to); });
  }
  setInterval(tick, 1000);

  function countdown(m) {
    var to = Date.parse(m.to);
    var value = el("time", { class: "pd-count", datetime: m.to, "aria-live": "off" });
    value.textContent = left(to);
    var when = "";
    try {
      when = new Date(to).toLocaleString(undefined, { weekday: "short", day: "numeric", month: "short",
        hour: "2-digit", minute: "2-digit", timeZone: m.tz || undefined });
    } catch (e) { when = new Date(to).toLocaleString(); }
    ticking.push({ node: value, to: to });
    return el("div", { class: "pd-msg pd-countdown" }, [
      m.text ? el("span", { text: m.text }) : null,
      value,
      el("span", { class: "pd-left", text: when }),
    ]);
  }

  function render(m) {
    switch (m.kind) {
      case "text":
        return el("div", { class: "pd-msg", text: m.text });
      case "buttons":
        return el("div", { class: "pd-msg" }, [m.text ? el("span", { text: m.text }) : null, replyButtons(m.buttons)]);
      case "card":
        return card(m, true);
      case "carousel":
        var wrap = el("div", { class: "pd-msg", style: "max-width:100%;align-self:stretch;background:none;box-shadow:none;padding:0" });
        if (m.text) { wrap.appendChild(el("div", { class: "pd-msg", text: m.text, style: "margin-bottom:6px" })); }
        wrap.appendChild(el("div", { class: "pd-carousel", role: "group", tabindex: "0",
          "aria-label": (m.text || "Products") + " (scroll sideways)" }, (m.cards || []).map(function (c) { return card(c, false); })));
        return wrap;
      case "countdown":
        return countdown(m);
      case "image":
        return safeUrl(m.url) ? el("div", { class: "pd-msg" }, [el("img", { class: "pd-img", src: safeUrl(m.url), alt: m.alt || "" })]) : null;
      case "qr_ticket":
        var qr = origin + "/chat/qr/" + encodeURIComponent(m.secret) + ".svg";
        return el("div", { class: "pd-msg pd-qr", "data-ticket": m.secret }, [
          m.text ? el("span", { text: m.text }) : null,
          el("img", { src: qr, alt: "QR code of your ticket", width: "200", height: "200" }),
          safeUrl(m.url) ? el("a", { href: safeUrl(m.url), target: "_blank", rel: "noopener", text: "Open your ticket" }) : null,
        ]);
      default:
        return m.text ? el("div", { class: "pd-msg", text: m.text }) : null;
    }
  }

  function showBatch(messages, silent) {
    disableReplies();
    var first = null;
    messages.forEach(function (m) {
      var node = render(m);
      if (node) { log.appendChild(node); }
    });
    if (!silent) {
      remember({ who: "bot", messages: messages });
      var replies = log.querySelectorAll("button.pd-reply:not(:disabled)");
      first = replies.length ? replies[0] : null;
      if (lastViaButton && first) { first.focus({ preventScroll: true }); }
      else if (document.activeElement === document.body || (lastViaButton && !first)) { input.focus({ preventScroll: true }); }
    }
    scrollDown();
  }

  function restore() {
    history.forEach(function (entry) {
      if (entry.who === "me") { mine(entry.text, true); }
      else if (entry.who === "bot") { showBatch(entry.messages || [], true); }
    });
  }

  // ------------------------------------------------------------ socket

  function send(frame) {
    if (ws && ws.readyState === 1) { ws.send(JSON.stringify(frame)); }
    else { queue.push(frame); connect(); }
  }

  function connect() {
    if (ws && (ws.readyState === 0 || ws.readyState === 1)) { return; }
    var url = wsOrigin + "/ws/chat/" + encodeURIComponent(org) + (token ? "?visitor=" + encodeURIComponent(token) : "");
    ws = new WebSocket(url);
    ws.onmessage = function (ev) {
      var data;
      try { data = JSON.parse(ev.data); } catch (e) { return; }
      if (data.type === "ready") {
        retries = 0;
        token = data.visitor;
        store("visitor", token);
        root.setAttribute("data-state", "ready");
        if (!data.resumed || !history.length) {
          if (!queue.length) { ws.send(JSON.stringify({ type: "start", ref: ref || null })); }
        }
        while (queue.length) { ws.send(JSON.stringify(queue.shift())); }
      } else if (data.type === "messages") {
        showBatch(data.messages || []);
      } else if (data.type === "error") {
        if (data.reason === "visitor_invalid") {
          closedByUs = true;
          token = null; history = [];
          store("visitor", null); store("log", null);
          log.textContent = "";
        } else if (data.reason === "rate_limited") {
          note("Easy there — one message at a time.");
        } else {
          note("Sorry, that did not go through (" + data.reason + ").");
        }
      }
    };
    ws.onclose = function () {
      root.setAttribute("data-state", "closed");
      if (closedByUs) { closedByUs = false; connect(); return; }
      retries += 1;
      var delay = Math.min(30000, 500 * Math.pow(2, Math.min(retries, 6)));
      setTimeout(connect, delay);
    };
  }

  function boot() {
    build();
    restore();
    connect();
  }
  if (document.readyState === "loading") { document.addEventListener("DOMContentLoaded", boot); }
  else { boot(); }
})();
