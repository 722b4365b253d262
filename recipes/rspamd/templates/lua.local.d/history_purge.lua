-- Mailstead: delete the scan history that earlier versions kept in redis.
--
-- history_redis is off (local.d/history_redis.conf), but a list it filled
-- (rs_history<host name>[_zst], up to 200 messages with their subjects,
-- senders and recipients, never expiring) would stay in redis and in every
-- backup of it. The primary controller deletes every such key when it starts,
-- retrying every 10 s while redis is not reachable yet.

local lua_redis = require "lua_redis"
local rspamd_logger = require "rspamd_logger"

local N = 'mailstead_history_purge'
local RETRY = 10.0

local PURGE = [[
local deleted, cursor = 0, '0'
repeat
  local page = redis.call('SCAN', cursor, 'MATCH', 'rs_history*', 'COUNT', 1000)
  cursor = page[1]
  for _, key in ipairs(page[2]) do
    redis.call('DEL', key)
    deleted = deleted + 1
  end
until cursor == '0'
return deleted
]]

local redis_params = lua_redis.parse_redis_server(N)

if redis_params then
  rspamd_config:add_on_load(function(cfg, ev_base, worker)
    if not worker:is_primary_controller() then
      return
    end
    local done = false
    rspamd_config:add_periodic(ev_base, 0.0, function()
      if done then
        return false
      end
      lua_redis.redis_make_request_taskless(ev_base, cfg, redis_params, nil, true,
          function(err, deleted)
            if err then
              rspamd_logger.infox(cfg, '%s: redis not reachable yet (%s); trying again in %s s', N, err, RETRY)
            else
              done = true
              if tonumber(deleted) and tonumber(deleted) > 0 then
                rspamd_logger.messagex(cfg, '%s: deleted %s scan history key(s) of earlier versions', N, deleted)
              end
            end
          end,
          'EVAL', { PURGE, '0' })
      return RETRY
    end)
  end)
end
