"""The Lua scripts that keep limit state in Redis: each runs atomically on the server (EVALSHA), so
an admission — every scope's windows, in-flight leases and escalation — is one round trip.

Per scope (a key or an account) the keys are, all under one hash tag (one Redis Cluster slot):

    req   hash        second → sequences admitted               (rpm: the last minute)
    tok   hash        second → tokens admitted                  (tpm: the last minute)
    lease sorted set  lease slot → expiry time                  (in flight; a dead replica's expire)
    out   hash        minute → output tokens sent               (escalation: the last hour)
    esc   integer     escalated until (ms)

Windows are buckets, not one entry per request, and a scope writes only the keys its limits read:
whatever the request rate, a scope holds at most 60 + 60 + 61 fields and one slot per allowed
in-flight sequence, so no request pattern fills the store. A bucket leaves its window a whole
second (minute) after it opened: the limits are exact to that resolution.

Times are milliseconds of the Redis server's clock (``TIME``), so replicas with skewed clocks agree;
tests pass ``now`` explicitly.
"""

from __future__ import annotations

KEYS_PER_SCOPE = ("req", "tok", "lease", "out", "esc")
REFUSED = {1: "concurrent", 2: "rpm", 3: "tpm"}

_COMMON = """
local SECOND, MINUTE, HOUR = 1000, 60000, 3600000
local K = 5
local function clock(arg)
  if arg ~= '' then return tonumber(arg) end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
-- the sum of a bucketed window's fields newer than oldest (older ones are deleted) and its oldest bucket
local function window(key, oldest)
  local fields = redis.call('HGETALL', key)
  local total, first = 0, nil
  for j = 1, #fields, 2 do
    local b = tonumber(fields[j])
    if b <= oldest then
      redis.call('HDEL', key, fields[j])
    else
      total = total + tonumber(fields[j + 1])
      if first == nil or b < first then first = b end
    end
  end
  return total, first
end
-- a per-second window of the last minute that amount more would take past limit: its sum and the ms
-- until its oldest bucket leaves; nil when the amount fits
local function over_minute(key, now, amount, limit)
  local used, first = window(key, math.floor(now / SECOND) - 60)
  if used + amount <= limit then return nil end
  local wait = MINUTE
  if first then wait = (first + 60) * SECOND - now end
  return used, wait
end
local function add(key, bucket, n, ttl)
  redis.call('HINCRBY', key, bucket, n)
  redis.call('PEXPIRE', key, ttl)
end
local function take_back(key, bucket, n)
  if redis.call('HEXISTS', key, bucket) == 1 and redis.call('HINCRBY', key, bucket, -n) <= 0 then
    redis.call('HDEL', key, bucket)
  end
end
local function slot(lease, j)
  if j == 1 then return lease end
  return lease .. '#' .. j
end
local function charge(out_key, now, n)
  if n > 0 then add(out_key, math.floor(now / MINUTE), n, HOUR + 2 * MINUTE) end
end
"""

# KEYS: K per scope (KEYS_PER_SCOPE). ARGV: now ('' = server time), lease id, lease ms, budget,
# weight, then 5 per scope: rpm, tpm, max_concurrent, escalation tokens_per_hour, decay ms (0: none).
# Returns {0, scope (1-based), kind (REFUSED), limit, retry ms, used} or
# {1, now, escalated-until of each scope (0: none)}.
ADMIT = (
    _COMMON
    + """
local now = clock(ARGV[1])
local lease, lease_ms, budget, weight = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local second = math.floor(now / SECOND)
local n = #KEYS / K
local reply = {1, now}
for i = 0, n - 1 do
  local k, a = i * K, 5 + i * 5
  local threshold, decay = tonumber(ARGV[a + 4]), tonumber(ARGV[a + 5])
  local until_ms = tonumber(redis.call('GET', KEYS[k + 5]) or '0')
  if threshold > 0 then
    local volume = window(KEYS[k + 4], math.floor(now / MINUTE) - 60)
    if volume > threshold then
      until_ms = math.max(until_ms, now + decay)
      redis.call('SET', KEYS[k + 5], until_ms, 'PX', until_ms - now)
    end
  end
  reply[3 + i] = until_ms
end
for i = 0, n - 1 do
  local k, a = i * K, 5 + i * 5
  local rpm, tpm, concurrent = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3])
  if concurrent > 0 then
    redis.call('ZREMRANGEBYSCORE', KEYS[k + 3], '-inf', now)
    if redis.call('ZCARD', KEYS[k + 3]) + weight > concurrent then
      return {0, i + 1, 1, concurrent, 1000, 0}
    end
  end
  if rpm > 0 then
    local count, wait = over_minute(KEYS[k + 1], now, weight, rpm)
    if count then return {0, i + 1, 2, rpm, wait, count} end
  end
  if tpm > 0 then
    local used, wait = over_minute(KEYS[k + 2], now, budget, tpm)
    if used then return {0, i + 1, 3, tpm, wait, used} end
  end
end
for i = 0, n - 1 do
  local k, a = i * K, 5 + i * 5
  if tonumber(ARGV[a + 1]) > 0 then add(KEYS[k + 1], second, weight, 2 * MINUTE) end
  if tonumber(ARGV[a + 2]) > 0 then add(KEYS[k + 2], second, budget, 2 * MINUTE) end
  if tonumber(ARGV[a + 3]) > 0 then
    for j = 1, weight do redis.call('ZADD', KEYS[k + 3], now + lease_ms, slot(lease, j)) end
    redis.call('PEXPIRE', KEYS[k + 3], 2 * lease_ms)
  end
end
return reply
"""
)

# KEYS: K per scope. ARGV: now, output tokens, then 1 per scope: '1' if it escalates (0: no window).
CHARGE = (
    _COMMON
    + """
local now, output = clock(ARGV[1]), tonumber(ARGV[2])
for i = 0, #KEYS / K - 1 do
  if ARGV[3 + i] == '1' then charge(KEYS[i * K + 4], now, output) end
end
return 1
"""
)

# KEYS: K per scope. ARGV: now, lease id, output tokens not charged yet, budget, weight, refund ('1':
# uncount the request), admission time (ms), then 1 per scope: '1' if it escalates.
RELEASE = (
    _COMMON
    + """
local now = clock(ARGV[1])
local lease, output, budget, weight = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local admitted = math.floor(tonumber(ARGV[7]) / SECOND)
for i = 0, #KEYS / K - 1 do
  local k = i * K
  for j = 1, weight do redis.call('ZREM', KEYS[k + 3], slot(lease, j)) end
  if ARGV[8 + i] == '1' then charge(KEYS[k + 4], now, output) end
  if ARGV[6] == '1' then
    take_back(KEYS[k + 1], admitted, weight)
    take_back(KEYS[k + 2], admitted, budget)
  end
end
return 1
"""
)

# KEYS: lease sets; ARGV: now, lease ms, then the lease id and weight for each key. XX: a lease
# that expired or was released is never brought back.
RENEW = (
    _COMMON
    + """
local now = clock(ARGV[1])
local lease_ms = tonumber(ARGV[2])
for i, key in ipairs(KEYS) do
  for j = 1, tonumber(ARGV[2 * i + 2]) do
    redis.call('ZADD', key, 'XX', now + lease_ms, slot(ARGV[2 * i + 1], j))
  end
  redis.call('PEXPIRE', key, 2 * lease_ms)
end
return 1
"""
)
