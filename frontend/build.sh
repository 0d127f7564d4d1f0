#!/bin/sh
# Copies the pinned front-end libraries from node_modules into the Python package, where they
# are committed: the dashboard then works offline, with no npm and no CDN at run time.
# axe-core (a devDependency) goes to tests/vendor instead: only the browser tests inject it
# into pages for their accessibility audit; the app never serves it.
#   cd frontend && npm ci && npm run build
set -eu
cd "$(dirname "$0")"
OUT=../src/livecall/server/static/vendor
[ -d node_modules/chart.js ] || { echo "run 'npm ci' in frontend/ first" >&2; exit 1; }
mkdir -p "$OUT"
# without its sourceMappingURL line: the .map is not shipped, so browsers would ask for a 404
sed '/^\/\/# sourceMappingURL=/d' node_modules/chart.js/dist/chart.umd.min.js > "$OUT/chart.umd.min.js"
cp node_modules/chart.js/LICENSE.md "$OUT/chart.js.LICENSE.md"
TESTS=../tests/vendor
[ -d node_modules/axe-core ] || { echo "run 'npm ci' in frontend/ first (axe-core)" >&2; exit 1; }
mkdir -p "$TESTS"
cp node_modules/axe-core/axe.min.js "$TESTS/axe.min.js"
cp node_modules/axe-core/LICENSE "$TESTS/axe-core.LICENSE"
node -e '
  const v = require("./node_modules/axe-core/package.json").version;
  console.log("axe-core " + v + " (axe.min.js, MPL-2.0): for the browser tests accessibility audit");
' > "$TESTS/VERSIONS.txt"
node -e '
  const v = (p) => require("./node_modules/" + p + "/package.json").version;
  console.log("chart.js " + v("chart.js") + " (dist/chart.umd.min.js, MIT)");
' > "$OUT/VERSIONS.txt"
echo "vendored into $OUT:" >&2
cat "$OUT/VERSIONS.txt" >&2
