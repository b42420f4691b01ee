"""The Lua scripts that keep limit state in Redis: each runs atomically on the server (EVALSHA), so
an admission — every scope's windows, in-flight leases and escalation — is one round trip.

Per scope (a key or an account) the keys are, all under one hash tag (one Redis Cluster slot):

    req   sorted set  lease id → admission time                (requests, last minute)
    tok   sorted set  "lease:tokens" → admission time          (token budgets, last minute)
    tsum  integer     sum of tok                               (kept alongside, so no scan)
    lease sorted set  lease id → expiry time                   (in flight; a dead replica's expire)
    out   sorted set  "lease:tokens" → release time            (output volume, last hour)
    osum  integer     sum of out
    esc   integer     escalated until (ms)

Times are milliseconds of the Redis server's clock (``TIME``), so replicas with skewed clocks agree;
tests pass ``now`` explicitly. A sum and its set are written together with the same TTL.
"""

from __future__ import annotations

KEYS_PER_SCOPE = ("req", "tok", "tsum", "lease", "out", "osum", "esc")
REFUSED = {1: "concurrent", 2: "rpm", 3: "tpm"}

_COMMON = """
local MINUTE, HOUR = 60000, 3600000
local function clock(arg)
  if arg ~= '' then return tonumber(arg) end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
-- drop entries of a counted window at or before horizon; returns the window's remaining sum
local function expire_sum(zkey, skey, horizon)
  local old = redis.call('ZRANGEBYSCORE', zkey, '-inf', horizon)
  local total = tonumber(redis.call('GET', skey) or '0')
  if #old > 0 then
    for _, member in ipairs(old) do total = total - tonumber(string.match(member, ':(%d+)$')) end
    redis.call('ZREMRANGEBYSCORE', zkey, '-inf', horizon)
    if total <= 0 or redis.call('ZCARD', zkey) == 0 then
      redis.call('DEL', skey)
      total = 0
    else
      redis.call('SET', skey, total, 'KEEPTTL')
    end
  end
  return total
end
local function add_counted(zkey, skey, now, member, n, ttl)
  redis.call('ZADD', zkey, now, member)
  redis.call('INCRBY', skey, n)
  redis.call('PEXPIRE', zkey, ttl)
  redis.call('PEXPIRE', skey, ttl)
end
"""

# KEYS: 7 per scope (KEYS_PER_SCOPE). ARGV: now ('' = server time), lease id, lease ms, budget, then
# 5 per scope: rpm, tpm, max_concurrent, escalation tokens_per_hour, decay ms (0: none).
# Returns {0, scope (1-based), kind (REFUSED), limit, retry ms, used} or
# {1, now, escalated-until of each scope (0: none)}.
ADMIT = (
    _COMMON
    + """
local now = clock(ARGV[1])
local lease, lease_ms, budget = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local n = #KEYS / 7
local reply = {1, now}
for i = 0, n - 1 do
  local k, a = i * 7, 4 + i * 5
  local threshold, decay = tonumber(ARGV[a + 4]), tonumber(ARGV[a + 5])
  local until_ms = tonumber(redis.call('GET', KEYS[k + 7]) or '0')
  if threshold > 0 and expire_sum(KEYS[k + 5], KEYS[k + 6], now - HOUR) > threshold then
    until_ms = math.max(until_ms, now + decay)
    redis.call('SET', KEYS[k + 7], until_ms, 'PX', until_ms - now)
  end
  reply[3 + i] = until_ms
end
for i = 0, n - 1 do
  local k, a = i * 7, 4 + i * 5
  local rpm, tpm, concurrent = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3])
  redis.call('ZREMRANGEBYSCORE', KEYS[k + 1], '-inf', now - MINUTE)
  local used = expire_sum(KEYS[k + 2], KEYS[k + 3], now - MINUTE)
  redis.call('ZREMRANGEBYSCORE', KEYS[k + 4], '-inf', now)
  if concurrent > 0 and redis.call('ZCARD', KEYS[k + 4]) >= concurrent then
    return {0, i + 1, 1, concurrent, 1000, 0}
  end
  local count = redis.call('ZCARD', KEYS[k + 1])
  if rpm > 0 and count >= rpm then
    local first = redis.call('ZRANGE', KEYS[k + 1], 0, 0, 'WITHSCORES')
    return {0, i + 1, 2, rpm, tonumber(first[2]) + MINUTE - now, count}
  end
  if tpm > 0 and used + budget > tpm then
    local first = redis.call('ZRANGE', KEYS[k + 2], 0, 0, 'WITHSCORES')
    local wait = MINUTE
    if #first > 0 then wait = tonumber(first[2]) + MINUTE - now end
    return {0, i + 1, 3, tpm, wait, used}
  end
end
for i = 0, n - 1 do
  local k = i * 7
  redis.call('ZADD', KEYS[k + 1], now, lease)
  redis.call('PEXPIRE', KEYS[k + 1], 2 * MINUTE)
  add_counted(KEYS[k + 2], KEYS[k + 3], now, lease .. ':' .. budget, budget, 2 * MINUTE)
  redis.call('ZADD', KEYS[k + 4], now + lease_ms, lease)
  redis.call('PEXPIRE', KEYS[k + 4], 2 * lease_ms)
end
return reply
"""
)

# KEYS: 7 per scope. ARGV: now, lease id, output tokens, budget, refund ('1': uncount the request).
RELEASE = (
    _COMMON
    + """
local now = clock(ARGV[1])
local lease, output, budget = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
for i = 0, #KEYS / 7 - 1 do
  local k = i * 7
  redis.call('ZREM', KEYS[k + 4], lease)
  if output > 0 then add_counted(KEYS[k + 5], KEYS[k + 6], now, lease .. ':' .. output, output, HOUR + MINUTE) end
  if ARGV[5] == '1' then
    redis.call('ZREM', KEYS[k + 1], lease)
    if redis.call('ZREM', KEYS[k + 2], lease .. ':' .. budget) == 1 then
      if redis.call('DECRBY', KEYS[k + 3], budget) <= 0 then redis.call('DEL', KEYS[k + 3]) end
    end
  end
end
return 1
"""
)

# KEYS: lease sets; ARGV: now, lease ms, then the lease id for each key. XX: a lease that expired
# or was released is never brought back.
RENEW = (
    _COMMON
    + """
local now = clock(ARGV[1])
local lease_ms = tonumber(ARGV[2])
for i, key in ipairs(KEYS) do
  redis.call('ZADD', key, 'XX', now + lease_ms, ARGV[i + 2])
  redis.call('PEXPIRE', key, 2 * lease_ms)
end
return 1
"""
)
