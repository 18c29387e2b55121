"""The README and docs/: the site builds with no broken link or anchor, the README's own
links resolve, nothing the old long README said lost its heading, and each alert's
runbook_url is absolute, rebased by one script, and lands on a heading of its own."""

from __future__ import annotations

import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gateway.config import load_settings
from tests.ops_support import ALERTS, alert_rules
from tests.test_operations import RUNBOOK_BASE

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
REBASE = ROOT / "deploy" / "prometheus" / "runbook_base.py"

# Every heading of the README before it was split into docs/ (issue 19): each must still
# head a section somewhere, so moving text never drops a part of it.
OLD_README_HEADINGS = [
    "ortto-gateway",
    "Running it",
    "Commands",
    "Configuration",
    "Per-activity settings",
    "The HTTP interface (public listener)",
    "What browsers may send",
    "What Ortto receives",
    "Limits",
    "Client address and CORS",
    "Scaling out",
    "Abuse resistance",
    "Signed identity",
    "Idempotent submissions",
    "Privacy",
    "Delivery: the spool, batches, retries, dead letters",
    "Metrics",
    "Monitoring",
    "Runbook",
    "OrttoGatewayDown",
    "OrttoGatewayDeliveryPaused",
    "OrttoGatewaySpoolBacklog",
    "OrttoGatewaySpoolFull",
    "OrttoGatewaySpoolUnwritable",
    "OrttoGatewayDeadLetters",
    "OrttoGatewayUpstreamErrors",
    "OrttoGatewayBadAnswers",
    "OrttoGatewayLimiterErrors",
    "Deploying",
    "Logs",
    "The sandbox upstream",
    "The demo",
    "Browser shim",
    "Deploying behind nginx",
    "Benchmarks",
    "Soak",
    "Development",
]

_FENCE = re.compile(r"^```.*?^```", re.M | re.S)
_LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


def prose(text: str) -> str:
    """Markdown without its fenced code blocks (a `#` there is a comment, not a heading)."""
    return _FENCE.sub("", text)


def headings(text: str) -> list[str]:
    return [line.lstrip("#").strip() for line in prose(text).splitlines() if line.startswith("#")]


def slug(heading: str) -> str:
    """The anchor GitHub and MkDocs's toc both give a heading of plain words."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return re.sub(r"[ ]+", "-", text)


@pytest.mark.integration  # runs mkdocs
def test_site_builds_strict(tmp_path: Path) -> None:
    """`mkdocs build --strict` fails on any broken link, missing anchor or page left out of
    the nav; it needs no network."""
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "monitoring" / "index.html").is_file()
    page = (tmp_path / "monitoring" / "index.html").read_text(encoding="utf-8")
    for rule in alert_rules(yaml.safe_load(ALERTS.read_text())):
        assert f'id="{rule["alert"].lower()}"' in page, rule["alert"]


def test_readme_links_resolve() -> None:
    """MkDocs does not read the README: its relative links (files and anchors) are checked
    here, as GitHub resolves them."""
    links = _LINK.findall(prose(README.read_text(encoding="utf-8")))
    assert links
    for link in links:
        if re.match(r"[a-z]+:", link):
            assert link.startswith("https://"), link
            continue
        path, _, anchor = link.partition("#")
        target = (ROOT / path).resolve() if path else README
        assert target.is_file(), f"README links to a missing file: {link}"
        if anchor:
            assert target.suffix == ".md", link
            found = {slug(h) for h in headings(target.read_text(encoding="utf-8"))}
            assert anchor in found, f"README links to a missing anchor: {link}"


def test_readme_is_the_front_door() -> None:
    """Two commands first, then what and why, a short example, and a link to every page."""
    text = README.read_text(encoding="utf-8")
    first = _FENCE.search(text)
    assert first is not None and text[: first.start()].strip() == "# ortto-gateway"
    commands = [line.split("#")[0].strip() for line in first.group().splitlines()[1:-1]]
    assert commands == ["make demo", "make test"]
    linked = set(_LINK.findall(text))
    for page in sorted(DOCS.glob("*.md")):
        if page.name != "index.md":
            assert f"docs/{page.name}" in linked, f"README links no {page.name}"
    assert len(text.splitlines()) <= 120, "depth belongs in docs/ (see docs/index.md)"


def test_readme_intro_is_the_site_home() -> None:
    """The what and why are said once, in the same words, on GitHub and on the site."""
    readme = README.read_text(encoding="utf-8")
    intro = readme[readme.index("A small, first-party gateway") : readme.index("\n## ")]
    assert intro.strip() in (DOCS / "index.md").read_text(encoding="utf-8")


def test_readme_config_example_loads(tmp_path: Path) -> None:
    (example,) = re.findall(r"^```toml\n(.*?)^```", README.read_text(encoding="utf-8"), re.M | re.S)
    assert len(example.splitlines()) <= 10
    key = tmp_path / "ortto-key"
    key.write_text("k" * 40 + "\n")
    spool = tmp_path / "spool.sqlite3"
    text = re.sub(r'^api_key_file = "[^"]*"', f'api_key_file = "{key}"', example, flags=re.M)
    text = re.sub(r'^spool_path = "[^"]*"', f'spool_path = "{spool}"', text, flags=re.M)
    config = tmp_path / "gateway.toml"
    config.write_text(text)
    settings = load_settings({}, str(config))
    assert settings.region == "eu"
    assert list(settings.activities) == ["act:cm:logged-in"]


def test_no_old_heading_is_lost() -> None:
    found = [h.lower() for page in [README, *DOCS.glob("*.md")] for h in headings(page.read_text())]
    for old in OLD_README_HEADINGS:
        assert any(old.lower() in h for h in found), f"no page has the section {old!r}"


@pytest.mark.integration  # runs the rebasing script
def test_runbook_urls_are_absolute_and_rebased_by_the_script() -> None:
    assert runpy.run_path(str(REBASE))["DEFAULT_BASE"] == RUNBOOK_BASE
    rules = alert_rules(yaml.safe_load(ALERTS.read_text()))
    monitoring = {slug(h) for h in headings((DOCS / "monitoring.md").read_text())}
    for rule in rules:
        url = rule["annotations"]["runbook_url"]
        assert url == f"{RUNBOOK_BASE}#{rule['alert'].lower()}"
        assert url.split("#")[1] in monitoring, rule["alert"]
    assert url.startswith("https://github.com/") and url.split("#")[0].endswith("/monitoring.md")

    base = "https://wiki.example.com/ortto-gateway/monitoring/"
    done = subprocess.run(
        [sys.executable, str(REBASE), base], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    rebased = alert_rules(yaml.safe_load(done.stdout))
    assert [r["annotations"]["runbook_url"] for r in rebased] == [
        f"{base.rstrip('/')}#{r['alert'].lower()}" for r in rules
    ]
    # Only the runbook links change.
    assert done.stdout.replace(base.rstrip("/"), RUNBOOK_BASE) == ALERTS.read_text()

    for bad in ("docs/monitoring.md", "https://x.example/a#b", 'https://x.example/"'):
        done = subprocess.run(
            [sys.executable, str(REBASE), bad], capture_output=True, text=True, check=False
        )
        assert done.returncode == 2 and "RUNBOOK_BASE" in done.stderr, bad
