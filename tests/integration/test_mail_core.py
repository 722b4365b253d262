"""The mail core, as deployed: postfix (MX, submission) and dovecot (IMAPS,
POP3S, LMTP, SASL, mail_crypt), driven by real clients over the published
ports on 127.0.0.1, with accounts and mail_crypt keys made the way the agent
makes them (Accounts + DovecotKeys)."""

from __future__ import annotations

import base64
import email
import imaplib
import json
import os
import poplib
import re
import signal
import smtplib
import ssl
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from email.utils import formatdate, make_msgid

import pytest

from portal.stack import deploy as deploy_mod
from portal.stack.accounts import KEY_KDF_SCRYPT, KEY_KDF_SHA256, AccountError, Accounts, KeyKdf, NoKeys
from portal.stack.dovecot_keys import DovecotKeys, MailboxKeysError, key_password
from tests.conftest import retry
from tests.support.managesieve import ManageSieve

from .stackharness import DOMAIN, Stack, redis_learns, start_stack

PASSWORD = "mail-core-correct-horse"
ALICE = f"alice@{DOMAIN}"
BOB = f"bob@{DOMAIN}"
NOKEYS = f"nokeys@{DOMAIN}"   # a mailbox whose keys were never made
SALES = f"sales@{DOMAIN}"     # an alias of alice's
FOREIGN = "someone@foreign.test"
TIMEOUT = 30                  # seconds, for every client connection


@dataclass
class Mail:
    stack: Stack
    accounts: Accounts
    keys: DovecotKeys

    @property
    def ctx(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.stack.settings.cert_path))
        ctx.check_hostname = False  # the certificate names the mail host; we connect to 127.0.0.1
        return ctx

    def port(self, name: str) -> int:
        return self.stack.port(name)

    # -- clients ---------------------------------------------------------------------

    def smtp(self, name: str = "submission", login: str | None = ALICE,
             password: str = PASSWORD) -> smtplib.SMTP:
        """A client on port `name`, TLS up (STARTTLS or implicit), logged in unless login is None."""
        if name == "submissions":
            s: smtplib.SMTP = smtplib.SMTP_SSL("127.0.0.1", self.port(name), local_hostname="client.test",
                                               timeout=TIMEOUT, context=self.ctx)
        else:
            s = smtplib.SMTP("127.0.0.1", self.port(name), local_hostname="client.test", timeout=TIMEOUT)
        try:
            if name != "submissions":
                s.starttls(context=self.ctx)
            if login is not None:
                s.login(login, password)
        except BaseException:
            s.close()
            raise
        return s

    def imap(self, user: str = ALICE, password: str = PASSWORD) -> imaplib.IMAP4_SSL:
        imap = imaplib.IMAP4_SSL("127.0.0.1", self.port("imaps"), ssl_context=self.ctx, timeout=TIMEOUT)
        try:
            imap.login(user, password)
        except BaseException:
            imap.shutdown()
            raise
        return imap

    def subjects(self, user: str = ALICE, password: str = PASSWORD, folder: str = "INBOX") -> list[str]:
        """The subjects in the user's `folder` (decrypted by dovecot with the user's key)."""
        with self.imap(user, password) as imap:
            typ, data = imap.select(folder, readonly=True)
            if typ != "OK" or data[0] == b"0":
                return []  # (not made yet, or empty)
            typ, data = imap.fetch("1:*", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
            assert typ == "OK", data
            return [part[1].decode().split(":", 1)[1].strip() for part in data
                    if isinstance(part, tuple)]

    def fetch_texts(self, user: str, password: str = PASSWORD, folder: str = "INBOX") -> tuple[str, list]:
        """FETCH the text of every message in the user's `folder`, which only the
        user's private key can decrypt (header fields may come from dovecot's
        index cache, which LMTP fills at delivery: it is dropped first)."""
        local, domain = user.split("@")
        self.dovecot("rm", "-rf", f"/var/cache/dovecot-index/{domain}/{local}")
        with self.imap(user, password) as imap:
            imap.select(folder, readonly=True)
            return imap.fetch("1:*", "(BODY.PEEK[TEXT])")

    def bodies(self, user: str, password: str = PASSWORD, folder: str = "INBOX") -> list[str]:
        typ, data = self.fetch_texts(user, password, folder)
        assert typ == "OK", data
        return [part[1].decode().strip() for part in data if isinstance(part, tuple)]

    def wait_for(self, subject: str, user: str = ALICE, password: str = PASSWORD, timeout: float = 30,
                 folders: tuple[str, ...] = ("INBOX",)) -> str:
        """Wait until the message is in one of `folders`; that folder."""
        def arrived() -> str:
            found = [f for f in folders if subject in self.subjects(user, password, f)]
            assert found, f"{subject!r} not in {user}'s {' or '.join(folders)} yet"
            return found[0]
        return retry(arrived, timeout, f"{subject!r} in {user}'s {' or '.join(folders)}")  # type: ignore[return-value]

    def dovecot(self, *cmd: str) -> str:
        return self.stack.exec("dovecot", *cmd)

    def lmtp_deliver(self, sender: str, rcpt: str, raw: str) -> None:
        """Deliver over dovecot's LMTP on the stack network, as postfix does after the milter."""
        c = self.stack.container("dovecot")
        c.reload()
        ip = c.attrs["NetworkSettings"]["Networks"][self.stack.settings.project]["IPAddress"]
        with smtplib.LMTP(ip, 24, timeout=TIMEOUT) as lmtp:
            refused = lmtp.sendmail(sender, [rcpt], raw)
        assert not refused, refused

    def key_opens(self, address: str, key_pw: str) -> bool:
        """Whether the user's private key opens with this key password (doveadm -k,
        which takes it from its environment, as DovecotKeys passes it)."""
        code, _out = self.stack.container("dovecot").exec_run(
            ["/bin/sh", "-c", 'doveadm -k mailbox cryptokey export -U -u "$MS_USER" 2>/dev/null'
                              ' | grep -q "BEGIN PRIVATE KEY"'],
            environment={"MS_USER": address, "MAILSTEAD_KEY_PASSWORD": key_pw})
        return code == 0

    def set_key_kdf(self, address: str, kdf: KeyKdf) -> None:
        """Write a mailbox's KeyKdf columns directly (as an older version left them)."""
        with self.accounts.connect() as conn:
            conn.execute("UPDATE mailboxes SET key_kdf = ?, key_salt = ? WHERE address = ?",
                         (kdf.version, kdf.salt, address))

    def is_user(self, address: str) -> bool:
        """Whether dovecot's userdb knows the address (no login: a failed one is delayed)."""
        code, _out = self.stack.container("dovecot").exec_run(["doveadm", "user", address])
        return code == 0

    def wait_healthy(self, timeout: float = 120) -> None:
        deploy_mod.wait_healthy(self.stack.client, self.stack.settings.project, timeout, lambda _s, _m: None)


def _assert_in(needle: bytes, haystack: bytes) -> None:
    assert needle in haystack


def message(sender: str, rcpt: str, subject: str, body: str, headers: str = "") -> str:
    return (f"{headers}From: {sender}\r\nTo: {rcpt}\r\nDate: {formatdate()}\r\n"
            f"Message-ID: {make_msgid(domain='client.test')}\r\nSubject: {subject}\r\n"
            f"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n{body}\r\n")


def token(name: str) -> str:
    """A marker that cannot occur by chance anywhere on disk."""
    return f"{name}-{uuid.uuid4().hex}"


def submit(mail: Mail, subject: str, body: str, name: str = "submission", rcpt: str = ALICE,
           sender: str = ALICE) -> None:
    with mail.smtp(name) as s:
        s.sendmail(sender, [rcpt], message(sender, rcpt, subject, body))


# Every message the tests deliver: (subject, body), checked for at rest.
DELIVERED: list[tuple[str, str]] = []


@pytest.fixture(scope="module")
def mail(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mail]:
    stack = start_stack(tmp_path_factory.mktemp("mail"), "mstest-mail", 20000)
    try:
        result = stack.deploy()
        print(f"stack healthy after {result.seconds_to_healthy:.1f} s")
        keys = DovecotKeys(stack.client, stack.settings.project)
        accounts = Accounts(stack.settings.accounts_db)
        accounts.create_mailbox(ALICE, PASSWORD, quota_mb=100, keys=keys)
        accounts.create_mailbox(BOB, PASSWORD, keys=keys)
        accounts.create_mailbox(NOKEYS, PASSWORD, keys=NoKeys())
        accounts.add_alias(SALES, ALICE)
        # deploy() made accounts.db before postfix first opened its maps.
        assert b"reload -- version" not in stack.container("postfix").logs()
        yield Mail(stack, accounts, keys)
    finally:
        for service in ("postfix", "dovecot"):
            try:
                print(f"--- {service} log:\n" + stack.container(service).logs(tail=60).decode(errors="replace"))
            except Exception:  # noqa: BLE001 - the stack may be gone already
                pass
        stack.down()


# -- DovecotKeys, without docker --------------------------------------------------------

class RecordingContainer:
    """Stands in for the dovecot container: records every exec."""

    status = "running"

    def __init__(self) -> None:
        self.calls: list[tuple[list[str], dict[str, str]]] = []

    def exec_run(self, cmd: list[str], environment: dict[str, str], user: str, demux: bool) -> tuple:
        self.calls.append((cmd, environment))
        return 0, (b"", b"")


def test_dovecot_keys_passes_secrets_only_through_the_environment() -> None:
    container = RecordingContainer()
    client = type("Client", (), {"containers": type("C", (), {"get": staticmethod(lambda _name: container)})})()
    keys = DovecotKeys(client, "mstest-mail")
    old, new = "old secret password 1", "new secret password 2"
    v1, v2, v2b = KeyKdf(KEY_KDF_SHA256), KeyKdf.new(), KeyKdf.new()
    keys.generate(ALICE, old, v1)
    keys.change_password(ALICE, old, new, v1, v2)
    keys.reset(ALICE, new, v2b)
    keys.rename(ALICE, BOB)
    keys.remove(BOB)
    assert len(container.calls) == 5
    derived = [key_password(pw, kdf) for pw in (old, new) for kdf in (v1, v2, v2b)]
    for cmd, env in container.calls:
        text = " ".join(cmd)
        for secret in (old, new, *derived):
            assert secret not in text
        assert ALICE not in text and BOB not in text  # addresses are data, never shell code
        assert old not in env.values() and new not in env.values()  # only derived key passwords
    assert container.calls[0][1]["MAILSTEAD_KEY_PASSWORD"] == key_password(old, v1)
    assert container.calls[1][1]["MS_OLD"] == key_password(old, v1)
    assert container.calls[1][1]["MS_NEW"] == key_password(new, v2)
    assert container.calls[2][1]["MAILSTEAD_KEY_PASSWORD"] == key_password(new, v2b)
    with pytest.raises(AccountError):
        keys.remove("../../etc@example.test")


# -- ports -------------------------------------------------------------------------------

def test_only_the_tls_ports_are_published_and_no_plaintext_imap_or_pop3_listens(mail: Mail) -> None:
    """4190 (ManageSieve) is STARTTLS with no login before it (see the ManageSieve test);
    postfix's sieve listener (10025) is on the stack network only."""
    published = {svc: sorted(mail.stack.container(svc).ports) for svc in ("postfix", "dovecot")}
    assert published == {"postfix": ["25/tcp", "465/tcp", "587/tcp"],
                         "dovecot": ["4190/tcp", "993/tcp", "995/tcp"]}, published
    listening = set()
    for line in mail.dovecot("sh", "-c", "cat /proc/net/tcp /proc/net/tcp6 2>/dev/null || true").splitlines():
        fields = line.split()
        if len(fields) > 3 and fields[3] == "0A":
            address, port = fields[1].rsplit(":", 1)
            if address != "0B00007F":  # docker's embedded DNS resolver on 127.0.0.11
                listening.add(int(port, 16))
    assert listening == {993, 995, 4190, 24, 12345}, listening


# -- delivery ---------------------------------------------------------------------------

def test_inbound_on_25_lands_in_the_mailbox_even_with_rspamd_down(mail: Mail) -> None:
    """MX delivery with STARTTLS, to a mailbox, an alias and a +tag address; rspamd is stopped
    (milter_default_action = accept) so that its greylisting does not defer a
    sender it has never seen."""
    rspamd = mail.stack.container("rspamd")
    rspamd.kill()
    try:
        subject, body = token("inbound-subject"), token("inbound-body")
        alias_subject, plus_subject = token("alias-subject"), token("plus-subject")
        with smtplib.SMTP("127.0.0.1", mail.port("smtp"), local_hostname="mx.remote.test", timeout=TIMEOUT) as s:
            s.ehlo()
            assert s.has_extn("starttls")
            assert not s.has_extn("auth"), "port 25 must not offer AUTH"
            s.starttls(context=mail.ctx)
            s.ehlo()
            assert not s.has_extn("auth"), "port 25 must not offer AUTH, even over TLS"
            s.sendmail("carol@remote.test", [ALICE], message("carol@remote.test", ALICE, subject, body))
            s.sendmail("carol@remote.test", [SALES], message("carol@remote.test", SALES, alias_subject, body))
            plus = ALICE.replace("@", "+news@")  # sub-addressing: alice+news@ is alice's
            s.sendmail("carol@remote.test", [plus], message("carol@remote.test", plus, plus_subject, body))
        DELIVERED.extend([(subject, body), (alias_subject, body), (plus_subject, body)])
        for each in (subject, alias_subject, plus_subject):
            mail.wait_for(each)
    finally:
        rspamd.start()
        mail.wait_healthy()  # submission waits (4xx) while rspamd is away


@pytest.mark.parametrize("port_name", ["submission", "submissions"])
def test_submission_with_auth_is_delivered_to_a_local_mailbox(mail: Mail, port_name: str) -> None:
    subject, body = token(f"{port_name}-subject"), token(f"{port_name}-body")
    submit(mail, subject, body, port_name)
    DELIVERED.append((subject, body))
    mail.wait_for(subject)


def test_one_message_to_two_mailboxes_reaches_both(mail: Mail) -> None:
    """postfix hands dovecot one recipient per LMTP transaction: for a second
    one, dovecot would copy the first one's stored message, which it cannot
    decrypt (and postfix would have to retry)."""
    subject, body = token("two-rcpt-subject"), token("two-rcpt-body")
    with mail.smtp() as s:
        s.sendmail(ALICE, [ALICE, BOB], message(ALICE, f"{ALICE}, {BOB}", subject, body))
    DELIVERED.append((subject, body))
    mail.wait_for(subject)
    mail.wait_for(subject, BOB, timeout=10)


def test_a_user_may_send_as_an_alias_that_forwards_to_them(mail: Mail) -> None:
    subject, body = token("as-alias-subject"), token("as-alias-body")
    submit(mail, subject, body, sender=SALES, rcpt=BOB)
    mail.wait_for(subject, BOB)


# -- who may send what ----------------------------------------------------------------

def test_spam_goes_to_junk_and_the_rest_to_the_inbox(mail: Mail) -> None:
    """The global sieve script: mail that rspamd flagged (X-Spam: Yes, the header its
    milter sets on "add header") is filed into Junk (made if it is not there yet), flagged
    \\Junk; other mail stays in the INBOX. Both are encrypted like any other."""
    spam, ham = (token("spam-subject"), token("spam-body")), (token("ham-subject"), token("ham-body"))
    mail.lmtp_deliver("carol@remote.test", BOB,
                      message("carol@remote.test", BOB, *spam, headers="X-Spam: Yes\r\nX-Spam-Status: Yes, score=7.5\r\n"))
    mail.lmtp_deliver("carol@remote.test", BOB,
                      message("carol@remote.test", BOB, *ham, headers="X-Spam-Status: No, score=0.4\r\n"))
    DELIVERED.extend([spam, ham])
    mail.wait_for(ham[0], BOB)
    assert spam[0] not in mail.subjects(BOB)
    retry(lambda: _assert_in(spam[0].encode(), " ".join(mail.subjects(BOB, folder="Junk")).encode()), 30,
          "the spam in Junk")
    assert ham[0] not in mail.subjects(BOB, folder="Junk")
    assert mail.bodies(BOB, folder="Junk") == [spam[1]]  # decrypted with bob's key, not from the cache
    with mail.imap(BOB) as imap:
        typ, listed = imap.list()
    assert typ == "OK"
    junk = [line.decode() for line in listed if line.decode().endswith('"Junk"') or line.decode().endswith(" Junk")]
    assert junk and "\\Junk" in junk[0], listed


# -- the users' own filters: ManageSieve on 4190, sieve at delivery, vacation --------

CAROL, DAVE = f"sieve-carol@{DOMAIN}", f"sieve-dave@{DOMAIN}"  # mailboxes of these tests alone


def own_mailbox(mail: Mail, address: str) -> None:
    if not mail.is_user(address):
        mail.accounts.create_mailbox(address, PASSWORD, keys=mail.keys)


def sieve_login(mail: Mail, user: str) -> ManageSieve:
    ms = ManageSieve("127.0.0.1", mail.port("managesieve"), timeout=TIMEOUT)
    ms.starttls(mail.ctx)
    status, text = ms.authenticate(user, PASSWORD)
    assert status == "OK", text
    return ms


def test_managesieve_logs_in_only_after_starttls_and_its_filters_run_at_delivery(mail: Mail) -> None:
    own_mailbox(mail, CAROL)
    with ManageSieve("127.0.0.1", mail.port("managesieve"), timeout=TIMEOUT) as ms:
        assert "STARTTLS" in ms.capabilities, ms.capabilities
        assert ms.capabilities.get("SASL", "") == "", ms.capabilities  # no mechanism offered in the clear
        status, text = ms.authenticate(CAROL, PASSWORD)
        assert status == "NO", text  # nor accepted
        ms.starttls(mail.ctx)
        assert "PLAIN" in ms.capabilities["SASL"].split(), ms.capabilities
        assert {"fileinto", "vacation", "envelope"} <= set(ms.capabilities["SIEVE"].split()), ms.capabilities
        assert ms.authenticate(CAROL, "not carol's password")[0] == "NO"
    with sieve_login(mail, CAROL) as ms:
        status, why = ms.put_script("broken", 'require ["fileinto"];\nfileinto;\n')
        assert status == "NO" and "error" in why.lower(), why  # the compiler's words, line and all
        status, why = ms.put_script("filters", 'require ["fileinto", "mailbox"];\n'
                                               'if header :contains "subject" "[reports]" {\n'
                                               '  fileinto :create "Reports";\n  stop;\n}\n')
        assert status == "OK", why
        assert ms.set_active("filters")[0] == "OK"
        assert ms.scripts() == {"filters": True}
    report, other = f"[reports] weekly {token('report')}", token("not-a-report")
    submit(mail, report, "the numbers", rcpt=CAROL)
    submit(mail, other, "just mail", rcpt=CAROL)
    assert mail.wait_for(report, CAROL, folders=("Reports", "INBOX")) == "Reports"
    assert mail.wait_for(other, CAROL, folders=("Reports", "INBOX")) == "INBOX"
    with sieve_login(mail, BOB) as ms:
        assert ms.scripts() == {}  # one user's scripts are theirs alone


def test_vacation_answers_once_per_sender_signed_and_never_a_list(mail: Mail) -> None:
    """Dave is away. Carol's mail gets one reply, DKIM-signed for the domain (sent through
    postfix's sieve listener, for dovecot's address alone); her second message gets none,
    and mail from a list never gets one."""
    own_mailbox(mail, CAROL)
    own_mailbox(mail, DAVE)
    with sieve_login(mail, DAVE) as ms:
        script = ('require ["vacation"];\n'
                  'vacation :days 3 :subject "Away until Monday" "I read my mail on Monday.";\n')
        assert ms.put_script("away", script)[0] == "OK" and ms.set_active("away")[0] == "OK"

    def send(subject: str, headers: str = "") -> str:
        raw = message(CAROL, DAVE, subject, "for dave", headers=headers)
        with mail.smtp(login=CAROL) as s:
            s.sendmail(CAROL, [DAVE], raw)
        mail.wait_for(subject, DAVE, folders=("INBOX", "Junk"))
        return re.search(r"^Message-ID: (\S+)", raw, re.M).group(1)

    send(token("list-post"), headers="List-Id: <news.lists.example>\r\nPrecedence: list\r\n")
    first = send(token("first"))

    def replies() -> list[email.message.Message]:
        with mail.imap(CAROL) as imap:
            imap.select("INBOX", readonly=True)
            _typ, data = imap.search(None, "SUBJECT", '"Away until Monday"')
            found = []
            for num in data[0].split():
                _typ, msg = imap.fetch(num, "(BODY.PEEK[])")
                found.append(email.message_from_bytes(msg[0][1]))
            return found

    def one_reply() -> email.message.Message:
        got = replies()
        assert len(got) == 1, f"{len(got)} replies"
        return got[0]

    reply = retry(one_reply, 60, "dave's vacation reply in carol's INBOX")
    assert reply["In-Reply-To"] == first, reply.items()  # to the first message, not the list's
    assert reply["From"].endswith(f"<{DAVE}>") or reply["From"] == DAVE, reply["From"]
    assert reply["Auto-Submitted"].startswith("auto-replied"), reply.items()
    signatures = " ".join("".join(v.split()) for v in reply.get_all("DKIM-Signature", []))
    assert f"d={DOMAIN};" in signatures, reply.items()
    assert reply["X-Spam"] is None, reply.items()
    send(token("second"))
    time.sleep(3)  # a second reply would have been sent while the message was delivered
    assert len(replies()) == 1


def test_a_catch_all_takes_only_what_nothing_else_receives(mail: Mail) -> None:
    """@domain → carol: mail for an address that is neither a mailbox nor an alias goes to
    her; mailboxes (with +tags) and aliases keep theirs; she may not send as the addresses
    it catches. Without it, such mail is refused again."""
    own_mailbox(mail, CAROL)
    stray, own, tagged = token("stray"), token("own"), token("tagged")
    mail.accounts.add_alias(f"@{DOMAIN}", CAROL)
    try:
        submit(mail, stray, "to nobody in particular", rcpt=f"whoever-{uuid.uuid4().hex[:8]}@{DOMAIN}")
        submit(mail, own, "to bob himself", rcpt=BOB)
        submit(mail, tagged, "to bob with a tag", rcpt=BOB.replace("@", "+news@"))
        assert mail.wait_for(stray, CAROL) == "INBOX"
        assert mail.wait_for(own, BOB) == "INBOX" and mail.wait_for(tagged, BOB, folders=("INBOX", "Junk"))
        assert own not in mail.subjects(CAROL) and tagged not in mail.subjects(CAROL)
        with mail.smtp(login=CAROL) as s:
            code, text = rcpt_reply(s, f"whoever@{DOMAIN}", ALICE)
            assert code == 553 and b"not owned by user" in text, (code, text)
            assert rcpt_reply(s, CAROL, ALICE)[0] == 250  # the control: her own address
    finally:
        mail.accounts.remove_alias(f"@{DOMAIN}", CAROL)
    with mail.smtp("smtp", None) as s:
        code, text = rcpt_reply(s, "someone@remote.test", f"whoever@{DOMAIN}")
    assert code == 550, (code, text)


# -- Junk that learns: IMAPSieve hands what users move to rspamd's controller ------

ERIN = f"junk-erin@{DOMAIN}"  # a mailbox of this test alone


def bayes_learned(mail: Mail) -> dict[str, int]:
    """What rspamd's Bayes has learned, as its statistics say (`rspamc stat`)."""
    out = mail.stack.exec("rspamd", "rspamc", "-h", "127.0.0.1:11334", "stat")
    counts = {}
    for statfile in ("BAYES_SPAM", "BAYES_HAM"):
        found = re.search(rf"Statfile: {statfile}\b[^\n]*learned: (\d+)", out)
        assert found, out
        counts[statfile] = int(found.group(1))
    return counts


def uids(imap: imaplib.IMAP4_SSL, folder: str, subject: str) -> list[bytes]:
    typ, _ = imap.select(folder)
    assert typ == "OK", folder
    typ, data = imap.uid("SEARCH", None, "SUBJECT", f'"{subject}"')
    assert typ == "OK", data
    return data[0].split()


def test_moving_into_junk_teaches_spam_and_out_of_it_ham(mail: Mail) -> None:
    """Moving or copying a message into Junk has rspamd learn it as spam, moving one
    out of Junk as ham; deleting from Junk (to the Trash), moves between other
    folders and spam filed to Junk at delivery teach nothing. dovecot's IMAPSieve
    scripts pipe the decrypted message to rspamd's controller, which trusts dovecot's
    address alone. Counted by rspamd's own statistics."""
    own_mailbox(mail, ERIN)
    words = ("Dear customer, your parcel could not be delivered because the customs fee is unpaid. "
             "Confirm your card number and the security code within twelve hours on our secure page, "
             "or the parcel goes back to the sender and a penalty is charged to your account.")
    sent = [(token(f"junk-{n}"), f"{words} Reference {token('ref')}.") for n in range(4)]
    # Where rspamd keeps its counts (its statistics read them from there every so often).
    start = {"BAYES_SPAM": redis_learns(mail.stack, "learns_spam"),
             "BAYES_HAM": redis_learns(mail.stack, "learns_ham")}
    for n, (subject, body) in enumerate(sent):
        flagged = "X-Spam: Yes\r\n" if n == 1 else ""  # the global sieve files it into Junk
        mail.lmtp_deliver("parcels@remote.test", ERIN,
                          message("parcels@remote.test", ERIN, subject, body, headers=flagged))
        mail.wait_for(subject, ERIN, folders=("Junk",) if flagged else ("INBOX",))
    DELIVERED.extend(sent)
    first, filed, copied, other = (subject for subject, _ in sent)

    def learned(spam: int, ham: int) -> None:
        now = bayes_learned(mail)
        assert (now["BAYES_SPAM"] - start["BAYES_SPAM"], now["BAYES_HAM"] - start["BAYES_HAM"]) == (spam, ham), \
            (start, now)

    with mail.imap(ERIN) as imap:
        # INBOX to Junk (MOVE): spam. (IMAPSieve runs inside the command.)
        typ, data = imap.uid("MOVE", uids(imap, "INBOX", first)[0], "Junk")
        assert typ == "OK", data
        # Junk to the Trash: deleted, not "not spam".
        typ, data = imap.uid("MOVE", uids(imap, "Junk", first)[0], "Trash")
        assert typ == "OK", data
        # What rspamd filed into Junk at delivery (not learned then), moved back to the INBOX: ham.
        typ, data = imap.uid("MOVE", uids(imap, "Junk", filed)[0], "INBOX")
        assert typ == "OK", data
        # INBOX to Junk by COPY: spam.
        typ, data = imap.uid("COPY", uids(imap, "INBOX", copied)[0], "Junk")
        assert typ == "OK", data
        # Between other folders: nothing.
        typ, data = imap.uid("MOVE", uids(imap, "INBOX", other)[0], "Trash")
        assert typ == "OK", data
    # rspamd's statistics read the counts from redis every so often (some 30 s).
    retry(lambda: learned(2, 1), 120, "rspamd's statistics to count two more spam and one more ham")
    trash, junk = mail.subjects(ERIN, folder="Trash"), mail.subjects(ERIN, folder="Junk")
    assert first in trash and other in trash and junk == [copied], (trash, junk)
    assert filed in mail.subjects(ERIN) and copied in mail.subjects(ERIN)


def test_postfixs_sieve_listener_takes_mail_from_dovecot_alone(mail: Mail) -> None:
    """Port 10025 relays for dovecot's fixed address only: from any other address on the
    stack network (here the host, through the bridge) nothing is accepted, not even for
    a local mailbox."""
    c = mail.stack.container("postfix")
    c.reload()
    ip = c.attrs["NetworkSettings"]["Networks"][mail.stack.settings.project]["IPAddress"]
    assert mail.stack.settings.dovecot_address != ip
    for rcpt in (FOREIGN, ALICE):
        with smtplib.SMTP(ip, 10025, local_hostname="intruder.test", timeout=TIMEOUT) as s:
            with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
                s.sendmail(CAROL, [rcpt], message(CAROL, rcpt, "relay me", "no"))
        code, text = refused.value.recipients[rcpt]
        assert code == 554 and b"Access denied" in text, (code, text)


def test_auth_is_neither_offered_nor_accepted_before_starttls_on_587(mail: Mail) -> None:
    with smtplib.SMTP("127.0.0.1", mail.port("submission"), local_hostname="client.test", timeout=TIMEOUT) as s:
        s.ehlo()
        assert not s.has_extn("auth")
        plain = base64.b64encode(f"\0{ALICE}\0{PASSWORD}".encode()).decode()
        code, reply = s.docmd("AUTH", f"PLAIN {plain}")
        assert code in (503, 530, 538), (code, reply)
        code, reply = s.docmd("MAIL", f"FROM:<{ALICE}>")
        assert code == 530, (code, reply)  # must issue STARTTLS first
        s.starttls(context=mail.ctx)
        s.ehlo()
        assert "PLAIN" in s.esmtp_features.get("auth", "").upper()


def rcpt_reply(s: smtplib.SMTP, sender: str, rcpt: str) -> tuple[int, bytes]:
    s.ehlo_or_helo_if_needed()
    code, reply = s.mail(sender)
    if code == 250:
        code, reply = s.rcpt(rcpt)
    s.rset()
    return code, reply


@pytest.mark.parametrize(("port_name", "login", "sender", "rcpt", "why"), [
    ("smtp", None, "carol@remote.test", FOREIGN, "unauthenticated relay on 25"),
    ("smtp", None, ALICE, FOREIGN, "unauthenticated relay on 25 with a local sender"),
    ("submission", None, "carol@remote.test", FOREIGN, "unauthenticated relay on 587"),
    ("submission", None, "carol@remote.test", ALICE, "unauthenticated submission on 587"),
    ("submission", ALICE, BOB, FOREIGN, "alice sending as bob (a mailbox she does not own)"),
    ("submission", ALICE, "ceo@foreign.test", ALICE, "alice sending as a foreign address"),
    ("submissions", ALICE, BOB, ALICE, "alice sending as bob on 465"),
    ("submissions", BOB, SALES, ALICE, "bob sending as alice's alias"),
])
def test_open_relay_and_forged_senders_are_refused(mail: Mail, port_name: str, login: str | None,
                                                    sender: str, rcpt: str, why: str) -> None:
    with mail.smtp(port_name, login) as s:
        code, reply = rcpt_reply(s, sender, rcpt)
    assert 500 <= code < 600, f"{why}: {code} {reply!r}"


def test_the_owner_passes_the_same_checks(mail: Mail) -> None:
    """The control for the refusals above: the same sessions with an owned sender."""
    with mail.smtp("submission", ALICE) as s:
        assert rcpt_reply(s, ALICE, FOREIGN)[0] == 250
        assert rcpt_reply(s, SALES, ALICE)[0] == 250
    with mail.smtp("smtp", None) as s:
        assert rcpt_reply(s, "carol@remote.test", ALICE)[0] == 250


def data_reply(mail: Mail, port_name: str, login: str, envelope: str, header_from: str | list[str],
               rcpt: str = BOB) -> tuple[int, bytes, str]:
    """(code, reply, subject) of a whole transaction: MAIL FROM `envelope`, one
    RCPT, then DATA with the given From: header(s) (a list: one header each)."""
    subject = token("from-check")
    froms = [header_from] if isinstance(header_from, str) else header_from
    head = "".join(f"From: {f}\r\n" for f in froms)
    text = message(froms[0], rcpt, subject, "who is this from?").replace(f"From: {froms[0]}\r\n", head, 1)
    with mail.smtp(port_name, login) as s:
        s.ehlo_or_helo_if_needed()
        code, reply = s.mail(envelope)
        if code == 250:
            code, reply = s.rcpt(rcpt)
        if code == 250:
            code, reply = s.data(text.encode())
    return code, reply, subject


@pytest.mark.parametrize(("port_name", "login", "envelope", "header_from"), [
    ("submission", ALICE, ALICE, f"Alice <{ALICE}>"),
    ("submissions", ALICE, SALES, f"Sales <{SALES}>"),            # an alias that delivers to alice
    ("submission", ALICE, ALICE, f'"Alice" <{ALICE.upper()}>'),  # addresses compare without case
])
def test_the_from_header_may_be_the_logins_sender_address(mail: Mail, port_name: str, login: str,
                                                          envelope: str, header_from: str) -> None:
    """The controls for the refusals below: the same transactions with an owned From:."""
    code, reply, subject = data_reply(mail, port_name, login, envelope, header_from)
    assert code == 250, reply
    mail.wait_for(subject, BOB)


@pytest.mark.parametrize(("port_name", "envelope", "header_from", "shown", "why"), [
    ("submission", ALICE, f"Bob <{BOB}>", BOB, "another mailbox's address in From:"),
    ("submissions", ALICE, BOB, BOB, "another mailbox's address in From: on 465"),
    ("submission", ALICE, "The CEO <ceo@foreign.test>", "ceo@foreign.test", "a foreign domain in From:"),
    ("submissions", SALES, BOB, BOB, "the envelope an alias of alice's, From: another mailbox"),
    # The header follows the envelope: an alias in From: needs the alias as MAIL FROM
    # too (as mail clients send it), so this one is refused although alice owns both.
    ("submission", ALICE, SALES, SALES, "From: an alias of alice's, MAIL FROM her own address"),
])
def test_a_from_header_that_is_not_the_sender_is_refused(mail: Mail, port_name: str, envelope: str,
                                                         header_from: str, shown: str, why: str) -> None:
    code, reply, subject = data_reply(mail, port_name, ALICE, envelope, header_from)
    text = reply.decode(errors="replace")
    assert code == 554 and text.startswith("5.7.1 "), f"{why}: {code} {text}"
    assert f"From: header address {shown} is not the sender address {envelope}" in text, text
    assert ALICE in text, text  # the login, so the user knows which account to fix
    with mail.imap(BOB) as imap:  # refused, not delivered
        imap.select("INBOX", readonly=True)
        typ, found = imap.search(None, "SUBJECT", f'"{subject}"')
        assert typ == "OK" and found == [b""], found


@pytest.mark.parametrize(("froms", "why"), [
    ([ALICE, BOB], "two From: headers (a client shows one of them)"),
    ([f"{ALICE}, {BOB}"], "two addresses in one From: header"),
])
def test_a_from_header_naming_more_than_the_sender_is_refused(mail: Mail, froms: list[str], why: str) -> None:
    code, reply, _subject = data_reply(mail, "submission", ALICE, ALICE, froms)
    assert code == 554 and reply.startswith(b"5.7.1 "), f"{why}: {code} {reply!r}"


def test_inbound_mail_keeps_its_from_header(mail: Mail) -> None:
    """The From: check is for logged-in users: on 25 a From: unlike the envelope
    (a mailing list, a forwarder) is delivered. (To Junk, here: with no DNS answers
    for remote.test, rspamd scores it 7.6, over the add-header threshold of 6.)"""
    subject = token("inbound-from")
    with smtplib.SMTP("127.0.0.1", mail.port("smtp"), local_hostname="mx.remote.test", timeout=TIMEOUT) as s:
        s.starttls(context=mail.ctx)
        s.sendmail("bounces@list.remote.test", [ALICE],
                   message("Carol <carol@remote.test>", ALICE, subject, "via a list"))
    mail.wait_for(subject, folders=("INBOX", "Junk"))


@pytest.mark.parametrize("port_name", ["submission", "submissions"])
def test_null_sender_is_refused_on_submission(mail: Mail, port_name: str) -> None:
    """A logged-in client never needs MAIL FROM:<> (bounces are postfix's own): it
    would be mail from nobody. Refused at RCPT (postfix's smtpd_delay_reject)."""
    with mail.smtp(port_name) as s:
        code, reply = rcpt_reply(s, "", BOB)
    assert code == 554 and reply.startswith(b"5.7.1 <>: Sender address rejected: the null sender"), (code, reply)


def test_null_sender_is_accepted_on_25(mail: Mail) -> None:
    """Bounces and delivery reports come from <>: port 25 takes them."""
    subject = token("bounce")
    with smtplib.SMTP("127.0.0.1", mail.port("smtp"), local_hostname="mx.remote.test", timeout=TIMEOUT) as s:
        s.starttls(context=mail.ctx)
        s.sendmail("", [ALICE], message("MAILER-DAEMON@mx.remote.test", ALICE, subject, "Undelivered Mail"))
    mail.wait_for(subject)


def test_submission_waits_while_rspamd_is_down(mail: Mail) -> None:
    """rspamd checks the From: header and signs: without it, submission answers
    4xx (the client tries again), rather than send unchecked and unsigned mail.
    Port 25 still accepts (milter_default_action = accept)."""
    rspamd = mail.stack.container("rspamd")
    rspamd.kill()
    try:
        subject = token("rspamd-down")
        try:
            code, reply, _subject = data_reply(mail, "submission", ALICE, ALICE, BOB)
        except smtplib.SMTPResponseException as err:  # refused before DATA
            code, reply = err.smtp_code, err.smtp_error
        assert 400 <= code < 500, (code, reply)
        with smtplib.SMTP("127.0.0.1", mail.port("smtp"), local_hostname="mx.remote.test", timeout=TIMEOUT) as s:
            s.starttls(context=mail.ctx)
            s.sendmail("carol@remote.test", [ALICE], message("carol@remote.test", ALICE, subject, "inbound"))
        mail.wait_for(subject)
    finally:
        rspamd.start()
        mail.wait_healthy()


# -- reading ------------------------------------------------------------------------------

def test_pop3s_retrieves_the_mail(mail: Mail) -> None:
    subject, body = token("pop3-subject"), token("pop3-body")
    submit(mail, subject, body)
    DELIVERED.append((subject, body))
    mail.wait_for(subject)
    pop = poplib.POP3_SSL("127.0.0.1", mail.port("pop3s"), context=mail.ctx, timeout=TIMEOUT)
    try:
        pop.user(ALICE)
        pop.pass_(PASSWORD)
        count, _size = pop.stat()
        texts = [b"\n".join(pop.retr(i)[1]).decode(errors="replace") for i in range(1, count + 1)]
    finally:
        pop.quit()
    assert any(subject in t and body in t for t in texts), texts


def test_quota_comes_from_the_accounts_database(mail: Mail) -> None:
    def storage_limit() -> str:
        rows = json.loads(mail.dovecot("doveadm", "-f", "json", "quota", "get", "-u", ALICE))
        return next(r["limit"] for r in rows if r["type"] == "STORAGE")

    assert storage_limit() == str(100 * 1024)  # KiB
    mail.accounts.set_quota(ALICE, 0)
    assert storage_limit() in ("", "-")        # no limit
    mail.accounts.set_quota(ALICE, 100)


def test_quota_is_enforced_at_delivery(mail: Mail) -> None:
    """Over its quota, a mailbox refuses mail (dovecot lets the message that
    crosses the limit in, within quota_storage_grace; the next one bounces)."""
    mail.accounts.set_quota(BOB, 1)
    try:
        big = token("big")
        submit(mail, big, ("x" * 75 + "\r\n") * 16000, rcpt=BOB)  # 1.2 MiB, over 1 MiB
        mail.wait_for(big, BOB)
        refused = token("refused")
        submit(mail, refused, "one too many", rcpt=BOB)

        def bounced() -> None:
            log = mail.stack.container("postfix").logs(tail=50).decode(errors="replace")
            assert any(f"to=<{BOB}>" in line and "status=bounced" in line and "Quota exceeded" in line
                       for line in log.splitlines()), "no quota bounce in the postfix log yet"
        retry(bounced, 30, f"dovecot to refuse mail for {BOB} (over quota)")
        assert refused not in mail.subjects(BOB)
    finally:
        mail.accounts.set_quota(BOB, 0)


# -- encryption ---------------------------------------------------------------------------

def test_delivery_to_a_mailbox_without_keys_is_deferred_not_stored(mail: Mail) -> None:
    subject, body = token("nokeys-subject"), token("nokeys-body")
    submit(mail, subject, body, rcpt=NOKEYS)

    def deferred() -> dict:
        queue = [json.loads(line) for line in mail.stack.exec("postfix", "postqueue", "-j").splitlines() if line]
        entries = [q for q in queue if any(r["address"] == NOKEYS and r.get("delay_reason")
                                           for r in q["recipients"])]
        assert entries, f"no deferred message for {NOKEYS} yet: {queue}"
        return entries[0]

    entry = retry(deferred, 30, f"postfix to defer the message for {NOKEYS}")
    reason = entry["recipients"][0]["delay_reason"]
    assert " 451 " in f" {reason} " or "4.2.0" in reason, reason
    files = mail.dovecot("find", "/var/mail", "-path", f"*/{DOMAIN}/nokeys/*", "-name", "u.*")
    assert files.strip() == "", f"mail was stored for {NOKEYS}: {files}"
    mail.stack.exec("postfix", "postsuper", "-d", entry["queue_id"])
    assert mail.accounts.get_mailbox(NOKEYS) is not None  # still a mailbox: only its keys are missing


def test_no_plaintext_reaches_the_mail_volume(mail: Mail) -> None:
    assert len(DELIVERED) >= 5, "the delivery tests must run first"
    # Read everything the ways clients do (ENVELOPE, BODYSTRUCTURE, header fields,
    # SEARCH, non-sequential order), the accesses that make dovecot cache fields.
    for _ in range(2):
        with mail.imap() as imap:
            imap.select("INBOX")
            for spec in ("3,1,2", "1:*"):
                typ, _data = imap.fetch(spec, "(ENVELOPE BODYSTRUCTURE BODY.PEEK[HEADER.FIELDS (SUBJECT FROM TO)]"
                                              " BODY.PEEK[TEXT] RFC822.SIZE)")
                assert typ == "OK"
            typ, found = imap.search(None, "SUBJECT", f'"{DELIVERED[0][0]}"')
            assert typ == "OK" and found[0], found
    volume_files = mail.dovecot("find", "/var/mail", "-type", "f").split()
    message_files = [f for f in volume_files if f.rsplit("/", 1)[-1].startswith("u.")]
    assert len(message_files) >= len(DELIVERED), volume_files
    # Each message file holds a mail_crypt stream (magic "CRYPTED\x03\x07")...
    crypted = mail.dovecot("grep", "-l", "CRYPTED", *message_files).split()
    assert sorted(crypted) == sorted(message_files)
    # ...and no subject, body or sender address is anywhere on the volume: not in
    # message files, indexes, caches, logs or attributes.
    needles = [t for pair in DELIVERED for t in pair] + ["carol@remote.test"]
    args = [a for n in needles for a in ("-e", n)]
    code, out = mail.stack.container("dovecot").exec_run(["grep", "-rlaF", *args, "/var/mail"])
    assert code == 1, f"plaintext found on the mail volume in: {out.decode(errors='replace')}"
    # The control: dovecot does cache those header fields, in its index cache,
    # which lives on a tmpfs (memory), not on the volume.
    cache = "/var/cache/dovecot-index"
    assert f" {cache} tmpfs " in mail.dovecot("cat", "/proc/mounts")
    assert mail.dovecot("grep", "-rlaF", DELIVERED[0][0], cache).strip()


# -- keys follow the account --------------------------------------------------------------

def test_dovecot_keys_refuses_a_wrong_old_password_without_leaking_it(mail: Mail) -> None:
    wrong = "not-the-password-at-all"
    with pytest.raises(MailboxKeysError) as err:
        mail.keys.change_password(ALICE, wrong, PASSWORD + "-new", mail.accounts.key_kdf(ALICE), KeyKdf.new())
    assert wrong not in str(err.value) and PASSWORD not in str(err.value)
    assert mail.subjects()  # the key still opens with the current password


def test_rename_reset_and_remove_move_the_mail_and_keys(mail: Mail) -> None:
    dave, dave2 = f"dave@{DOMAIN}", "dave@other.test"
    mail.accounts.create_mailbox(dave, PASSWORD, keys=mail.keys)
    subject = token("dave-subject")
    submit(mail, subject, "for dave", rcpt=dave)
    mail.wait_for(subject, dave)

    mail.accounts.rename_mailbox(dave, dave2, mail.keys)
    assert mail.subjects(dave2) == [subject]
    assert mail.dovecot("ls", "/var/mail/other.test").split() == ["dave"]
    assert mail.is_user(dave2) and not mail.is_user(dave)

    # A reset gives new keys: new mail is readable, the old is not (for anyone).
    reset = PASSWORD + "-reset"
    before = mail.accounts.key_kdf(dave2)
    mail.accounts.reset_password(dave2, reset, mail.keys)
    after = mail.accounts.key_kdf(dave2)
    assert after.version == KEY_KDF_SCRYPT and after.salt != before.salt
    assert mail.key_opens(dave2, key_password(reset, after))
    after = token("after-reset")
    submit(mail, after, "after the reset", rcpt=dave2)

    def only_new_readable() -> None:
        with mail.imap(dave2, reset) as imap:
            _typ, count = imap.select("INBOX", readonly=True)
            assert count == [b"2"], count
            old = imap.fetch("1", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
            new = imap.fetch("2", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
        assert old[0] == "NO", old  # encrypted with the old keys: nobody can read it
        readable = [part[1].decode() for part in new[1] if isinstance(part, tuple)]
        assert new[0] == "OK" and any(after in text for text in readable), new
    retry(only_new_readable, 30, "the mail delivered after the reset")
    mail.accounts.change_password(dave2, reset, PASSWORD, mail.keys)  # old keys are gone: this works

    mail.accounts.delete_mailbox(dave2, mail.keys)
    assert "other.test" not in mail.dovecot("ls", "/var/mail").split()
    assert not mail.is_user(dave2)


# -- the key password: derived by the agent (doveadm) and by dovecot (login) alike -----

def test_mail_is_read_with_the_key_password_dovecot_derives_from_the_stored_salt(mail: Mail) -> None:
    """The keys are made with the agent's derivation (scrypt, the mailbox's
    salt); reading the mail over IMAP needs dovecot's passdb to derive the same
    value from the password at login. A wrong salt in accounts.db (the control)
    gives another value, and the mail cannot be read."""
    erin = f"erin@{DOMAIN}"
    mail.accounts.create_mailbox(erin, PASSWORD, keys=mail.keys)
    kdf = mail.accounts.key_kdf(erin)
    assert kdf.version == KEY_KDF_SCRYPT and len(kdf.salt) == 32
    subject, body = token("erin-subject"), token("erin-body")
    submit(mail, subject, body, rcpt=erin)
    mail.wait_for(subject, erin)
    assert mail.bodies(erin) == [body]  # decrypted with the key password dovecot derived at login
    assert mail.key_opens(erin, key_password(PASSWORD, kdf))
    assert not mail.key_opens(erin, key_password(PASSWORD, KeyKdf(KEY_KDF_SHA256)))  # no more sha256(password)
    mail.set_key_kdf(erin, KeyKdf(KEY_KDF_SCRYPT, "f" * 32))
    try:
        typ, data = mail.fetch_texts(erin)  # the login works; the key does not open
        assert typ == "NO", data
    finally:
        mail.set_key_kdf(erin, kdf)
    assert mail.bodies(erin) == [body]
    mail.accounts.delete_mailbox(erin, mail.keys)


def test_a_version_1_mailbox_keeps_working_and_moves_to_version_2(mail: Mail) -> None:
    """A mailbox made before the scrypt derivation: its row says version 1
    (what the schema migration gives old rows) and its key is encrypted with
    sha256(password). Logins keep reading its mail (dovecot derives version 1
    for it) and do not change it; a password change through the agent, even
    to the same password, re-encrypts the key under version 2."""
    legacy = f"legacy@{DOMAIN}"
    mail.accounts.create_mailbox(legacy, PASSWORD, keys=NoKeys())
    mail.set_key_kdf(legacy, KeyKdf(KEY_KDF_SHA256))
    mail.keys.generate(legacy, PASSWORD, KeyKdf(KEY_KDF_SHA256))  # the old way: doveadm with sha256(password)
    sha256_key = key_password(PASSWORD, KeyKdf(KEY_KDF_SHA256))
    assert mail.key_opens(legacy, sha256_key)
    subjects, texts = [token("legacy-1"), token("legacy-2")], [token("legacy-body-1"), token("legacy-body-2")]
    for subject, text in zip(subjects, texts):
        submit(mail, subject, text, rcpt=legacy)
        mail.wait_for(subject, legacy)
    assert mail.bodies(legacy) == texts  # dovecot derived sha256(password) at login
    assert mail.accounts.key_kdf(legacy) == KeyKdf(KEY_KDF_SHA256)  # a login migrates nothing

    mail.accounts.change_password(legacy, PASSWORD, PASSWORD, mail.keys)
    kdf = mail.accounts.key_kdf(legacy)
    assert kdf.version == KEY_KDF_SCRYPT
    assert mail.bodies(legacy) == texts  # the same password decrypts the same mail
    assert mail.subjects(legacy) == subjects
    assert not mail.key_opens(legacy, sha256_key)
    assert mail.key_opens(legacy, key_password(PASSWORD, kdf))
    attributes = mail.dovecot("cat", f"/var/mail/{DOMAIN}/legacy/dovecot-attributes")
    assert sha256_key not in attributes and key_password(PASSWORD, kdf) not in attributes
    mail.accounts.delete_mailbox(legacy, mail.keys)


# -- failed logins (last before the restarts, which clear dovecot's auth penalty) --------

def test_password_change_reencrypts_the_key(mail: Mail) -> None:
    new = PASSWORD + "-changed"
    before = mail.subjects()
    assert before
    old_kdf = mail.accounts.key_kdf(ALICE)
    mail.accounts.change_password(ALICE, PASSWORD, new, mail.keys)
    try:
        assert mail.subjects(ALICE, new) == before
        with pytest.raises(imaplib.IMAP4.error):
            mail.imap(ALICE, PASSWORD)
        new_kdf = mail.accounts.key_kdf(ALICE)
        assert new_kdf.salt != old_kdf.salt
        keys_file = mail.dovecot("cat", f"/var/mail/{DOMAIN}/alice/dovecot-attributes")
        for secret in (PASSWORD, new, key_password(PASSWORD, old_kdf), key_password(new, new_kdf)):
            assert secret not in keys_file
    finally:
        mail.accounts.change_password(ALICE, new, PASSWORD, mail.keys)
    assert mail.subjects() == before


def test_wrong_passwords_and_unknown_users_are_refused(mail: Mail) -> None:
    """IMAPS, POP3S and SMTP AUTH. Tried at the same time: dovecot delays each
    failure from an address longer than the one before (auth penalty)."""
    wrong = PASSWORD + "x"

    def imap(user: str, password: str) -> None:
        with pytest.raises(imaplib.IMAP4.error):
            mail.imap(user, password)

    def pop3() -> None:
        pop = poplib.POP3_SSL("127.0.0.1", mail.port("pop3s"), context=mail.ctx, timeout=TIMEOUT)
        try:
            pop.user(f"nobody@{DOMAIN}")
            with pytest.raises(poplib.error_proto):
                pop.pass_(PASSWORD)
        finally:
            pop.close()

    def smtp() -> None:
        with mail.smtp("submissions", login=None) as s:
            s.ehlo()
            s.user, s.password = ALICE, wrong
            with pytest.raises(smtplib.SMTPAuthenticationError):
                s.auth("PLAIN", s.auth_plain)  # one mechanism: smtplib's login() would try each

    with ThreadPoolExecutor(3) as pool:
        checks = [pool.submit(imap, ALICE, wrong), pool.submit(pop3), pool.submit(smtp)]
        for check in checks:
            check.result()


# -- persistence ----------------------------------------------------------------------------

def test_mail_and_accounts_survive_compose_restart(mail: Mail) -> None:
    """And the spool's permissions are set up again when the IDs they were set
    up for differ from the image's (an upgrade), not on every start."""
    before = mail.subjects()
    stamp = "/var/spool/postfix/.mailstead-permissions"
    ids = mail.stack.exec("postfix", "cat", stamp).strip()
    assert re.fullmatch(r"\d+:\d+:\d+", ids), ids
    # The new spool's folders, made by postfix itself at its first start.
    modes = mail.stack.exec("postfix", "stat", "-c", "%n %U:%G %a", "/var/spool/postfix/maildrop",
                            "/var/spool/postfix/public", "/var/spool/postfix/active").split("\n")
    assert [m.strip() for m in modes if m.strip()] == [
        "/var/spool/postfix/maildrop postfix:postdrop 730", "/var/spool/postfix/public postfix:postdrop 710",
        "/var/spool/postfix/active postfix:root 700"], modes
    # As if the spool had been set up by an image whose postfix had other IDs.
    mail.stack.exec("postfix", "sh", "-c", f"chown root /var/spool/postfix/maildrop && echo 1:2:3 >{stamp}")
    r = deploy_mod.compose(mail.stack.settings, "restart", timeout=180)
    assert r.returncode == 0, r.stderr
    mail.wait_healthy()
    assert mail.subjects() == before
    assert mail.stack.exec("postfix", "cat", stamp).strip() == ids
    assert mail.stack.exec("postfix", "stat", "-c", "%U", "/var/spool/postfix/maildrop").strip() == "postfix"
    subject = token("after-restart")
    submit(mail, subject, "after the restart")
    mail.wait_for(subject)


def test_mail_survives_dovecot_being_killed(mail: Mail) -> None:
    """A crash (SIGKILL from outside): the restart policy brings dovecot back.
    (`docker kill` would not do: docker counts it as a manual stop.)"""
    before = mail.subjects()
    container = mail.stack.container("dovecot")
    started = container.attrs["State"]["StartedAt"]
    os.kill(container.attrs["State"]["Pid"], signal.SIGKILL)

    def restarted() -> None:
        container.reload()
        assert container.attrs["State"]["StartedAt"] != started and container.status == "running"
    retry(restarted, 60, "docker to restart the killed dovecot container")
    mail.wait_healthy()
    assert mail.subjects() == before


def test_redeploy_with_new_settings_keeps_the_data(mail: Mail) -> None:
    before = mail.subjects()
    mail.stack.deploy(message_size_limit_mb=20)
    assert mail.stack.exec("postfix", "postconf", "-h", "message_size_limit").strip() == str(20 * 1024 * 1024)
    with mail.smtp("submission") as s:
        s.ehlo()
        assert s.esmtp_features.get("size") == str(20 * 1024 * 1024)
    assert mail.subjects() == before
    assert mail.subjects(BOB)
    subject = token("after-redeploy")
    submit(mail, subject, "after the redeploy", rcpt=BOB)
    mail.wait_for(subject, BOB)
