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

/// The read half of [`HISTORY`] (and [`MAP_STREAM`]): `epoch` and `top` are set.
macro_rules! history_read {
    () => {
        r#"
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
"#
    };
}

/// History read. KEYS: 1 stream, 2 meta. ARGV: 1 epoch to create the stream with ('' = do not
/// create: a missing stream answers `{0, ''}`), 2 meta ttl ms (0 = keep), 3 since offset
/// ('' = none), 4 since epoch ('' = any), 5 limit (-1 = all), 6 reverse ('1' = newest first).
/// Returns `{top, epoch}`, `{top, epoch, entries}` or `{top, epoch, 'epoch'}` when the since
/// epoch is not the stream's.
pub(crate) const HISTORY: &str = concat!(
    r#"
local epoch = redis.call('hget', KEYS[2], 'e')
if not epoch then
  if ARGV[1] == '' then return {0, ''} end
  epoch = ARGV[1]
  redis.call('del', KEYS[1])
  redis.call('hset', KEYS[2], 'e', epoch, 's', 0)
end
local top = tonumber(redis.call('hget', KEYS[2], 's') or '0')
if tonumber(ARGV[2]) > 0 then redis.call('pexpire', KEYS[2], ARGV[2]) end
"#,
    history_read!()
);

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

/// What every map script shares. KEYS: 1 stream, 2 meta (epoch `e`, top `s`, the retention the
/// last write used: `rs` stream size, `rt` stream ttl ms, `mt` meta ttl ms, `kt` key ttl ms),
/// 3 state (key → `<offset>:<encoded publication>`), 4 key order (sorted set, score 0, read
/// by lex range), 5 key expiries (key → unix ms), 6 versions (key → `<version>:<epoch>`),
/// 7 the partition's channels with expiring keys (channel → earliest expiry unix ms).
///
/// The epoch and the state live and die together: a channel whose meta is gone starts over
/// (`fresh`), and while it holds keys its meta does not expire before them (`retain`), so a
/// state entry's offset always belongs to the channel's epoch.
macro_rules! map_lib {
    () => {
        r#"
local function fresh(epoch)
  redis.call('del', KEYS[1], KEYS[3], KEYS[4], KEYS[5], KEYS[6])
  redis.call('hset', KEYS[2], 'e', epoch, 's', 0)
end
-- A read keeps the channel at least meta_ttl longer: the meta and, with it, the state (never
-- shortening a life, never giving one to what has none).
local function extend(meta_ttl)
  if meta_ttl <= 0 then return end
  for i = 2, 6 do
    local left = redis.call('pttl', KEYS[i])
    if left >= 0 and left < meta_ttl then redis.call('pexpire', KEYS[i], meta_ttl) end
  end
end
-- The channel's epoch and top; a channel without meta starts over under epoch `new`, living
-- meta_ttl ('' = do not create: nil).
local function open(new, meta_ttl)
  local epoch = redis.call('hget', KEYS[2], 'e')
  if not epoch then
    if new == '' then return nil, 0 end
    epoch = new
    fresh(epoch)
    if meta_ttl > 0 then redis.call('pexpire', KEYS[2], meta_ttl) end
  else
    extend(meta_ttl)
  end
  return epoch, tonumber(redis.call('hget', KEYS[2], 's') or '0')
end
local function retain(meta_ttl, key_ttl)
  if redis.call('hlen', KEYS[3]) == 0 then
    if meta_ttl > 0 then redis.call('pexpire', KEYS[2], meta_ttl) else redis.call('persist', KEYS[2]) end
  elseif key_ttl > 0 and meta_ttl > 0 then
    local t = math.max(meta_ttl, key_ttl + 60000)
    for i = 2, 6 do redis.call('pexpire', KEYS[i], t) end
  else
    for i = 2, 6 do redis.call('persist', KEYS[i]) end
  end
end
local function append(blob, size, ttl)
  local offset = redis.call('hincrby', KEYS[2], 's', 1)
  local id = string.format('%d-0', offset)
  local added = redis.pcall('xadd', KEYS[1], 'MAXLEN', size, id, 'd', blob)
  if type(added) == 'table' and added.err then
    redis.call('del', KEYS[1])
    redis.call('xadd', KEYS[1], 'MAXLEN', size, id, 'd', blob)
  end
  redis.call('pexpire', KEYS[1], ttl)
  return string.format('%d', offset)
end
local function unset(key)
  redis.call('hdel', KEYS[3], key)
  redis.call('zrem', KEYS[4], key)
  redis.call('zrem', KEYS[5], key)
  redis.call('hdel', KEYS[6], key)
end
local function varint(n)
  local s = ''
  while n >= 128 do
    s = s .. string.char(n % 128 + 128)
    n = math.floor(n / 128)
  end
  return s .. string.char(n)
end
-- A removal as the codec stores publications (protobuf: time 4, key 7, removed 8).
local function removal(key, now)
  return '\32' .. varint(now) .. '\58' .. varint(#key) .. key .. '\64\1'
end
"#
    };
}

/// Map write. KEYS: 1–7 as [`map_lib`], 8 idempotency key (the meta key again when none).
/// ARGV: 1 encoded publication, 2 stream size, 3 stream ttl ms, 4 meta ttl ms, 5 epoch to use
/// if the channel has none, 6 pub/sub channel, 7 publish command, 8 idempotency ttl ms (0 = no
/// key), 9 version (0 = no check), 10 version epoch, 11 key, 12 removal (`1`), 13 key mode
/// (`` | `new` | `exists`), 14 key ttl ms (0 = none), 15 now unix ms, 16 most keys, 17 channel.
/// Returns `{0, "offset:epoch"}` written, `{1, position}` idempotent repeat, `{2, top}` stale
/// version, `{3, top}` key mode, `{4, ''}` too many keys.
pub(crate) const MAP_PUBLISH: &str = concat!(
    map_lib!(),
    r#"
local epoch, offset0 = open(ARGV[5], tonumber(ARGV[4]))
local idem = ARGV[8] ~= '0'
if idem then
  -- A result of an earlier epoch (the map was cleared or lost since) does not answer.
  local prev = redis.call('get', KEYS[8])
  if prev and string.sub(prev, string.find(prev, ':', 1, true) + 1) == epoch then
    return {1, prev}
  end
end
local top = string.format('%d', offset0) .. ':' .. epoch
local key = ARGV[11]
local removed = ARGV[12] == '1'
local exists = redis.call('hexists', KEYS[3], key) == 1
local mode = ARGV[13]
if (mode == 'new' and exists) or (mode == 'exists' and not exists) or (removed and not exists) then
  return {3, top}
end
local version = tonumber(ARGV[9])
if exists and version > 0 then
  local cur = redis.call('hget', KEYS[6], key)
  if cur then
    local c = string.find(cur, ':', 1, true)
    local v = tonumber(string.sub(cur, 1, c - 1))
    if v > 0 and (ARGV[10] == '' or ARGV[10] == string.sub(cur, c + 1)) and version <= v then
      return {2, top}
    end
  end
end
if not exists and not removed and redis.call('hlen', KEYS[3]) >= tonumber(ARGV[16]) then
  return {4, ''}
end
local key_ttl = tonumber(ARGV[14])
redis.call('hset', KEYS[2], 'rs', ARGV[2], 'rt', ARGV[3], 'mt', ARGV[4], 'kt', ARGV[14])
local offset = append(ARGV[1], tonumber(ARGV[2]), ARGV[3])
if removed then
  unset(key)
else
  redis.call('hset', KEYS[3], key, offset .. ':' .. ARGV[1])
  redis.call('zadd', KEYS[4], 0, key)
  if version > 0 then
    redis.call('hset', KEYS[6], key, ARGV[9] .. ':' .. ARGV[10])
  else
    redis.call('hdel', KEYS[6], key)
  end
  if key_ttl > 0 then
    local at = tonumber(ARGV[15]) + key_ttl
    redis.call('zadd', KEYS[5], at, key)
    redis.call('zadd', KEYS[7], 'LT', at, ARGV[17])
  else
    redis.call('zrem', KEYS[5], key)
  end
end
retain(tonumber(ARGV[4]), key_ttl)
local pos = offset .. ':' .. epoch
redis.call(ARGV[7], ARGV[6], 'p' .. pos .. ':' .. ARGV[1])
if idem then redis.call('set', KEYS[8], pos, 'PX', ARGV[8]) end
return {0, pos}
"#
);

/// Map state page. KEYS: 1–7 as [`map_lib`]. ARGV: 1 epoch to use if the channel has none,
/// 2 meta ttl ms, 3 cursor (`` = from the start), 4 limit, 5 `1` = only the key ARGV 6,
/// 7 revision offset (`` = the top), 8 revision epoch.
/// Returns `{top, epoch, 1, cursor, entries...}` (a missing entry is nil) or `{top, epoch, 0}`
/// when the revision is not the channel's.
pub(crate) const MAP_STATE: &str = concat!(
    map_lib!(),
    r#"
local epoch, top = open(ARGV[1], tonumber(ARGV[2]))
if ARGV[7] ~= '' then
  if ARGV[8] ~= epoch or tonumber(ARGV[7]) > top then return {top, epoch, 0} end
  top = tonumber(ARGV[7])
end
if ARGV[5] == '1' then
  return {top, epoch, 1, '', redis.call('hget', KEYS[3], ARGV[6])}
end
local limit = tonumber(ARGV[4])
local lo = '-'
if ARGV[3] ~= '' then lo = '(' .. ARGV[3] end
local keys = redis.call('zrangebylex', KEYS[4], lo, '+', 'LIMIT', 0, limit + 1)
local cursor = ''
if #keys > limit then
  cursor = keys[limit]
  keys[limit + 1] = nil
end
local out = {top, epoch, 1, cursor}
for i = 1, #keys do out[4 + i] = redis.call('hget', KEYS[3], keys[i]) end
return out
"#
);

/// Map change stream read: as [`HISTORY`] (same ARGV and replies), but a channel created here
/// starts over whole and a read only ever extends the meta's life.
pub(crate) const MAP_STREAM: &str = concat!(
    map_lib!(),
    r#"
local epoch, top = open(ARGV[1], tonumber(ARGV[2]))
if not epoch then return {0, ''} end
"#,
    history_read!()
);

/// Map key expiry extension. KEYS: 1–7 as [`map_lib`]. ARGV: 1 key ttl ms (0 = none), 2 now
/// unix ms, 3 meta ttl ms, 4... keys. Returns the keys that are not there.
pub(crate) const MAP_TOUCH: &str = concat!(
    map_lib!(),
    r#"
local kt = tonumber(ARGV[1])
local missing = {}
for i = 4, #ARGV do
  local key = ARGV[i]
  if redis.call('hexists', KEYS[3], key) == 0 then
    missing[#missing + 1] = key
  elseif kt > 0 then
    redis.call('zadd', KEYS[5], 'XX', tonumber(ARGV[2]) + kt, key)
  end
end
if kt > 0 and redis.call('hlen', KEYS[3]) > 0 then retain(tonumber(ARGV[3]), kt) end
return missing
"#
);

/// Map expiry sweep of one channel: removes keys whose time has come, each removal a stream
/// entry published like any write, and reschedules the channel in its partition's set.
/// KEYS: 1–7 as [`map_lib`]. ARGV: 1 now unix ms, 2 most removals, 3 channel, 4 pub/sub
/// channel, 5 publish command. Returns the number removed.
pub(crate) const MAP_EXPIRE: &str = concat!(
    map_lib!(),
    r#"
local epoch = redis.call('hget', KEYS[2], 'e')
if not epoch then
  redis.call('zrem', KEYS[7], ARGV[3])
  return 0
end
local r = redis.call('hmget', KEYS[2], 'rs', 'rt', 'mt', 'kt')
local size = tonumber(r[1] or '100')
local ttl = r[2] or '60000'
local now = tonumber(ARGV[1])
local due = redis.call('zrangebyscore', KEYS[5], '-inf', now, 'LIMIT', 0, tonumber(ARGV[2]))
local n = 0
for _, key in ipairs(due) do
  if redis.call('hexists', KEYS[3], key) == 1 then
    unset(key)
    local blob = removal(key, now)
    local offset = append(blob, size, ttl)
    redis.call(ARGV[5], ARGV[4], 'p' .. offset .. ':' .. epoch .. ':' .. blob)
    n = n + 1
  else
    redis.call('zrem', KEYS[5], key)
  end
end
local first = redis.call('zrange', KEYS[5], 0, 0, 'WITHSCORES')
if first[2] then
  redis.call('zadd', KEYS[7], first[2], ARGV[3])
else
  redis.call('zrem', KEYS[7], ARGV[3])
end
if n > 0 then retain(tonumber(r[3] or '0'), tonumber(r[4] or '0')) end
return n
"#
);

/// Map clear: every key and the stream go, the channel starts over under a new epoch and the
/// nodes are told (`c0:<epoch>`: their subscribers' positions are in the old one).
/// KEYS: 1–7 as [`map_lib`]. ARGV: 1 new epoch, 2 channel, 3 pub/sub channel, 4 publish
/// command.
pub(crate) const MAP_CLEAR: &str = concat!(
    map_lib!(),
    r#"
local mt = tonumber(redis.call('hget', KEYS[2], 'mt') or '300000')
redis.call('del', KEYS[2])
fresh(ARGV[1])
if mt > 0 then redis.call('pexpire', KEYS[2], mt) end
redis.call('zrem', KEYS[7], ARGV[2])
redis.call(ARGV[4], ARGV[3], 'c0:' .. ARGV[1])
return 1
"#
);
