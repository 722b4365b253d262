"""Client settings (portal/web/clientsetup.py): pure values and the Apple profile."""

from __future__ import annotations

import json
import plistlib
import uuid

import pytest

from portal.web.clientsetup import MOBILECONFIG_TYPE, client_values, mobileconfig, servers, stack_settings
from portal.stack.settings import SettingsError


def settings(**extra: str):
    return stack_settings({"domain": "example.org", "mail_host": "mx.example.org", **extra})


def test_values_follow_the_settings() -> None:
    s = settings(stack_ports=json.dumps({"imaps": 10993, "submissions": 10465, "pop3s": 10995}))
    by_id = {x.id: x for x in servers(s)}
    assert (by_id["imap"].host, by_id["imap"].port, by_id["imap"].security) == ("mx.example.org", 10993, "SSL/TLS")
    assert by_id["pop3"].port == 10995 and by_id["smtp"].port == 10465
    assert by_id["smtp-starttls"].port == 587 and by_id["smtp-starttls"].security == "STARTTLS"
    assert by_id["caldav"].port == by_id["carddav"].port == 443
    assert (by_id["managesieve"].port, by_id["managesieve"].security) == (4190, "STARTTLS")
    assert {x.port for x in servers(settings(stack_ports=json.dumps({"managesieve": 14190})))} >= {14190}
    values = client_values(s)
    assert values["dav_url"] == "https://mx.example.org/dav/"
    assert values["autoconfig_url"] == "https://autoconfig.example.org/mail/config-v1.1.xml"


def test_mail_host_defaults_to_mail_dot_domain() -> None:
    assert stack_settings({"domain": "example.org"}).hostname == "mail.example.org"


@pytest.mark.parametrize("values, field", [({}, "domain"), ({"domain": "example.org", "stack_ports": "{"}, "stack_ports"),
                                           ({"domain": "example.org", "stack_ports": "[1]"}, "stack_ports")])
def test_missing_or_bad_settings_name_the_setting(values: dict, field: str) -> None:
    with pytest.raises(SettingsError) as err:
        stack_settings(values)
    assert err.value.field == field


def test_mobileconfig_parses_with_the_right_hosts_and_ports() -> None:
    s = settings(stack_ports=json.dumps({"imaps": 10993, "submissions": 10465}))
    profile = plistlib.loads(mobileconfig(s, "alice@example.org"))
    assert profile["PayloadType"] == "Configuration" and profile["PayloadVersion"] == 1
    mail, caldav, carddav = profile["PayloadContent"]
    assert mail["PayloadType"] == "com.apple.mail.managed" and mail["EmailAccountType"] == "EmailTypeIMAP"
    assert (mail["IncomingMailServerHostName"], mail["IncomingMailServerPortNumber"]) == ("mx.example.org", 10993)
    assert (mail["OutgoingMailServerHostName"], mail["OutgoingMailServerPortNumber"]) == ("mx.example.org", 10465)
    assert mail["IncomingMailServerUseSSL"] is True and mail["OutgoingMailServerUseSSL"] is True
    assert mail["EmailAddress"] == mail["IncomingMailServerUsername"] == "alice@example.org"
    assert caldav["PayloadType"] == "com.apple.caldav.account"
    assert (caldav["CalDAVHostName"], caldav["CalDAVPort"], caldav["CalDAVUseSSL"]) == ("mx.example.org", 443, True)
    assert caldav["CalDAVPrincipalURL"] == carddav["CardDAVPrincipalURL"] == "https://mx.example.org/dav/"
    assert carddav["PayloadType"] == "com.apple.carddav.account" and carddav["CardDAVUsername"] == "alice@example.org"
    everything = [profile, *profile["PayloadContent"]]
    assert not any(k.endswith("Password") and k != "OutgoingPasswordSameAsIncomingPassword"
                   for p in everything for k in p)
    uuids = [p["PayloadUUID"] for p in everything]
    assert len(set(uuids)) == 4 and all(uuid.UUID(u).version == 5 for u in uuids)
    assert len({p["PayloadIdentifier"] for p in everything}) == 4


def test_payload_uuids_are_stable_per_domain() -> None:
    def uuids(s, address=""):
        profile = plistlib.loads(mobileconfig(s, address))
        return [profile["PayloadUUID"]] + [p["PayloadUUID"] for p in profile["PayloadContent"]]

    assert uuids(settings()) == uuids(settings()) == uuids(settings(), "bob@example.org")
    assert set(uuids(settings())).isdisjoint(uuids(stack_settings({"domain": "example.net"})))


def test_without_an_address_the_device_asks() -> None:
    mail = plistlib.loads(mobileconfig(settings()))["PayloadContent"][0]
    assert "EmailAddress" not in mail and mail["IncomingMailServerUsername"] == ""
    assert MOBILECONFIG_TYPE == "application/x-apple-aspen-config"
