"""Fetch Jane Austen's six novels and split them into training text and a held-out slice.

The novels come from Debian's ``r-cran-janeaustenr`` package (public-domain Project Gutenberg
text, one R character vector per novel, one element per printed line). We read its lazy-load
database (``data/Rdata.rdx`` index + ``data/Rdata.rdb`` zlib blobs) with the pure-Python ``rdata``
package, so neither R nor network access beyond ``apt-get download`` is needed.

Each novel is turned into paragraphs (wrapped lines joined by spaces, Gutenberg ``_italics_``
underscores removed), one paragraph per line. The last ``--heldout-frac`` of every novel's
paragraphs goes to ``heldout.txt`` (never trained on); the rest to ``train.txt``.

    python scripts/prepare_corpus.py --out ~/.cache/tdb/austen
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import os
import subprocess
import tempfile
import zlib
from pathlib import Path

DEBIAN_PACKAGE = "r-cran-janeaustenr"
NOVELS = ("sensesensibility", "prideprejudice", "mansfieldpark", "emma", "northangerabbey", "persuasion")
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tdb" / "austen"


def fetch_package(workdir: Path) -> Path:
    """apt-get download the Debian package into workdir and unpack it; return the R data dir."""
    debs = sorted(workdir.glob(f"{DEBIAN_PACKAGE}_*.deb"))
    if not debs:
        subprocess.run(["apt-get", "download", DEBIAN_PACKAGE], cwd=workdir, check=True)
        debs = sorted(workdir.glob(f"{DEBIAN_PACKAGE}_*.deb"))
    unpacked = workdir / "deb"
    subprocess.run(["dpkg-deb", "-x", str(debs[-1]), str(unpacked)], check=True)
    (data_dir,) = glob.glob(str(unpacked / "usr/lib/R/site-library/janeaustenr/data"))
    return Path(data_dir)


def read_novels(data_dir: Path) -> dict[str, list[str]]:
    """Read every novel (a list of printed lines) from the package's lazy-load database."""
    import warnings

    import rdata

    novels = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rdata: "Unknown file type: assumed RDS"
        index = rdata.read_rds(str(data_dir / "Rdata.rdx"))  # {variables: {name: [offset, length]}}
        blob = (data_dir / "Rdata.rdb").read_bytes()
        for name, (offset, length) in index["variables"].items():
            raw = zlib.decompress(blob[offset + 4 : offset + length])  # 4-byte length, then zlib
            lines = rdata.conversion.convert(rdata.parser.parse_data(raw))
            novels[str(name)] = [str(line) for line in lines]
    return novels


def to_paragraphs(lines: list[str]) -> list[str]:
    """Join wrapped lines into paragraphs; drop Gutenberg italics underscores."""
    paragraphs, current = [], []
    for line in lines + [""]:
        line = line.strip().replace("_", "")
        if line:
            current.append(line)
        elif current:
            paragraphs.append(" ".join(current))
            current = []
    return paragraphs


def prepare(out: Path, heldout_frac: float = 0.04) -> dict[str, str]:
    """Write out/train.txt and out/heldout.txt (skipped if both exist); return their sha256."""
    out.mkdir(parents=True, exist_ok=True)
    train_path, heldout_path = out / "train.txt", out / "heldout.txt"
    if not (train_path.exists() and heldout_path.exists()):
        with tempfile.TemporaryDirectory() as tmp:
            novels = read_novels(fetch_package(Path(tmp)))
        train, heldout = [], []
        for name in NOVELS:
            paragraphs = to_paragraphs(novels[name])
            cut = int(len(paragraphs) * (1 - heldout_frac))
            train += paragraphs[:cut]
            heldout += paragraphs[cut:]
        train_path.write_text("\n".join(train) + "\n", encoding="utf-8")
        heldout_path.write_text("\n".join(heldout) + "\n", encoding="utf-8")
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (train_path, heldout_path)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--heldout-frac", type=float, default=0.04)
    args = parser.parse_args()
    for name, digest in prepare(args.out, args.heldout_frac).items():
        path = args.out / name
        print(f"{path}  {path.stat().st_size} bytes  sha256 {digest}")


if __name__ == "__main__":
    main()
