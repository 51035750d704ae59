//! The Lua scripts. Each runs atomically in Redis; every key one script touches shares the
//! channel's `{partition}` hash tag, so they also run in Redis Cluster.

/// Publish. KEYS: 1 stream, 2 meta, 3 idempotency key (the meta key again when none).
/// ARGV: 1 encoded publication, 2 history size (0 = no history), 3 history ttl ms,
/// 4 meta ttl ms, 5 epoch to use if the stream has none, 6 pub/sub channel,
/// 7 publish command (`publish` or `spublish`), 8 idempotency ttl ms (0 = no key),
/// 9 version (0 = no check), 10 version epoch. The channel's latest version lives in the meta
/// hash (`v`, `ve`), so it expires with the stream.
/// Returns `{suppressed (0|1: idempotent repeat, 2: stale version), "offset:epoch" or ""}`.
pub(crate) const PUBLISH: &str = r#"
local idem = ARGV[8] ~= '0'
if idem then
  local prev = redis.call('get', KEYS[3])
  if prev then return {1, prev} end
end
local size = tonumber(ARGV[2])
local result = ''
if size > 0 then
  local epoch = redis.call('hget', KEYS[2], 'e')
  if not epoch then
    epoch = ARGV[5]
    redis.call('del', KEYS[1])
    redis.call('hset', KEYS[2], 'e', epoch, 's', 0)
  end
  if ARGV[9] ~= '0' then
    local cur = redis.call('hmget', KEYS[2], 'v', 've')
    if cur[1] and (ARGV[10] == '' or ARGV[10] == (cur[2] or '')) and tonumber(ARGV[9]) <= tonumber(cur[1]) then
      return {2, (redis.call('hget', KEYS[2], 's') or '0') .. ':' .. epoch}
    end
    redis.call('hset', KEYS[2], 'v', ARGV[9], 've', ARGV[10])
  end
  local offset = redis.call('hincrby', KEYS[2], 's', 1)
  local id = string.format('%d-0', offset)
  local added = redis.pcall('xadd', KEYS[1], 'MAXLEN', size, id, 'd', ARGV[1])
  if type(added) == 'table' and added.err then
    -- The stream is ahead of its counter (Redis lost writes of the counter only): its
    -- entries cannot be trusted; start it over from this offset.
    redis.call('del', KEYS[1])
    redis.call('xadd', KEYS[1], 'MAXLEN', size, id, 'd', ARGV[1])
  end
  redis.call('pexpire', KEYS[1], ARGV[3])
  if tonumber(ARGV[4]) > 0 then redis.call('pexpire', KEYS[2], ARGV[4]) end
  result = string.format('%d', offset) .. ':' .. epoch
  redis.call(ARGV[7], ARGV[6], 'p' .. result .. ':' .. ARGV[1])
else
  redis.call(ARGV[7], ARGV[6], 'p0::' .. ARGV[1])
end
if idem then redis.call('set', KEYS[3], result, 'PX', ARGV[8]) end
return {0, result}
"#;

/// History read. KEYS: 1 stream, 2 meta. ARGV: 1 epoch to create the stream with ('' = do not
/// create: a missing stream answers `{0, ''}`), 2 meta ttl ms (0 = keep), 3 since offset
/// ('' = none), 4 since epoch ('' = any), 5 limit (-1 = all), 6 reverse ('1' = newest first).
/// Returns `{top, epoch}`, `{top, epoch, entries}` or `{top, epoch, 'epoch'}` when the since
/// epoch is not the stream's.
pub(crate) const HISTORY: &str = r#"
local epoch = redis.call('hget', KEYS[2], 'e')
if not epoch then
  if ARGV[1] == '' then return {0, ''} end
  epoch = ARGV[1]
  redis.call('del', KEYS[1])
  redis.call('hset', KEYS[2], 'e', epoch, 's', 0)
end
local top = tonumber(redis.call('hget', KEYS[2], 's') or '0')
if tonumber(ARGV[2]) > 0 then redis.call('pexpire', KEYS[2], ARGV[2]) end
if ARGV[4] ~= '' and ARGV[4] ~= epoch then return {top, epoch, 'epoch'} end
local limit = tonumber(ARGV[5])
if limit == 0 then return {top, epoch} end
local entries
if ARGV[6] == '1' then
  local hi = '+'
  if ARGV[3] ~= '' then hi = '(' .. ARGV[3] .. '-0' end
  if limit > 0 then
    entries = redis.call('xrevrange', KEYS[1], hi, '-', 'COUNT', limit)
  else
    entries = redis.call('xrevrange', KEYS[1], hi, '-')
  end
else
  local lo = '-'
  if ARGV[3] ~= '' then lo = '(' .. ARGV[3] .. '-0' end
  if limit > 0 then
    entries = redis.call('xrange', KEYS[1], lo, '+', 'COUNT', limit)
  else
    entries = redis.call('xrange', KEYS[1], lo, '+')
  end
end
return {top, epoch, entries}
"#;

/// Presence add/refresh. KEYS: 1 hash (client → info), 2 sorted set (client → expiry ms).
/// ARGV: 1 client id, 2 encoded info, 3 ttl ms.
pub(crate) const PRESENCE_ADD: &str = r#"
local t = redis.call('time')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('zadd', KEYS[2], now + tonumber(ARGV[3]), ARGV[1])
redis.call('hset', KEYS[1], ARGV[1], ARGV[2])
redis.call('pexpire', KEYS[1], ARGV[3])
redis.call('pexpire', KEYS[2], ARGV[3])
return 1
"#;

/// Presence read: drops expired entries, returns the infos. KEYS: 1 hash, 2 sorted set.
pub(crate) const PRESENCE_GET: &str = r#"
local t = redis.call('time')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local expired = redis.call('zrangebyscore', KEYS[2], '-inf', now)
local i = 1
while i <= #expired do
  local chunk = {}
  for j = i, math.min(i + 999, #expired) do chunk[#chunk + 1] = expired[j] end
  redis.call('hdel', KEYS[1], unpack(chunk))
  i = i + 1000
end
if #expired > 0 then redis.call('zremrangebyscore', KEYS[2], '-inf', now) end
return redis.call('hvals', KEYS[1])
"#;

/// Presence remove. KEYS: 1 hash, 2 sorted set. ARGV: 1 client id.
pub(crate) const PRESENCE_REMOVE: &str = r#"
redis.call('hdel', KEYS[1], ARGV[1])
redis.call('zrem', KEYS[2], ARGV[1])
return 1
"#;

/// Cursor save: only forward within an epoch. KEYS: 1 cursor. ARGV: 1 offset, 2 epoch, 3 ttl ms.
pub(crate) const CURSOR_SAVE: &str = r#"
local cur = redis.call('get', KEYS[1])
if cur then
  local sep = string.find(cur, ':', 1, true)
  if sep then
    local off = tonumber(string.sub(cur, 1, sep - 1))
    local ep = string.sub(cur, sep + 1)
    if ep == ARGV[2] and off and off >= tonumber(ARGV[1]) then
      redis.call('pexpire', KEYS[1], ARGV[3])
      return 0
    end
  end
end
redis.call('set', KEYS[1], ARGV[1] .. ':' .. ARGV[2], 'PX', ARGV[3])
return 1
"#;
