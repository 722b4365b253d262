"""The stack renderer: a pure function of settings and secrets."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from portal.stack.render import render, replace_tree, restore_tree, tree_holds
from portal.stack.settings import SERVICES, StackSettings

SECRETS = {"redis_password": "s3cret-redis-password"}


def settings(**changes) -> StackSettings:
    base = StackSettings(domain="example.test", hostname="mail.example.test",
                         state_dir=Path("/var/lib/mailstead"),
                         images={s: f"sha256:{s.encode().hex():0<64}"[:71] for s in SERVICES})
    return replace(base, **changes)


def compose(files) -> dict:
    return yaml.safe_load(files["compose.yaml"].content)


def test_same_settings_give_byte_identical_files():
    a, b = render(settings(), SECRETS), render(settings(), SECRETS)
    assert a.keys() == b.keys()
    assert all(a[k] == b[k] for k in a)
    assert {"compose.yaml", "postfix/entrypoint.sh", "redis/redis.conf"} <= a.keys()


def test_every_service_has_healthcheck_restart_and_pinned_image():
    spec = compose(render(settings(), SECRETS))
    assert set(spec["services"]) == set(SERVICES)
    for name, svc in spec["services"].items():
        assert svc["restart"] == "unless-stopped", name
        assert svc["healthcheck"]["test"], name
        assert "start_interval" not in svc["healthcheck"], "docker 20.10 refuses start_interval"
        assert svc["image"].startswith("sha256:"), f"{name} is not pinned by image ID"


def test_published_addresses_follow_the_setting_and_redis_is_never_published():
    spec = compose(render(settings(publish_addresses=("127.0.0.1", "::1")), SECRETS))
    smtp = [(p["host_ip"], p["published"], p["target"]) for p in spec["services"]["postfix"]["ports"]]
    assert ("127.0.0.1", "25", 25) in smtp and ("::1", "25", 25) in smtp
    assert "ports" not in spec["services"]["redis"]
    assert spec["services"]["radicale"]["ports"] == [
        {"target": 5232, "published": "5232", "host_ip": "127.0.0.1", "protocol": "tcp"}]


def test_changed_settings_change_the_output():
    a = render(settings(), SECRETS)
    b = render(settings(ports={"smtp": 2525, "submissions": 465, "submission": 587,
                               "imaps": 993, "pop3s": 995, "dav": 5232}), SECRETS)
    assert a["compose.yaml"] != b["compose.yaml"]


def test_secrets_are_rendered_into_files_but_scripts_are_executable():
    files = render(settings(), SECRETS)
    assert b"s3cret-redis-password" in files["redis/redis.conf"].content
    assert b"s3cret-redis-password" not in files["compose.yaml"].content
    assert files["redis/entrypoint.sh"].mode == 0o755


def test_replace_and_restore_keep_the_previous_folder(tmp_path):
    stack = tmp_path / "stack"
    assert replace_tree(render(settings(), SECRETS), stack) is None
    old = (stack / "compose.yaml").read_bytes()
    prev = replace_tree(render(settings(message_size_limit_mb=10), SECRETS), stack)
    assert prev is not None and (prev / "compose.yaml").read_bytes() == old
    assert (stack.stat().st_mode & 0o777) == 0o700
    restore_tree(stack, prev)
    assert (stack / "compose.yaml").read_bytes() == old


def test_a_folder_holds_the_rendered_files_only_when_every_byte_and_mode_is_the_same(tmp_path):
    stack = tmp_path / "stack"
    files = render(settings(), SECRETS)
    assert not tree_holds(files, stack)  # nothing deployed yet
    replace_tree(files, stack)
    assert tree_holds(files, stack) and tree_holds(render(settings(), SECRETS), stack)
    assert not tree_holds(render(settings(message_size_limit_mb=10), SECRETS), stack)

    def differs(change) -> bool:
        replace_tree(files, stack)
        change(stack)
        return not tree_holds(files, stack)

    assert differs(lambda d: (d / "redis" / "redis.conf").write_bytes(b"bind 0.0.0.0\n"))
    assert differs(lambda d: (d / "postfix" / "entrypoint.sh").chmod(0o644))
    assert differs(lambda d: (d / "postfix" / "extra.cf").write_text("x"))
    assert differs(lambda d: (d / "compose.yaml").unlink())

    def symlinked(d: Path) -> None:
        (d / "redis" / "redis.conf").unlink()
        (d / "redis" / "redis.conf").symlink_to(tmp_path / "elsewhere")
    (tmp_path / "elsewhere").write_bytes(files["redis/redis.conf"].content)
    assert differs(symlinked)


@pytest.mark.parametrize("changes, field", [
    ({"domain": "exa mple.test"}, "domain"),
    ({"hostname": "mail;reboot"}, "hostname"),
    ({"publish_addresses": ("0.0.0.0; rm -rf /",)}, "publish_addresses"),
    ({"publish_addresses": ()}, "publish_addresses"),
    ({"ports": {"smtp": 70000}}, "ports.smtp"),
    ({"ports": {"smtp": 25, "imaps": 25}}, "ports"),
    ({"ports": {"gopher": 70}}, "ports"),
    ({"message_size_limit_mb": 0}, "message_size_limit_mb"),
])
def test_bad_settings_are_refused_naming_the_field(changes, field):
    with pytest.raises(ValueError) as err:
        settings(**changes).validate()
    assert err.value.field == field


def test_junk_training_trusts_dovecots_address_alone_and_only_the_global_scripts_pipe():
    s = settings(subnet="10.77.5.0/24")
    files = render(s, SECRETS)
    controller = files["rspamd/override.d/worker-controller.inc"].content.decode()
    assert f'secure_ip = ["127.0.0.1", "::1", "{s.dovecot_address}"];' in controller
    assert s.dovecot_address.startswith("10.77.5.")
    dovecot = files["dovecot/dovecot.conf"].content.decode()
    # the pipe extension for the administrator's scripts only, never the users' own
    assert "sieve_global_extensions {\n  vnd.dovecot.pipe = yes\n}" in dovecot
    assert "sieve_extensions" not in dovecot
    assert files["dovecot/sieve-pipe/learn.sh"].mode == 0o755
    for script, kind in (("report-spam", "spam"), ("report-ham", "ham")):
        assert f"path = /etc/mailstead/dovecot/sieve/{script}.sieve" in dovecot
        assert f'pipe :copy "learn.sh" ["{kind}"];' in files[f"dovecot/sieve/{script}.sieve"].content.decode()
