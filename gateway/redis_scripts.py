"""The Lua scripts of the Redis queue: every change of a job's state is one atomic script, so two
replicas (or a replica and a lease call) can never hand one job to two workers, nor requeue it twice.

Keys, all under the configured prefix P (a single Redis; Redis Cluster is not supported):

    P:q:<queue>      list   waiting job ids, oldest first (requeued jobs go back to the front)
    P:l:<queue>      zset   leased job ids, scored by lease deadline (ms since the epoch)
    P:queues         set    every queue key, for the expiry sweep
    P:j:<job>        hash   one job: queue, owner, job (JSON), tags, n, tok, att, lease, st, res
    P:r:<replica>    list   ids of answered jobs whose owner is <replica> (its client waits)
    P:alive:<rep>    string present while replica <rep> runs (refreshed every second)

A job's ``st`` is ``w`` (waiting), ``l`` (leased) or ``d`` (answered: ``res`` holds the outcome
until its owner takes it). A job whose owner replica is gone is dropped, not computed.
Every script gets P as ARGV[1].
"""

from __future__ import annotations

_PRELUDE = """
local P = ARGV[1]
local function k(...) return table.concat({P, ...}, ':') end
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
  redis.call('HSET', k('j', id), 'st', 'd', 'res', payload, 'lease', '')
  redis.call('PEXPIRE', k('j', id), ttl)
  local r = k('r', owner)
  redis.call('RPUSH', r, id)
  redis.call('PEXPIRE', r, ttl)
end
-- Back to the front of its queue (telling waiting leases), or failed if that was its last
-- attempt: 1 requeued, 2 failed.
local function requeue_or_fail(id, queue, attempts, owner, max_attempts, why, ttl)
  if attempts < max_attempts then
    redis.call('HSET', k('j', id), 'st', 'w', 'lease', '')
    redis.call('LPUSH', k('q', queue), id)
    redis.call('PUBLISH', k('events'), 'jobs ' .. redis.call('HGET', k('j', id), 'n') .. ' ' .. queue)
    return 1
  end
  local message = 'no worker finished this job in ' .. attempts .. ' attempts (its last lease ' .. why .. ')'
  deliver(id, owner, 'F' .. cjson.encode({code = 'attempts_exhausted', message = message}), ttl)
  return 2
end
-- Reclaim the expired leases of one queue: returns requeued, failed.
local function expire(queue, now, max_attempts, why, ttl)
  local requeued, failed = 0, 0
  local lkey = k('l', queue)
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', lkey, '-inf', now, 'LIMIT', 0, 1000)) do
    redis.call('ZREM', lkey, id)
    local f = redis.call('HMGET', k('j', id), 'att', 'owner', 'st')
    if f[3] == 'l' then
      if not alive(f[2]) then
        redis.call('DEL', k('j', id))
      elseif requeue_or_fail(id, queue, tonumber(f[1]), f[2], max_attempts, why, ttl) == 1 then
        requeued = requeued + 1
      else
        failed = failed + 1
      end
    end
  end
  return requeued, failed
end
"""

# ARGV: P, queue, owner, front ('1': requeue at the front), then per job: id, n, tok, tags, job.
# Stores the jobs, queues them, and publishes "jobs <inputs> <queue>" for waiting leases.
ENQUEUE = _PRELUDE + """
local queue, owner, q = ARGV[2], ARGV[3], k('q', ARGV[2])
local inputs = 0
for i = 5, #ARGV, 5 do
  redis.call('HSET', k('j', ARGV[i]), 'queue', queue, 'owner', owner, 'st', 'w', 'lease', '', 'att', 0,
             'n', ARGV[i + 1], 'tok', ARGV[i + 2], 'tags', ARGV[i + 3], 'job', ARGV[i + 4])
  inputs = inputs + tonumber(ARGV[i + 1])
end
if ARGV[4] == '1' then
  for i = #ARGV - 4, 5, -5 do redis.call('LPUSH', q, ARGV[i]) end
else
  for i = 5, #ARGV, 5 do redis.call('RPUSH', q, ARGV[i]) end
end
redis.call('SADD', k('queues'), queue)
redis.call('PUBLISH', k('events'), 'jobs ' .. inputs .. ' ' .. queue)
"""

# ARGV: P, queue, now_ms, lease_ttl_ms, max_items, max_tokens (0: none), min_inputs, worker tags
# (JSON list), max_attempts, result_ttl_ms, lease id base, expiry reason, scan limit.
# Takes nothing unless at least min_inputs eligible inputs wait. Returns
# {requeued, failed, available, id, lease, job, id, lease, job, ...}.
LEASE = _PRELUDE + """
local queue, now = ARGV[2], tonumber(ARGV[3])
local requeued, failed = expire(queue, now, tonumber(ARGV[9]), ARGV[12], ARGV[10])
local max_items, max_tokens, min_inputs = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local mine = {}
for _, t in ipairs(cjson.decode(ARGV[8])) do mine[t] = true end
local q = k('q', queue)
local take, available, items, tokens, full = {}, 0, 0, 0, false
for _, id in ipairs(redis.call('LRANGE', q, 0, tonumber(ARGV[13]) - 1)) do
  local f = redis.call('HMGET', k('j', id), 'owner', 'tags', 'n', 'tok')
  if not alive(f[1]) then  -- its client's replica is gone (or the job is): nobody waits for it
    redis.call('LREM', q, 1, id)
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
      if not full then
        if #take > 0 and (items + n > max_items or (max_tokens > 0 and tokens + tok > max_tokens)) then
          full = true
        else
          table.insert(take, id)
          items, tokens = items + n, tokens + tok
        end
      end
      if full and available >= min_inputs then break end
    end
  end
end
local out = {requeued, failed, available}
if available < min_inputs then return out end
local deadline = now + tonumber(ARGV[4])
for i, id in ipairs(take) do
  local lease = ARGV[11] .. '.' .. i
  redis.call('LREM', q, 1, id)
  redis.call('HINCRBY', k('j', id), 'att', 1)
  redis.call('HSET', k('j', id), 'st', 'l', 'lease', lease)
  redis.call('ZADD', k('l', queue), deadline, id)
  table.insert(out, id)
  table.insert(out, lease)
  table.insert(out, redis.call('HGET', k('j', id), 'job'))
end
return out
"""

# ARGV: P, job id, lease id, payload, result_ttl_ms, this replica.
# 0: not the current lease (nothing changes); 1: stored for its owner; 2: the owner is this
# replica, which delivers the payload itself (the job is gone from Redis).
ANSWER = _PRELUDE + """
local j = k('j', ARGV[2])
local f = redis.call('HMGET', j, 'lease', 'st', 'queue', 'owner')
if f[2] ~= 'l' or f[1] ~= ARGV[3] then return 0 end
redis.call('ZREM', k('l', f[3]), ARGV[2])
if f[4] == ARGV[6] then
  redis.call('DEL', j)
  return 2
end
deliver(ARGV[2], f[4], ARGV[4], ARGV[5])
return 1
"""

# ARGV: P, job id, lease id, max_attempts, result_ttl_ms. 0: not the current lease;
# 1: requeued; 2: failed (that was its last attempt).
RELEASE = _PRELUDE + """
local j = k('j', ARGV[2])
local f = redis.call('HMGET', j, 'lease', 'st', 'queue', 'owner', 'att')
if f[2] ~= 'l' or f[1] ~= ARGV[3] then return 0 end
redis.call('ZREM', k('l', f[3]), ARGV[2])
return requeue_or_fail(ARGV[2], f[3], tonumber(f[5]), f[4], tonumber(ARGV[4]), 'was given back', ARGV[5])
"""

# ARGV: P, waiting_only ('1' or '0'), job ids... Takes the jobs out of Redis (only those still
# waiting, with waiting_only); returns the ids of the waiting ones it took.
WITHDRAW = _PRELUDE + """
local out = {}
for i = 3, #ARGV do
  local id = ARGV[i]
  local j = k('j', id)
  local f = redis.call('HMGET', j, 'st', 'queue')
  if f[1] == 'w' then
    redis.call('LREM', k('q', f[2]), 1, id)
    redis.call('DEL', j)
    table.insert(out, id)
  elseif ARGV[2] == '0' and f[1] then
    if f[1] == 'l' then redis.call('ZREM', k('l', f[2]), id) end
    redis.call('DEL', j)
  end
end
return out
"""

# ARGV: P, now_ms, max_attempts, result_ttl_ms, expiry reason. Reclaims expired leases of every
# queue; returns {requeued, failed}.
EXPIRE = _PRELUDE + """
local requeued, failed = 0, 0
for _, queue in ipairs(redis.call('SMEMBERS', k('queues'))) do
  local r, f = expire(queue, tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[5], ARGV[4])
  requeued, failed = requeued + r, failed + f
end
return {requeued, failed}
"""
