-- Mailstead: the mail_crypt key password of a mailbox, derived at login from
-- the password the user has just given. dovecot.conf runs this passdb only
-- after passdb sql has checked that password (skip = unauthenticated); that
-- one also returns the mailbox's key_kdf and key_salt from accounts.db.
--
-- portal/stack/dovecot_keys.py (key_password) derives the same values for
-- doveadm; its docstring says why. The password and the derived value are
-- never logged and never part of an error message.

local kdf = require "openssl.kdf"
local digest = require "openssl.digest"

-- KDF version 2: scrypt, the same numbers as dovecot_keys.SCRYPT_* (a unit
-- test compares them). Never change them: stored keys depend on them.
local SCRYPT_N = 65536
local SCRYPT_R = 8
local SCRYPT_P = 1
local SCRYPT_BYTES = 32
local SCRYPT_MAXMEM = 128 * SCRYPT_R * SCRYPT_N + 16 * 1024 * 1024

-- Only logins that read mail need the key. SMTP AUTH (postfix) and radicale's
-- checks do not pay for a derivation; doveadm is here for `doveadm auth login`.
local NEEDS_KEY = { imap = true, pop3 = true, doveadm = true }

local function hex(bytes)
  return (bytes:gsub(".", function(c) return string.format("%02x", c:byte()) end))
end

local function key_password(version, salt, password)
  if version == "2" then
    if #salt ~= 32 or not salt:match("^[0-9a-f]+$") then
      return nil, "key_salt is not 32 hex digits"
    end
    return hex(kdf.derive{ type = "SCRYPT", pass = password, salt = salt, N = SCRYPT_N, r = SCRYPT_R,
                           p = SCRYPT_P, maxmem_bytes = SCRYPT_MAXMEM, outlen = SCRYPT_BYTES })
  elseif version == "1" then
    -- Mailboxes made before version 2, until their password is changed or reset.
    return hex(digest.new("sha256"):final(password))
  end
  return nil, "unknown key_kdf " .. string.format("%q", tostring(version))
end

-- A lookup without a password (`doveadm auth lookup`): nothing to derive.
function auth_passdb_lookup(req)
  return dovecot.auth.PASSDB_RESULT_NEXT, ""
end

function auth_password_verify(req, password)
  if not NEEDS_KEY[req.protocol] then
    return dovecot.auth.PASSDB_RESULT_OK, {}
  end
  local ok, key, err = pcall(key_password, req.passdb.mailstead_key_kdf, req.passdb.mailstead_key_salt or "",
                             password)
  if not ok then
    err, key = "the key derivation failed", nil
  end
  if key == nil then
    req:log_error("mailstead-keys: " .. err .. "; the login is refused")
    return dovecot.auth.PASSDB_RESULT_INTERNAL_FAILURE, "no key password"
  end
  return dovecot.auth.PASSDB_RESULT_OK, { userdb_crypt_user_key_password = key }
end
