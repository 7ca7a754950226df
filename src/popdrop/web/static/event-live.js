/* popdrop event detail page (operators): live stock counts from the availability stream.
 * Loaded as a file so the page runs under `script-src 'self'`; the stream URL is its
 * script tag's data-stream attribute. */
(function () {
  "use strict";
  var stream = document.currentScript && document.currentScript.dataset.stream;
  if (!window.EventSource || !stream) { return; }
  var source = new EventSource(stream);
  source.addEventListener("availability", function (message) {
    JSON.parse(message.data).forEach(function (row) {
      var el = document.querySelector(
        '.stock-count[data-variant="' + row.variant_id + '"][data-lane="' + row.lane_id + '"]');
      if (el) { el.dataset.available = row.available; el.textContent = row.available; }
    });
  });
})();
