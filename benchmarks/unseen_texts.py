"""Build the two texts the benchmarks evaluate on besides the builtin corpus.

Quality is judged on text the planner never calibrated on, so every
`--unseen FILE` of the benchmarks should be one of these, rebuilt the same way
on any machine:

* `licenses.txt`: `/usr/share/common-licenses/*` concatenated in name order,
  symlinks followed (`cat /usr/share/common-licenses/*`): legal English.
* `wheels.txt`: the long descriptions of the installed Python packages, the
  body (after the first blank line) of every `*.dist-info/METADATA` of this
  interpreter's site-packages that is over 2,000 characters, in path order,
  joined by a blank line: technical English, Markdown and reStructuredText,
  never used to choose anything in plancc. plancc's own distribution is left
  out: its description is this project's README, which changes every commit.

Both depend on what the machine has installed, so the script prints each
file's size and sha256: compare them before comparing perplexities.

Usage: python benchmarks/unseen_texts.py [OUTDIR]   (default /tmp)
"""

from __future__ import annotations

import argparse
import hashlib
import re
import sys
import sysconfig
from email.parser import HeaderParser
from pathlib import Path

LICENSES = Path("/usr/share/common-licenses")
MIN_BODY = 2000  # characters: shorter descriptions are mostly boilerplate
OWN = "plancc"  # this project's distribution: its description is the README


def licenses_text(root: Path = LICENSES) -> bytes:
    """`cat root/*`: every entry in name order, symlinks followed, directories skipped."""
    return b"".join(p.read_bytes() for p in sorted(root.glob("*")) if p.is_file())


def wheels_text(site_packages: Path) -> str:
    """The long descriptions over MIN_BODY characters of every installed distribution
    but plancc's own."""
    bodies = []
    for meta in sorted(site_packages.glob("*.dist-info/METADATA")):
        text = meta.read_text(encoding="utf-8", errors="replace")
        headers, _sep, body = text.partition("\n\n")
        if _name(headers) != OWN and len(body) > MIN_BODY:
            bodies.append(body)
    return "\n\n".join(bodies)


def _name(headers: str) -> str:
    """The distribution's `Name:` header (METADATA headers are RFC 822), normalized as
    PEP 503 does: lower case, runs of `-_.` as one `-`."""
    name = HeaderParser().parsestr(headers).get("Name", "")
    return re.sub(r"[-_.]+", "-", name.strip()).lower()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("outdir", nargs="?", type=Path, default=Path("/tmp"))
    args = parser.parse_args()
    args.outdir.mkdir(parents=True, exist_ok=True)
    if not LICENSES.is_dir():
        print(f"error: {LICENSES} is missing (a Debian-family system has it)", file=sys.stderr)
        return 1
    purelib = Path(sysconfig.get_paths()["purelib"])
    written = {
        "licenses.txt": licenses_text(),
        "wheels.txt": wheels_text(purelib).encode("utf-8"),
    }
    for name, data in written.items():
        path = args.outdir / name
        path.write_bytes(data)
        digest = hashlib.sha256(data).hexdigest()
        print(f"{path}: {len(data):,} bytes, sha256 {digest}")
    print(f"(wheels.txt from the distributions in {purelib})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
