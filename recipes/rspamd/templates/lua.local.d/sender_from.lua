-- Mailstead: the From: header of a logged-in user's mail is the envelope sender.
--
-- postfix checks the envelope on submission (587, 465): a login may use as
-- MAIL FROM only its own address or an alias that delivers to it
-- (smtpd_sender_login_maps, reject_sender_login_mismatch). postfix cannot look
-- at headers per login, so this rule, run by the milter on every message of
-- an authenticated session (task:get_user(): the {auth_authen} macro), refuses
-- one whose From: header is not that same address. The header then obeys the
-- envelope's rule, with one source for who owns what (accounts.db, read by
-- postfix); rspamd needs no copy of the accounts. Mail clients send with the
-- From: address as MAIL FROM, also for an alias identity.
--
-- Inbound mail (port 25, no AUTH) and mail made inside the postfix container
-- have no user and are not touched.

local rspamd_util = require "rspamd_util"

local E = {}
local SYMBOL = 'MAILSTEAD_FROM_NOT_SENDER'

-- An address as it may appear in an SMTP reply: printable ASCII, no '%'
-- (milter reply text), at most 254 characters.
local function shown(addr)
  addr = tostring(addr or '')
  return (addr:gsub('[^%w!#$&\'*+/=?^_`{|}~.@-]', '?')):sub(1, 254)
end

local function refuse(task, why, option)
  task:insert_result(SYMBOL, 1.0, option)
  -- The milter answers "554 5.7.1 <message>" at the end of DATA.
  task:set_pre_result { action = 'reject', message = why, module = 'mailstead' }
end

local function check(task)
  local user = task:get_user()
  if not user then
    return
  end
  local login = shown(user)
  local envelope = ((task:get_from('smtp') or E)[1] or E).addr or ''
  if envelope == '' then
    return refuse(task, string.format('a null sender is for bounces only; %s must send as one of its addresses',
        login), 'null sender')
  end
  local headers = task:get_header_full('From') or E
  if #headers ~= 1 then
    return refuse(task, string.format('the message must have exactly one From: header (it has %d)', #headers),
        'From: headers ' .. #headers)
  end
  local from = task:get_from('mime') or E
  if #from ~= 1 or not from[1].addr or from[1].addr == '' then
    return refuse(task, string.format('the From: header must hold exactly one address, the sender %s',
        shown(envelope)), 'From: addresses ' .. #from)
  end
  if not rspamd_util.strequal_caseless(from[1].addr, envelope) then
    return refuse(task, string.format(
        'From: header address %s is not the sender address %s: %s must send with one of its own addresses in both',
        shown(from[1].addr), shown(envelope), login), shown(from[1].addr))
  end
end

rspamd_config:register_symbol({
  name = SYMBOL,
  type = 'prefilter',
  callback = check,
  score = 0.0,
  group = 'mailstead',
  flags = 'nostat',
  description = "A logged-in user's From: header is not the envelope sender (refused)",
})
