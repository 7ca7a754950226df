// Starts Swagger UI on /api/docs from the vendored bundle (no CDN, no inline script, so
// the page runs under the ordinary page policy and works offline).
(function () {
  "use strict";
  var root = document.getElementById("swagger-ui");
  window.ui = SwaggerUIBundle({
    url: root.dataset.spec,
    dom_id: "#swagger-ui",
    layout: "BaseLayout",
    deepLinking: true,
    // One section per resource, opened on demand: the API has ~150 operations, and
    // Swagger UI stops rendering past ~135 of them when every section starts open.
    docExpansion: "none",
    showExtensions: true,
    showCommonExtensions: true,
    validatorUrl: null,
    presets: [SwaggerUIBundle.presets.apis, SwaggerUIBundle.SwaggerUIStandalonePreset],
  });
})();
