"""Accessibility basics on the rendered HTML of every page of the wizard and the
dashboard (and the pages around them: token, sign-in, errors), with a real agent:
every control has a label, ids are unique, one <h1> and a <main> per page, buttons
have text, images and SVG have a title or aria-label. The same pages again with
their forms showing errors. (Keyboard-only use is the lead's browser test.)"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from html.parser import HTMLParser

import pytest

from tests.unit.test_fuzz_forms import ADMIN, BASE_SETTINGS, PASSWORD, Rig, csrf_of

VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


@dataclass
class Element:
    tag: str
    attrs: dict[str, str]
    text: list[str] = field(default_factory=list)
    children: list[Element] = field(default_factory=list)

    def all_text(self) -> str:
        return " ".join([*self.text, *(c.all_text() for c in self.children)]).strip()


class Tree(HTMLParser):
    def __init__(self, html: str) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Element("#root", {})
        self.stack = [self.root]
        self.elements: list[Element] = []
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        el = Element(tag, {k: v or "" for k, v in attrs})
        self.stack[-1].children.append(el)
        self.elements.append(el)
        if tag not in VOID:
            self.stack.append(el)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        el = Element(tag, {k: v or "" for k, v in attrs})
        self.stack[-1].children.append(el)
        self.elements.append(el)

    def handle_endtag(self, tag: str) -> None:
        for i in range(len(self.stack) - 1, 0, -1):
            if self.stack[i].tag == tag:
                del self.stack[i:]
                return

    def handle_data(self, data: str) -> None:
        self.stack[-1].text.append(data.strip())


def problems(html: str) -> list[str]:
    """Every accessibility-basics problem of one page, as sentences."""
    tree = Tree(html)
    els = tree.elements
    out: list[str] = []
    ids = [e.attrs["id"] for e in els if "id" in e.attrs]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        out.append(f"ids used more than once: {dupes}")
    labelled = {e.attrs.get("for") for e in els if e.tag == "label"}
    # a control inside a <label> is labelled by it too
    wrapped = {id(c) for e in els if e.tag == "label" for c in _descendants(e)}
    for e in els:
        if e.tag in ("input", "select", "textarea"):
            if e.tag == "input" and e.attrs.get("type") in ("hidden", "submit", "button", "reset", "image"):
                continue
            named = (e.attrs.get("id") in labelled and e.attrs.get("id")) or e.attrs.get("aria-label") \
                or e.attrs.get("aria-labelledby") or id(e) in wrapped
            if not named:
                out.append(f"<{e.tag} name={e.attrs.get('name')!r} id={e.attrs.get('id')!r}> has no label")
            for ref in (e.attrs.get("aria-labelledby", "") + " " + e.attrs.get("aria-describedby", "")).split():
                if ref not in ids:
                    out.append(f"<{e.tag} id={e.attrs.get('id')!r}> refers to missing id {ref!r}")
        elif e.tag == "label" and e.attrs.get("for") and e.attrs["for"] not in ids:
            out.append(f"<label for={e.attrs['for']!r}> points at no element")
        elif e.tag == "button" or (e.tag == "input" and e.attrs.get("type") in ("submit", "button")):
            if not (e.all_text() or e.attrs.get("aria-label") or e.attrs.get("value") or e.attrs.get("title")):
                out.append(f"button id={e.attrs.get('id')!r} has no text")
        elif e.tag == "img" and "alt" not in e.attrs:
            out.append(f"<img src={e.attrs.get('src')!r}> has no alt")
        elif e.tag == "svg":
            hidden = e.attrs.get("aria-hidden") == "true"
            titled = e.attrs.get("aria-label") or e.attrs.get("aria-labelledby") or any(
                c.tag == "title" for c in e.children)
            if not (hidden or titled):
                out.append(f"<svg id={e.attrs.get('id')!r}> has no title or aria-label")
        elif e.tag == "a" and "href" in e.attrs:
            if not (e.all_text() or e.attrs.get("aria-label") or e.attrs.get("title")):
                out.append(f"link to {e.attrs['href']!r} has no text")
    h1 = [e for e in els if e.tag == "h1"]
    if len(h1) != 1:
        out.append(f"{len(h1)} <h1> elements (one expected)")
    elif not h1[0].all_text():
        out.append("the <h1> is empty")
    if sum(e.tag == "main" for e in els) != 1:
        out.append("no single <main>")
    html_el = next((e for e in els if e.tag == "html"), None)
    if html_el is None or not html_el.attrs.get("lang"):
        out.append("<html> has no lang")
    if not any(e.tag == "title" and e.all_text() for e in els):
        out.append("no <title>")
    return out


def _descendants(el: Element) -> list[Element]:
    out = []
    for c in el.children:
        out += [c, *_descendants(c)]
    return out


# -- the pages ------------------------------------------------------------------------------

PAGES: dict[str, list[str]] = {
    "token": ["/setup/token", "/no-such-page"],
    "at:domain": ["/setup/domain", "/setup/restore"],
    "at:admin": ["/setup/admin"],
    "at:dns": ["/setup/dns"],
    "at:certs": ["/setup/certs"],
    "at:deploy": ["/setup/deploy"],
    "clients": ["/setup/deploy/clients"],
    "login": ["/login", "/setup/token", "/password"],
    "dashboard": ["/admin/", "/admin/mailboxes/", f"/admin/mailboxes/delete?address=bob@{BASE_SETTINGS['domain']}",
                  "/admin/dns", "/admin/certs", "/admin/clients/", "/admin/logs/",
                  "/admin/logs/?service=postfix&lines=0", "/admin/health/", "/admin/backups/"],
    "maintenance": ["/admin/schedules/", "/admin/updates/"],
}
CASES = [(state, path) for state, paths in PAGES.items() for path in paths]

# Forms sent with bad values, to check the pages with their errors shown.
BAD_POSTS: dict[str, list[tuple[str, str, dict[str, str]]]] = {
    "token": [("/setup/token", "/setup/token", {"token": "wrong"})],
    "at:domain": [("/setup/domain", "/setup/domain", {"domain": "bad domain", "public_ipv4": "10.0.0.1",
                                                      "public_ipv6": "nope", "dns_resolvers": "x y"}),
                  ("/setup/restore", "/setup/restore", {"target": "sftp", "port": "x", "user": "a\x00",
                                                         "password": ""}),
                  ("/setup/restore", "/setup/restore", {"target": "local", "path": "relative/folder",
                                                         "password": "abcd-efgh"}),
                  ("/setup/restore", "/setup/restore", {"target": "local", "path": "/nonexistent/backups",
                                                         "password": "abcd-efgh"})],
    "at:admin": [("/setup/admin", "/setup/admin", {"address": "", "password": "short", "password_confirm": "x",
                                                   "totp_code": "abc"})],
    "at:dns": [("/setup/dns", "/setup/dns/push-config", {"rfc2136_server": "", "rfc2136_port": "0",
                                                         "rfc2136_key_name": "", "rfc2136_secret": "!",
                                                         "rfc2136_algorithm": "md5"}),
               ("/setup/dns", "/setup/dns", {"dns_continue": "Continue"})],
    "at:certs": [("/setup/certs", "/setup/certs/settings", {"acme_ca": "custom", "acme_directory": "http://x",
                                                           "acme_contact": "no", "acme_challenge": "dns-01"}),
                 ("/setup/certs", "/setup/certs", {"continue_self_signed": "Continue"})],
    "clients": [("/setup/deploy/clients", "/setup/deploy/clients/test", {"to": "not an address"})],
    "login": [("/login", "/login", {"address": "", "password": "", "code": "x"}),
              ("/login", "/login", {"address": ADMIN, "password": PASSWORD + "x", "code": "123456"}),
              ("/password", "/password", {"address": "x", "old_password": "", "new_password": "short",
                                          "new_password_confirm": "other"}),
              ("/password", "/password", {"address": ADMIN, "old_password": PASSWORD + "x",
                                          "new_password": PASSWORD + "-new", "new_password_confirm": PASSWORD + "-new"})],
    "dashboard": [
        ("/admin/mailboxes/", "/admin/mailboxes/create", {"create-address": "x", "create-password": "s",
                                                          "create-quota_mb": "lots"}),
        ("/admin/mailboxes/", "/admin/mailboxes/create", {"create-address": f"carol@{BASE_SETTINGS['domain']}",
                                                          "create-password": PASSWORD}),  # needs docker
        ("/admin/mailboxes/", "/admin/mailboxes/quota", {"quota-address": "", "quota-quota_mb": "-5"}),
        ("/admin/mailboxes/", "/admin/mailboxes/reset-password", {"reset-address": "",
                                                                  "reset-new_password": "x"}),
        ("/admin/mailboxes/", "/admin/mailboxes/alias", {"alias-source": "", "alias-destination": "@"}),
        (f"/admin/mailboxes/delete?address=bob@{BASE_SETTINGS['domain']}", "/admin/mailboxes/delete",
         {"delete-address": f"bob@{BASE_SETTINGS['domain']}"}),
        ("/admin/dns", "/admin/dns/push-config", {"rfc2136_server": "a b"}),
        ("/admin/certs", "/admin/certs/settings", {"acme_ca": "nope"}),
        ("/admin/clients/", "/admin/clients/test", {"to": "x"}),
        ("/admin/health/", "/admin/health/alerts", {"alert_webhook_url": "ftp://x", "dnsbl_zones": "not a zone"}),
        ("/admin/backups/", "/admin/backups/target", {"target": "sftp", "host": "", "port": "x", "key": "k\x00"}),
        ("/admin/backups/", "/admin/backups/target", {"target": "local", "path": "relative"}),  # the agent's
        ("/admin/backups/", "/admin/backups/restore", {"snapshot": "zz"}),
    ],
    "maintenance": [
        ("/admin/schedules/", "/admin/schedules/update", {"update-cron": "61 * * * *"}),
        ("/admin/schedules/", "/admin/schedules/health", {"health-cron": ""}),
        ("/admin/updates/", "/admin/updates/settings", {"window_hour": "25", "time_zone": "Mars/Olympus",
                                                         "feed_url": "ftp://x"}),
        ("/admin/updates/", "/admin/updates/install", {}),
    ],
}
BAD_CASES = [(state, *post) for state, posts in BAD_POSTS.items() for post in posts]


@pytest.mark.parametrize(("state", "path"), CASES, ids=[f"{s} {p}" for s, p in CASES])
def test_page_has_the_accessibility_basics(rig: Callable[..., Rig], state: str, path: str) -> None:
    r = rig(state)
    response = r.client.get(path)
    assert response.status_code < 500 and response.status_code not in (301, 302, 303), (path, response.status_code)
    assert response.mimetype == "text/html"
    assert problems(response.text) == [], path


@pytest.mark.parametrize(("state", "page", "action", "data"), BAD_CASES,
                         ids=[f"{s} {a} {i}" for i, (s, _p, a, _d) in enumerate(BAD_CASES)])
def test_page_with_errors_has_the_accessibility_basics(rig: Callable[..., Rig], state: str, page: str, action: str,
                                                       data: dict[str, str]) -> None:
    r = rig(state)
    token = csrf_of(r.client.get(page).text)
    response = r.client.post(action, data={"csrf_token": token, **{
        f"{k.split('-')[0]}-csrf_token": token for k in data if "-" in k}, **data})
    assert 400 <= response.status_code < 500 or response.status_code == 200, (action, response.status_code)
    assert problems(response.text) == [], action
    # an error on a field is announced and tied to it
    tree = Tree(response.text)
    for el in tree.elements:
        if el.attrs.get("aria-invalid") == "true":
            described = el.attrs.get("aria-describedby", "").split()
            assert any(d.endswith("-error") for d in described), (action, el.attrs.get("id"))


def test_the_checker_finds_problems() -> None:
    bad = ('<html><head><title>t</title></head><body><main><h1>A</h1><h1>B</h1>'
           '<input id="a" name="a"><input id="a" name="b" type="hidden"><button></button>'
           '<svg></svg><img src="x"><label for="nowhere">L</label></main></body></html>')
    found = " | ".join(problems(bad))
    for words in ("ids used more than once", "has no label", "has no text", "<svg", "has no alt",
                  "points at no element", "2 <h1>", "no lang"):
        assert words in found, words
    good = ('<html lang="en"><head><title>t</title></head><body><main><h1>A</h1>'
            '<label for="a">A</label><input id="a" name="a"><label>B <input name="b"></label>'
            '<button type="submit">Go</button><svg aria-label="QR"></svg></main></body></html>')
    assert problems(good) == []
