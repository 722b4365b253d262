"""systemd-sysupdate's transfer definitions for a feed, built as data.

Two transfers install a version: its system slot (the inactive root partition,
labelled mailstead_<version>) and its kernel (a unified kernel image on the
ESP, with a boot counter in its name, so systemd-boot tries it a limited number
of times and then falls back). The feed address is the owner's setting, so the
files are written at run time (by the update service, into a folder only root
writes) from a checked URL, never pasted together from text.
"""

from __future__ import annotations

import io
from configparser import ConfigParser

from portal.update.feed import KERNEL_SUFFIX, SLOT_SUFFIXES, check_url

# Boots a new version gets before systemd-boot gives up on it: one, so that a
# version that fails is undone on the next boot, not after several slow ones.
TRIES = 1
# Versions kept: the running one and one other (two slots).
INSTANCES = 2


def _ini(sections: dict[str, dict[str, str]]) -> str:
    parser = ConfigParser(interpolation=None, delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    for name, values in sections.items():
        for key, value in values.items():
            if any(c in value for c in "\r\n\x00"):
                raise ValueError(f"{name}.{key}: a value may not hold a line break")
        parser[name] = values
    out = io.StringIO()
    parser.write(out, space_around_delimiters=False)
    return out.getvalue()


def transfers(url: str, tries: int = TRIES) -> dict[str, str]:
    """{file name: text} for sysupdate's --definitions folder."""
    url = check_url(url)
    if not 1 <= tries <= 5:
        raise ValueError("tries must be 1 to 5")
    common = {"ProtectVersion": "%A", "Verify": "yes"}
    root = _ini({
        "Transfer": common,
        "Source": {"Type": "url-file", "Path": url, "MatchPattern": " ".join(f"mailstead_@v{s}" for s in SLOT_SUFFIXES)},
        "Target": {"Type": "partition", "Path": "auto", "MatchPattern": "mailstead_@v",
                   "MatchPartitionType": "root", "InstancesMax": str(INSTANCES)},
    })
    kernel = _ini({
        "Transfer": common,
        "Source": {"Type": "url-file", "Path": url, "MatchPattern": f"mailstead_@v{KERNEL_SUFFIX}"},
        "Target": {"Type": "regular-file", "Path": "/EFI/Linux", "PathRelativeTo": "boot",
                   "MatchPattern": "mailstead_@v+@l-@d.efi mailstead_@v+@l.efi mailstead_@v.efi",
                   "Mode": "0444", "TriesLeft": str(tries), "TriesDone": "0",
                   "InstancesMax": str(INSTANCES)},
    })
    return {"10-mailstead-root.transfer": root, "20-mailstead-kernel.transfer": kernel}
