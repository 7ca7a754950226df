/* popdrop scanner page (/scan/{event_id}): check-in by camera QR or by the ticket's typed
 * short code (K7QM-4XT2-9, printed under every ticket QR; the server checks it).
 * Loaded as a file so the page runs under `script-src 'self'`. */
(() => {
  const form = document.getElementById("manual");
  if (!form) return;
  // The page writes what the script needs into data attributes: no inline script (CSP).
  const checkUrl = form.dataset.checkUrl;
  const csrf = form.dataset.csrf;
  const result = document.getElementById("result");
  const input = document.getElementById("secret");
  const gate = document.getElementById("gate-input");
  // The home page's Scanner button names the volunteer's gate (?gate=): it wins over the
  // gate this browser remembers from an earlier shift; without it, the remembered one.
  if (new URLSearchParams(location.search).has("gate")) localStorage.setItem("popdrop.gate", gate.value);
  else gate.value = localStorage.getItem("popdrop.gate") || gate.value;
  gate.addEventListener("change", () => localStorage.setItem("popdrop.gate", gate.value.trim() || "main"));

  function nonce() {
    const bytes = new Uint8Array(16);
    crypto.getRandomValues(bytes);
    return Array.from(bytes, b => b.toString(16).padStart(2, "0")).join("");
  }
  function show(kind, big, why, more) {
    result.className = "scan-result " + kind;
    result.dataset.result = kind === "ok" ? "ok" : (why || "error");
    result.replaceChildren();
    for (const [cls, text] of [["big", big], ["why", why], ["more", more]]) {
      if (!text) continue;
      const p = document.createElement("p");
      p.className = cls;
      p.textContent = text;
      result.appendChild(p);
    }
    if (navigator.vibrate) navigator.vibrate(kind === "ok" ? 80 : [60, 60, 60]);
  }
  let busy = false;
  async function check(secret) {
    secret = secret.trim();
    if (!secret || busy) return;
    busy = true;
    result.classList.add("busy");
    try {
      const response = await fetch(checkUrl, {
        method: "POST",
        credentials: "same-origin",
        headers: {"Content-Type": "application/json", "Accept": "application/json", "X-CSRF-Token": csrf},
        body: JSON.stringify({secret, nonce: nonce(), gate: gate.value.trim() || "main"}),
      });
      if (response.redirected || response.status === 401) { location.href = "/login?next=" + location.pathname; return; }
      const body = await response.json();
      if (body.counts) {
        document.getElementById("checked-in").textContent = body.counts.checked_in;
        document.getElementById("expected").textContent = body.counts.expected;
      }
      if (response.ok && body.result === "ok") {
        show("ok", "OK", form.dataset.okLabel || "Checked in", body.holder_ref || (body.ticket_id ? "Ticket #" + body.ticket_id : ""));
      } else {
        show("bad", "STOP", body.reason || "error", body.message || "");
      }
    } catch (err) {
      show("bad", "STOP", "network", "No answer from the server: check the connection and scan again.");
    } finally {
      busy = false;
      result.classList.remove("busy");
    }
  }
  form.addEventListener("submit", event => { event.preventDefault(); check(input.value); input.value = ""; input.focus(); });

  // Camera: the browser's BarcodeDetector where it exists, else jsQR (vendored, loaded on
  // first use) on frames drawn into a canvas. Typing the short code always works.
  const hint = document.getElementById("camera-hint");
  if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
    hint.textContent = "This browser cannot use the camera here: type the code printed under the QR.";
    return;
  }
  const toggle = document.getElementById("camera-toggle");
  const video = document.getElementById("video");
  const box = document.getElementById("camera");
  toggle.hidden = false;
  let stream = null, last = "", lastAt = 0, reader = null;

  function loadJsQR() {
    if (window.jsQR) return Promise.resolve(window.jsQR);
    return new Promise((resolve, reject) => {
      const script = document.createElement("script");
      script.src = toggle.dataset.jsqr;
      script.onload = () => (window.jsQR ? resolve(window.jsQR) : reject(new Error("jsQR")));
      script.onerror = reject;
      document.head.appendChild(script);
    });
  }
  async function makeReader() {
    if ("BarcodeDetector" in window) {
      try {
        const formats = await BarcodeDetector.getSupportedFormats();
        if (formats.includes("qr_code")) {
          const detector = new BarcodeDetector({formats: ["qr_code"]});
          toggle.dataset.reader = "barcode-detector";
          return async () => {
            const found = await detector.detect(video);
            return found.length ? found[0].rawValue : null;
          };
        }
      } catch (err) { /* fall back to jsQR */ }
    }
    const decode = await loadJsQR();
    toggle.dataset.reader = "jsqr";
    const canvas = document.createElement("canvas");
    const context = canvas.getContext("2d", {willReadFrequently: true});
    return async () => {
      const width = video.videoWidth, height = video.videoHeight;
      if (!width || !height) return null;
      const scale = Math.min(1, 800 / Math.max(width, height));
      canvas.width = Math.round(width * scale);
      canvas.height = Math.round(height * scale);
      context.drawImage(video, 0, 0, canvas.width, canvas.height);
      const frame = context.getImageData(0, 0, canvas.width, canvas.height);
      const found = decode(frame.data, frame.width, frame.height, {inversionAttempts: "attemptBoth"});
      return found && found.data ? found.data : null;
    };
  }
  async function loop() {
    if (!stream) return;
    try {
      const text = await reader();
      const now = Date.now();
      if (text && !(text === last && now - lastAt < 3000)) {
        last = text; lastAt = now;
        await check(text);
      }
    } catch (err) { /* a frame that could not be read */ }
    setTimeout(loop, 200);
  }
  toggle.addEventListener("click", async () => {
    if (stream) {
      stream.getTracks().forEach(t => t.stop()); stream = null;
      box.hidden = true; toggle.textContent = "Scan with the camera"; return;
    }
    try {
      reader = reader || await makeReader();
    } catch (err) {
      hint.textContent = "The QR reader did not load: type the code printed under the QR.";
      return;
    }
    try {
      stream = await navigator.mediaDevices.getUserMedia({video: {facingMode: "environment"}});
    } catch (err) {
      hint.textContent = "The camera is not available (" + err.name + "): type the code printed under the QR.";
      return;
    }
    video.srcObject = stream;
    await video.play();
    box.hidden = false; toggle.textContent = "Stop the camera";
    loop();
  });
})();
