"""The Lua scripts of the Redis store: every change of a job's state is one atomic script, so two
replicas (or a replica and a lease call) can never hand one job to two workers, nor requeue it
twice. The order they keep is the one ``store.py`` describes (``fair_tag`` there, in Lua here).

Keys, all under the configured prefix P (a single Redis; Redis Cluster is not supported):

    P:q:<queue>:<c>   zset   waiting job ids of priority class c, scored by fair tag
    P:vt:<queue>:<c>  hash   the class's virtual clock V, and each tenant's latest tag (t:<tenant>)
    P:l:<queue>       zset   leased job ids, scored by lease deadline (ms since the epoch)
    P:wl:<worker>     set    job ids the worker holds
    P:queues          set    every queue key, for the expiry sweep
    P:j:<job>         hash   one job: queue, owner, job (JSON), tags, n, tok, cls, tag, att, lease,
                             worker, st, res
    P:r:<replica>     list   ids of answered jobs whose owner is <replica> (its client waits)
    P:alive:<rep>     string present while replica <rep> runs (refreshed every second)

A job's ``st`` is ``w`` (waiting), ``l`` (leased) or ``d`` (answered: ``res`` holds the outcome
until its owner takes it: ``D`` + a results frame, ``F`` + a JSON failure, or ``X<attempts>
<reason>`` when it used its last attempt). A job whose owner replica is gone is dropped, not
computed. Every script gets P as ARGV[1]. Numbers go back to Redis through ``num``: Lua's own
conversion keeps 14 digits, too few for tags.
"""

from __future__ import annotations

_PRELUDE = """
local P = ARGV[1]
local function k(...) return table.concat({P, ...}, ':') end
local function num(x) return string.format('%.17g', x) end
-- Redis's clock, in ms: every replica's leases are timed by the same one, whatever its own says.
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local alive_cache = {}
local function alive(owner)
  if not owner then return false end
  local a = alive_cache[owner]
  if a == nil then
    a = redis.call('EXISTS', k('alive', owner)) == 1
    alive_cache[owner] = a
  end
  return a
end
-- Store a job's outcome and tell its owner; both expire if the owner never takes it.
local function deliver(id, owner, payload, ttl)
  redis.call('HSET', k('j', id), 'st', 'd', 'res', payload, 'lease', '', 'worker', '')
  redis.call('PEXPIRE', k('j', id), ttl)
  local r = k('r', owner)
  redis.call('RPUSH', r, id)
  redis.call('PEXPIRE', r, ttl)
end
local function unlease(id, queue, worker)
  redis.call('ZREM', k('l', queue), id)
  if worker and worker ~= '' then redis.call('SREM', k('wl', worker), id) end
end
-- A job whose lease ended unanswered: back to the front of its class (telling waiting leases),
-- or failed for good if that was its last attempt. 1 requeued, 2 failed, 3 dropped (owner gone).
local function requeue_or_fail(id, max_attempts, reason, ttl)
  local j = k('j', id)
  local f = redis.call('HMGET', j, 'queue', 'owner', 'att', 'cls', 'tag', 'n')
  if not alive(f[2]) then
    redis.call('DEL', j)
    return 3
  end
  local attempts = tonumber(f[3])
  if attempts >= max_attempts then
    deliver(id, f[2], 'X' .. attempts .. ' ' .. reason, ttl)
    return 2
  end
  local q = k('q', f[1], f[4])
  local tag = tonumber(f[5])
  local first = redis.call('ZRANGE', q, 0, 0, 'WITHSCORES')
  if first[2] then tag = math.min(tag, tonumber(first[2])) end
  redis.call('HSET', j, 'st', 'w', 'lease', '', 'worker', '', 'tag', num(tag))
  redis.call('ZADD', q, num(tag), id)
  redis.call('PUBLISH', k('events'), 'jobs ' .. f[6] .. ' ' .. f[1])
  redis.call('PUBLISH', k('events'), 'class ' .. f[4] .. ' ' .. f[1])
  return 1
end
local function tally(counts, outcome)
  if outcome == 1 then counts[1] = counts[1] + 1 elseif outcome == 2 then counts[2] = counts[2] + 1 end
end
"""

# ARGV: P, queue, owner, front ('1': the jobs go first, Redis lost them), then per job: id, n,
# tok, tags, job, cls, tenant, weight, w (the columns its answer must have). Tags each job fairly, queues it, and publishes
# "jobs <inputs> <queue>" for waiting leases and "class <cls> <queue>" (all of one request's jobs are of one class;
# an event of its own, as replicas of the previous version read everything after "jobs <inputs> " as the queue).
ENQUEUE = (
    _PRELUDE
    + """
local queue, owner, front = ARGV[2], ARGV[3], ARGV[4] == '1'
local inputs = 0
for i = 5, #ARGV, 9 do
  local id, tok, cls, tenant = ARGV[i], tonumber(ARGV[i + 2]), ARGV[i + 5], 't:' .. ARGV[i + 6]
  local vt = k('vt', queue, cls)
  local tag = 0
  if not front then
    local f = redis.call('HMGET', vt, 'V', tenant)
    tag = math.max(tonumber(f[1] or 0), tonumber(f[2] or 0)) + math.max(tok, 1) / tonumber(ARGV[i + 7])
    redis.call('HSET', vt, tenant, num(tag))
  end
  redis.call('HSET', k('j', id), 'queue', queue, 'owner', owner, 'st', 'w', 'lease', '', 'worker', '', 'att', 0,
             'n', ARGV[i + 1], 'tok', tok, 'tags', ARGV[i + 3], 'job', ARGV[i + 4], 'cls', cls, 'tag', num(tag),
             'w', ARGV[i + 8])
  redis.call('ZADD', k('q', queue, cls), num(tag), id)
  inputs = inputs + tonumber(ARGV[i + 1])
end
redis.call('SADD', k('queues'), queue)
redis.call('PUBLISH', k('events'), 'jobs ' .. inputs .. ' ' .. queue)
redis.call('PUBLISH', k('events'), 'class ' .. ARGV[10] .. ' ' .. queue)
"""
)

# ARGV: P, queue, (unused: leases are timed by Redis's clock), hold_ms, max_items, max_tokens (0: none), min_inputs, worker tags
# (JSON list), lease id base, worker id, scan limit, number of classes, then per class the
# call's token budget when its first job is of that class (0: none; store.Ask.budgets): a bounded
# call holds no job of a class below its first's.
# Takes nothing unless at least min_inputs eligible inputs wait. Returns
# {available, id, lease, job, id, lease, job, ...}.
LEASE = (
    _PRELUDE
    + """
local queue, now, worker = ARGV[2], now_ms(), ARGV[10]
local max_items, max_tokens, min_inputs = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local mine = {}
for _, t in ipairs(cjson.decode(ARGV[8])) do mine[t] = true end
local take, available, items, tokens, full = {}, 0, 0, 0, false
local first, bounded = 0, false  -- the first job's class, and whether its budget bounds the call
local scanned, limit = 0, tonumber(ARGV[11])
local function enough() return full and available >= min_inputs end
for cls = 0, tonumber(ARGV[12]) - 1 do
  if enough() or scanned >= limit then break end
  local q = k('q', queue, cls)
  for _, id in ipairs(redis.call('ZRANGE', q, 0, limit - scanned - 1)) do
    scanned = scanned + 1
    local f = redis.call('HMGET', k('j', id), 'owner', 'tags', 'n', 'tok')
    if not alive(f[1]) then  -- its client's replica is gone (or the job is): nobody waits for it
      redis.call('ZREM', q, id)
      redis.call('DEL', k('j', id))
    else
      local eligible = true
      if f[2] ~= '' then
        for _, t in ipairs(cjson.decode(f[2])) do
          if not mine[t] then eligible = false end
        end
      end
      if eligible then
        local n, tok = tonumber(f[3]), tonumber(f[4])
        available = available + n
        if #take == 0 then  -- the first job's class is the most urgent waiting: its budget bounds the call
          local budget = tonumber(ARGV[13 + cls] or 0)
          if budget > 0 and (max_tokens == 0 or budget < max_tokens) then max_tokens = budget end
          first, bounded = cls, budget > 0
        end
        if not full then
          if #take > 0 and (items + n > max_items or (max_tokens > 0 and tokens + tok > max_tokens)
                            or (bounded and cls > first)) then
            full = true
          else
            table.insert(take, {id, cls})
            items, tokens = items + n, tokens + tok
          end
        end
        if enough() then break end
      end
    end
  end
end
local out = {available}
if available < min_inputs then return out end
local deadline = now + tonumber(ARGV[4])
for i, t in ipairs(take) do
  local id, cls = t[1], t[2]
  local j, vt, lease = k('j', id), k('vt', queue, cls), ARGV[9] .. '.' .. i
  redis.call('ZREM', k('q', queue, cls), id)
  local tag = tonumber(redis.call('HGET', j, 'tag'))
  if tag > tonumber(redis.call('HGET', vt, 'V') or 0) then redis.call('HSET', vt, 'V', num(tag)) end
  redis.call('HINCRBY', j, 'att', 1)
  redis.call('HSET', j, 'st', 'l', 'lease', lease, 'worker', worker)
  redis.call('ZADD', k('l', queue), deadline, id)
  redis.call('SADD', k('wl', worker), id)
  table.insert(out, id)
  table.insert(out, lease)
  table.insert(out, redis.call('HGET', j, 'job'))
end
return out
"""
)

# ARGV: P, job id, lease id, payload, result_ttl_ms, this replica, worker id, refused ('1': the
# gateway found the answer wrong), kind ('D' vectors, 'F' a failure), count (rows of vectors, or
# the failure's input index, -1 for none), max_attempts, shape (store.answer_shape).
# 0: not the worker's current lease (nothing changes); 1: stored for its owner; 2: the owner is
# this replica, which delivers the outcome itself (the job is gone from Redis); 3: refused, or it
# does not fit the job (store.fits: a row per input, an index within the inputs): back in line.
ANSWER = (
    _PRELUDE
    + """
local j = k('j', ARGV[2])
local f = redis.call('HMGET', j, 'lease', 'st', 'queue', 'owner', 'worker', 'n', 'w')
if f[2] ~= 'l' or f[1] ~= ARGV[3] or f[5] ~= ARGV[7] then return 0 end
unlease(ARGV[2], f[3], f[5])
local n, count = tonumber(f[6]), tonumber(ARGV[10])
-- A (de)tokenize job stored by a gateway before answer shapes ('t', 'x') has width '0'.
local shaped = ARGV[12] == f[7] or (f[7] == '0' and (ARGV[12] == 't' or ARGV[12] == 'x'))
local fits = (ARGV[9] == 'D' and count == n and shaped) or (ARGV[9] == 'F' and count < n)
if ARGV[8] == '1' or not fits then
  requeue_or_fail(ARGV[2], tonumber(ARGV[11]), 'refused', ARGV[5])
  return 3
end
if f[4] == ARGV[6] then
  redis.call('DEL', j)
  return 2
end
deliver(ARGV[2], f[4], ARGV[4], ARGV[5])
return 1
"""
)

# ARGV: P, job id, lease id, max_attempts, result_ttl_ms, worker id. 0: not the worker's
# current lease; else requeue_or_fail's outcome.
GIVE_BACK = (
    _PRELUDE
    + """
local f = redis.call('HMGET', k('j', ARGV[2]), 'lease', 'st', 'queue', 'worker')
if f[2] ~= 'l' or f[1] ~= ARGV[3] or f[4] ~= ARGV[6] then return 0 end
unlease(ARGV[2], f[3], f[4])
return requeue_or_fail(ARGV[2], tonumber(ARGV[4]), 'released', ARGV[5])
"""
)

# ARGV: P, worker id, max_attempts, result_ttl_ms. Every job the worker holds goes back in
# line (or fails, on its last attempt); returns {requeued, failed}.
RELEASE_WORKER = (
    _PRELUDE
    + """
local counts, worker = {0, 0}, ARGV[2]
for _, id in ipairs(redis.call('SMEMBERS', k('wl', worker))) do
  local f = redis.call('HMGET', k('j', id), 'st', 'worker', 'queue')
  if f[1] == 'l' and f[2] == worker then
    redis.call('ZREM', k('l', f[3]), id)
    tally(counts, requeue_or_fail(id, tonumber(ARGV[3]), 'departed', ARGV[4]))
  end
end
redis.call('DEL', k('wl', worker))
return counts
"""
)

# ARGV: P, (unused: Redis's clock decides), max_attempts, result_ttl_ms. Reclaims the expired leases of every queue;
# returns {requeued, failed, worker id, worker id, ...} (the workers whose leases expired).
EXPIRE = (
    _PRELUDE
    + """
local counts, workers, now = {0, 0}, {}, now_ms()
for _, queue in ipairs(redis.call('SMEMBERS', k('queues'))) do
  local lkey = k('l', queue)
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', lkey, '-inf', now, 'LIMIT', 0, 1000)) do
    redis.call('ZREM', lkey, id)
    local f = redis.call('HMGET', k('j', id), 'st', 'worker')
    if f[1] == 'l' then
      if f[2] and f[2] ~= '' then
        redis.call('SREM', k('wl', f[2]), id)
        workers[f[2]] = true
      end
      tally(counts, requeue_or_fail(id, tonumber(ARGV[3]), 'expired', ARGV[4]))
    end
  end
end
for worker in pairs(workers) do table.insert(counts, worker) end
return counts
"""
)

# ARGV: P, waiting_only ('1' or '0'), job ids... Takes the jobs out of Redis (only those still
# waiting, with waiting_only); returns the ids of the waiting ones it took.
WITHDRAW = (
    _PRELUDE
    + """
local out = {}
for i = 3, #ARGV do
  local id = ARGV[i]
  local j = k('j', id)
  local f = redis.call('HMGET', j, 'st', 'queue', 'cls', 'worker')
  if f[1] == 'w' then
    redis.call('ZREM', k('q', f[2], f[3]), id)
    redis.call('DEL', j)
    table.insert(out, id)
  elseif ARGV[2] == '0' and f[1] then
    if f[1] == 'l' then unlease(id, f[2], f[4]) end
    redis.call('DEL', j)
  end
end
return out
"""
)
