#!/usr/bin/env python3
"""The cost of one guess at a mailbox password, printed as JSON.

    PYTHONPATH=. bench/keykdf.py [--runs 10]

Times, in the same run and on one core: the old mail_crypt key password
derivation (version 1, unsalted SHA-256), the new one (version 2, scrypt with
a per-mailbox salt: portal.stack.dovecot_keys.key_password) and the argon2id
login hash (portal.stack.accounts.hash_password). Someone holding a stolen mail
volume or backup pays, per guess, the key derivation and then dovecot's own
unlock of the private key (lib-dcrypt: PBKDF2-HMAC-SHA256, 2048 rounds, with a
salt stored in the key; the same for every version), so per_guess_* add both;
someone holding accounts.db pays the login hash. Median and minimum
microseconds per derivation, and what that allows per core and second.

Dovecot computes version 2 with OpenSSL's scrypt as well (luaossl, in the
passdb), so the figure is the added cost of a login that reads mail too.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from portal.stack import accounts, dovecot_keys  # noqa: E402
from portal.stack.accounts import KEY_KDF_SHA256, KeyKdf, hash_password  # noqa: E402
from portal.stack.dovecot_keys import key_password  # noqa: E402

PASSWORD = "correct horse battery staple"
DCRYPT_ROUNDS = 2048  # lib-dcrypt's DCRYPT_DOVECOT_KEY_ENCRYPT_ROUNDS (sha256)


def timed(fn: Callable[[], object], runs: int) -> dict[str, float]:
    fn()  # warm up (imports, first allocation of the big buffers)
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e6)
    median = statistics.median(samples)
    return {"us_median": round(median, 2), "us_min": round(min(samples), 2),
            "guesses_per_core_second": round(1e6 / median, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    old, new = KeyKdf(KEY_KDF_SHA256), KeyKdf.new()
    dcrypt_salt = os.urandom(16)
    print("timing sha256, scrypt, dcrypt's PBKDF2 and argon2id ...", file=sys.stderr)
    figures = {
        "key_kdf_v1_sha256": timed(lambda: key_password(PASSWORD, old), max(args.runs, 1000)),
        "key_kdf_v2_scrypt": timed(lambda: key_password(PASSWORD, new), args.runs),
        "dcrypt_pbkdf2_2048": timed(lambda: hashlib.pbkdf2_hmac("sha256", b"0" * 64, dcrypt_salt, DCRYPT_ROUNDS),
                                    max(args.runs, 100)),
        "login_hash_argon2id": timed(lambda: hash_password(PASSWORD), args.runs),
    }
    v1, v2, dcrypt, login = (figures[k]["us_median"] for k in ("key_kdf_v1_sha256", "key_kdf_v2_scrypt",
                                                                  "dcrypt_pbkdf2_2048", "login_hash_argon2id"))
    before, after = v1 + dcrypt, v2 + dcrypt
    print(json.dumps({
        **figures,
        "per_guess_before_us": round(before, 1),
        "per_guess_after_us": round(after, 1),
        "per_guess_after_over_before": round(after / before),
        "per_guess_after_over_login_hash": round(after / login, 2),
        "parameters": {
            "scrypt": {"N": dovecot_keys.SCRYPT_N, "r": dovecot_keys.SCRYPT_R, "p": dovecot_keys.SCRYPT_P,
                       "memory_mib": 128 * dovecot_keys.SCRYPT_R * dovecot_keys.SCRYPT_N // 2**20},
            "argon2id": {"t": accounts.ARGON2_TIME_COST, "p": accounts.ARGON2_PARALLELISM,
                         "memory_mib": accounts.ARGON2_MEMORY_COST_KIB // 1024},
        },
        "runs": args.runs,
        "cpu": platform.processor() or platform.machine(),
    }, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
