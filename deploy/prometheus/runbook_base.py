"""Print the alert rules with each `runbook_url` under another base URL.

    python3 deploy/prometheus/runbook_base.py BASE [RULES] > /etc/prometheus/ortto-gateway.yml
    RUNBOOK_BASE=BASE python3 deploy/prometheus/runbook_base.py > /etc/prometheus/ortto-gateway.yml

The rules file keeps `DEFAULT_BASE` (docs/monitoring.md on GitHub); the anchors after `#`
(one per alert, its name in lower case) stay, so BASE must serve the same page: the
built docs site (`make docs`, `.../monitoring/`), a fork, a pinned tag, a wiki copy.
Standard library only, so it runs wherever Prometheus is configured.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from urllib.parse import urlsplit

DEFAULT_BASE = "https://github.com/ortto-gateway/ortto-gateway/blob/main/docs/monitoring.md"
RULES = Path(__file__).with_name("alerts.yml")
# Only the annotation's own line: one per alert, quoted, the default base then an anchor.
_URL = re.compile(r'^(\s*runbook_url: ")' + re.escape(DEFAULT_BASE) + r'(#[a-z0-9-]+")$', re.M)


def rebase(rules: str, base: str) -> str:
    """The rules text with every runbook_url under `base` instead of the default."""
    parts = urlsplit(base)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"RUNBOOK_BASE must be an absolute http(s) URL, got {base!r}")
    if any(c in base for c in '#"\\') or any(c.isspace() for c in base):
        raise ValueError(f"RUNBOOK_BASE must have no fragment, quote or space, got {base!r}")
    alerts = len(re.findall(r"^\s*- alert: ", rules, re.M))
    text, found = _URL.subn(lambda m: m[1] + base.rstrip("/") + m[2], rules)
    if not alerts or found != alerts:
        raise ValueError(f"{found} runbook_url lines under the default base for {alerts} alerts")
    return text


def main(argv: list[str]) -> int:
    base = argv[0] if argv else os.environ.get("RUNBOOK_BASE", DEFAULT_BASE)
    rules = Path(argv[1]) if len(argv) > 1 else RULES
    try:
        sys.stdout.write(rebase(rules.read_text(encoding="utf-8"), base))
    except (OSError, ValueError) as exc:
        print(f"runbook_base: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
