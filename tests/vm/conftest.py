"""VM tier: build the test-profile image once, boot it per scenario."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "artifacts" / "vm"


@pytest.fixture(scope="session")
def image() -> Path:
    """The Debian image with the `test` profile, built by scripts/build-image.

    MAILSTEAD_IMAGE points at an already built image (used by bench/ and
    when iterating); otherwise the image is (re)built, warm from the caches
    outside the clone.
    """
    if given := os.environ.get("MAILSTEAD_IMAGE"):
        path = Path(given)
        assert path.is_file(), f"MAILSTEAD_IMAGE={given} does not exist"
        return path
    key = subprocess.run([str(ROOT / "scripts" / "publish"), "--make-key"], check=True, capture_output=True,
                         text=True).stdout.strip().splitlines()[-1]
    subprocess.run([str(ROOT / "scripts" / "build-image"), "--profile", "test", "--raw-only", "--update-key", key],
                   check=True)
    path = ROOT / "mkosi.output" / "mailstead.raw"
    assert path.exists(), "scripts/build-image did not produce mkosi.output/mailstead.raw"
    return path.resolve()


@pytest.fixture(scope="session")
def feeds(image: Path) -> Path:
    """The update feeds scripts/test builds before this tier (MAILSTEAD_FEEDS), signed with
    the key the image trusts: v2/ holds a newer version of the image under test that
    differs only in its version, v3/ a newer one still whose stack cannot become healthy."""
    given = os.environ.get("MAILSTEAD_FEEDS")
    assert given, "MAILSTEAD_FEEDS is not set: run the vm tier through scripts/test, which builds the feeds"
    path = Path(given)
    for name in ("v2", "v3"):
        assert (path / name / "SHA256SUMS.gpg").is_file(), f"no signed feed in {path / name}"
    return path


@pytest.fixture(scope="session")
def report():
    """Figures and incidents (retries) from the VM runs, written as JSON."""
    data: dict[str, object] = {}
    yield data
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "report.json").write_text(json.dumps(data, indent=2, sort_keys=True))


# Playwright with Debian's chromium, as in the browser tier (the journey walks the wizard in it).
from tests.browser.conftest import browser_context_args, browser_type_launch_args  # noqa: E402

# The guest runs under TCG, where a page answers in seconds rather than milliseconds (a CI run
# saw the token form's redirect take over playwright's default 5 s while the stack was starting):
# every `expect` in this tier waits up to 60 s unless it names a longer timeout.
from playwright.sync_api import expect  # noqa: E402

expect.set_options(timeout=60_000)

__all__ = ["browser_context_args", "browser_type_launch_args", "feeds", "image", "report"]
