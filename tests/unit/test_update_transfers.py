"""sysupdate's transfer files for a feed (portal/update/transfers.py)."""

from __future__ import annotations

from configparser import ConfigParser

import pytest

from portal.update import feed, transfers


def parse(text: str) -> ConfigParser:
    p = ConfigParser(interpolation=None)
    p.optionxform = str  # type: ignore[assignment,method-assign]
    p.read_string(text)
    return p


def test_the_slot_and_the_kernel_come_from_the_feed_and_keep_the_running_version() -> None:
    files = transfers.transfers("https://updates.example.org/mailstead")
    assert sorted(files) == ["10-mailstead-root.transfer", "20-mailstead-kernel.transfer"]
    root, kernel = parse(files["10-mailstead-root.transfer"]), parse(files["20-mailstead-kernel.transfer"])
    for t in (root, kernel):
        assert t["Transfer"]["ProtectVersion"] == "%A" and t["Transfer"]["Verify"] == "yes"
        assert t["Source"]["Type"] == "url-file"
        assert t["Source"]["Path"] == "https://updates.example.org/mailstead/"
        assert t["Target"]["InstancesMax"] == "2"
    assert root["Source"]["MatchPattern"] == "mailstead_@v.root-x86-64.raw.xz mailstead_@v.root-x86-64.raw.gz"
    assert dict(root["Target"]) == {"Type": "partition", "Path": "auto", "MatchPattern": "mailstead_@v",
                                    "MatchPartitionType": "root", "InstancesMax": "2"}
    assert kernel["Source"]["MatchPattern"] == "mailstead_@v.efi"
    assert kernel["Target"]["PathRelativeTo"] == "boot" and kernel["Target"]["Path"] == "/EFI/Linux"
    assert kernel["Target"]["TriesLeft"] == "1" and kernel["Target"]["TriesDone"] == "0"
    # Names sysupdate gives the kernel as it counts boots, and the factory image's own name.
    assert kernel["Target"]["MatchPattern"].split() == ["mailstead_@v+@l-@d.efi", "mailstead_@v+@l.efi",
                                                       "mailstead_@v.efi"]


@pytest.mark.parametrize("url", ["https://x.example/a\nPath=/etc", "https://x.example/%A/", "file:///srv/feed"])
def test_a_bad_feed_address_never_reaches_a_transfer_file(url) -> None:
    with pytest.raises(feed.FeedError):
        transfers.transfers(url)
