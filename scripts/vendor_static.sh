#!/usr/bin/env bash
# Vendor the front-end libraries the pages use, pinned, from the npm registry.
# No build step: we copy the published dist file and its licence next to each other, and
# commit them, so `make demo` works offline. Re-run after changing a version below.
set -euo pipefail

HTMX_VERSION="2.0.4"
SWAGGER_UI_VERSION="5.35.0"
JSQR_VERSION="1.4.0"
UPLOT_VERSION="1.6.32"

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
vendor="$root/src/popdrop/web/static/vendor"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

fetch() {  # fetch <package> <version>: unpack the registry tarball into $work/<package>
    local package="$1" version="$2"
    mkdir -p "$work/$package"
    (cd "$work/$package" && npm pack --silent "$package@$version" >/dev/null)
    tar -xzf "$work/$package"/*.tgz -C "$work/$package"
}

fetch htmx.org "$HTMX_VERSION"
mkdir -p "$vendor/htmx"
cp "$work/htmx.org/package/dist/htmx.min.js" "$vendor/htmx/htmx.min.js"
cp "$work/htmx.org/package/LICENSE" "$vendor/htmx/LICENSE"
echo "htmx.org@$HTMX_VERSION" > "$vendor/htmx/VERSION"

echo "vendored htmx.org@$HTMX_VERSION into ${vendor#"$root"/}/htmx"

# Swagger UI for /api/docs (served from here, so the docs work offline and under our CSP).
fetch swagger-ui-dist "$SWAGGER_UI_VERSION"
mkdir -p "$vendor/swagger-ui"
for file in swagger-ui-bundle.js swagger-ui.css LICENSE; do
    cp "$work/swagger-ui-dist/package/$file" "$vendor/swagger-ui/$file"
done
echo "swagger-ui-dist@$SWAGGER_UI_VERSION" > "$vendor/swagger-ui/VERSION"
echo "vendored swagger-ui-dist@$SWAGGER_UI_VERSION into ${vendor#"$root"/}/swagger-ui"

# jsQR for the scanner page (/scan/{event}) on browsers without BarcodeDetector.
fetch jsqr "$JSQR_VERSION"
mkdir -p "$vendor/jsqr"
cp "$work/jsqr/package/dist/jsQR.js" "$vendor/jsqr/jsQR.js"
cp "$work/jsqr/package/LICENSE" "$vendor/jsqr/LICENSE"
echo "jsqr@$JSQR_VERSION" > "$vendor/jsqr/VERSION"
echo "vendored jsqr@$JSQR_VERSION into ${vendor#"$root"/}/jsqr"

# uPlot for the war room's live per-minute charts (/war-room/...): one small IIFE, no deps.
fetch uplot "$UPLOT_VERSION"
mkdir -p "$vendor/uplot"
for file in uPlot.iife.min.js uPlot.min.css; do
    cp "$work/uplot/package/dist/$file" "$vendor/uplot/$file"
done
cp "$work/uplot/package/LICENSE" "$vendor/uplot/LICENSE"
echo "uplot@$UPLOT_VERSION" > "$vendor/uplot/VERSION"
echo "vendored uplot@$UPLOT_VERSION into ${vendor#"$root"/}/uplot"
