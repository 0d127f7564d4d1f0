#!/bin/sh
# Copies the pinned front-end libraries from node_modules into the Python package, where they
# are committed: the dashboard then works offline, with no npm and no CDN at run time.
#   cd frontend && npm ci && npm run build
set -eu
cd "$(dirname "$0")"
OUT=../src/livecall/server/static/vendor
[ -d node_modules/chart.js ] || { echo "run 'npm ci' in frontend/ first" >&2; exit 1; }
mkdir -p "$OUT"
# without its sourceMappingURL line: the .map is not shipped, so browsers would ask for a 404
sed '/^\/\/# sourceMappingURL=/d' node_modules/chart.js/dist/chart.umd.min.js > "$OUT/chart.umd.min.js"
cp node_modules/chart.js/LICENSE.md "$OUT/chart.js.LICENSE.md"
node -e '
  const v = (p) => require("./node_modules/" + p + "/package.json").version;
  console.log("chart.js " + v("chart.js") + " (dist/chart.umd.min.js, MIT)");
' > "$OUT/VERSIONS.txt"
echo "vendored into $OUT:" >&2
cat "$OUT/VERSIONS.txt" >&2
