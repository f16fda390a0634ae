"""plotly.js's basic partial bundle for the job page, fetched once at install.

The job page draws scatter traces only, which plotly.js's official basic bundle (scatter,
bar, pie) holds in 1.2 MB, against the 4.8 MB full bundle the `plotly` package ships. A
browser with nothing cached executes the full bundle in ~0.9 s on a 2-core machine and the
basic one in ~0.2 s: most of a cold job page's time. `make install` runs ``python -m
service.vendor``, which downloads the pinned release from the npm registry, checks it against
the registry's published sha512, and writes the one file into ``<prefix>/share/nestor``;
nothing of it is in this repository, and nothing is downloaded at run time. Where it is
missing, the dashboard serves the full bundle instead (the sweep page always does: its
parallel-coordinates chart is not in the basic bundle).
"""

from __future__ import annotations

import base64
import hashlib
import io
import sys
import tarfile
import urllib.request
from pathlib import Path

VERSION = "4.1.1"
URL = (
    f"https://registry.npmjs.org/plotly.js-basic-dist-min/-/plotly.js-basic-dist-min-{VERSION}.tgz"
)
SHA512 = "1oNF8PeQx2hv/y7tqEVWKD3JGwn/MGEMQ8mL9HUwsaqG9FGy/OU5FHUHvzqbqxN4mnwZGI9abTiE775C4kkjMQ=="
MEMBER = "package/plotly-basic.min.js"
PLOTLY_BASIC = Path(sys.prefix) / "share" / "nestor" / "plotly-basic.min.js"


def fetch(target: Path = PLOTLY_BASIC) -> Path:
    """Download, check and write the bundle (nothing when it is there already)."""
    if target.exists():
        return target
    with urllib.request.urlopen(URL, timeout=60) as response:
        archive = response.read()
    digest = base64.b64encode(hashlib.sha512(archive).digest()).decode()
    if digest != SHA512:
        raise RuntimeError(f"{URL}: sha512 {digest} is not the published {SHA512}")
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
        member = tar.extractfile(MEMBER)
        if member is None:
            raise RuntimeError(f"{URL} holds no {MEMBER}")
        data = member.read()
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".part")
    partial.write_bytes(data)
    partial.replace(target)
    return target


def main() -> int:
    try:
        print(f"plotly.js basic bundle: {fetch()}")
    except (OSError, RuntimeError) as e:
        print(
            f"warning: could not fetch plotly.js's basic bundle ({e}); the job page will "
            "use the full bundle of the plotly package (slower on a cold browser)",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
