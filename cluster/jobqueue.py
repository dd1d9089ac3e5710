"""The job queue's own bookkeeping in Redis, beside the Celery messages that carry the jobs.

Celery (on the same Redis, through Ray Serve's task consumer) delivers each job to a JobRunner replica and
redelivers it if that replica never acknowledges it. What Celery does not know lives here, each operation one
atomic Lua script on the server's clock (Redis TIME), so every replica and node agrees:

- admission: the queued work, in image-steps (a job's cost is n x best_of x steps), in total and per API key,
  against the config's limits; the job's priority level (fast 0 / relax 6, +3 for a key's second and later
  queued jobs, so one key's flood queues behind everyone's first job); its place in line for position and ETA.
- leases: a runner claims a job (attempts += 1) and renews its lease while it runs; a lease that expires
  (the runner died) is taken by `expired()` exactly once, and that caller re-enqueues the job. A claim while
  another runner's lease is live is refused, so a duplicate delivery never runs a job twice at once.
- live state: the latest job record (JSON) and a short stream of its events for the SSE readers, the cancel
  flag, the dead letters (`imagine jobs dead`), counters, and the drain rate that Retry-After and ETAs use.

Keys (prefix `imagine:`): `cost` (hash: total, tier:<t>, key:<k>), `nqueued` (hash: key:<k>), `queued` (zset:
job -> level*1e12 + seq), `running` (zset: job -> lease expiry ms), `job:<id>` (hash), `events:<id>` (stream),
`done` (list of "ms cost"), `dead` (list of JSON), `stats` (hash: redelivered, dead), `seq`.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass

TIERS = {"fast": 0, "relax": 6}   # Celery priority levels on Redis: 0 is served first (steps 0, 3, 6, 9)
FOLLOW_ON = 3                      # added to the level of a key's second and later queued jobs
EVENTS_KEPT = 64                   # events per job kept for SSE readers that join late
KEEP_DONE_S = 24 * 3600            # a finished job's live state stays this long (S3 keeps the record)

_ADMIT = """
local p, job, key, tier, cost = ARGV[1], ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5])
local max_total, max_key, base = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
local total = tonumber(redis.call('HGET', p..'cost', 'total') or '0')
local mine = tonumber(redis.call('HGET', p..'cost', 'key:'..key) or '0')
if total + cost > max_total then return {0, 'total', total} end
if mine + cost > max_key then return {0, 'key', mine} end
redis.call('HINCRBY', p..'cost', 'total', cost)
redis.call('HINCRBY', p..'cost', 'key:'..key, cost)
redis.call('HINCRBY', p..'cost', 'tier:'..tier, cost)
local n = redis.call('HINCRBY', p..'nqueued', 'key:'..key, 1)
local level = base
if n > 1 then level = base + 3 end
local seq = redis.call('INCR', p..'seq')
local t = redis.call('TIME')
redis.call('ZADD', p..'queued', level * 1e12 + seq, job)
redis.call('HSET', p..'job:'..job, 'key', key, 'tier', tier, 'cost', cost, 'level', level, 'state', 'queued',
           'enqueued_ms', t[1] * 1000 + math.floor(t[2] / 1000), 'attempts', 0)
return {1, level, total + cost}
"""

_RELEASE = """
local p, job = ARGV[1], ARGV[2]
if redis.call('ZREM', p..'queued', job) == 0 then return 0 end
local h = p..'job:'..job
local key, tier, cost = redis.call('HGET', h, 'key'), redis.call('HGET', h, 'tier'), redis.call('HGET', h, 'cost')
redis.call('HINCRBY', p..'cost', 'total', -cost)
redis.call('HINCRBY', p..'cost', 'key:'..key, -cost)
redis.call('HINCRBY', p..'cost', 'tier:'..tier, -cost)
redis.call('HINCRBY', p..'nqueued', 'key:'..key, -1)
return 1
"""

_CLAIM = """
local p, job, owner, lease_ms = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local exp = redis.call('ZSCORE', p..'running', job)
if exp and tonumber(exp) > now then return 0 end
redis.call('ZADD', p..'running', now + lease_ms, job)
redis.call('HSET', p..'job:'..job, 'owner', owner, 'state', 'running')
return redis.call('HINCRBY', p..'job:'..job, 'attempts', 1)
"""

_RENEW = """
local p, job, owner, lease_ms = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local holder = redis.call('HGET', p..'job:'..job, 'owner')
if holder and holder ~= owner then return 0 end
if not holder then
  -- the lease ran out while this runner could not reach Redis and the job was re-enqueued, but nobody has
  -- claimed it: the runner takes it back (the redelivered message will find its live lease and be dropped)
  if redis.call('HGET', p..'job:'..job, 'state') ~= 'running' then return 0 end
  redis.call('HSET', p..'job:'..job, 'owner', owner)
end
local t = redis.call('TIME')
redis.call('ZADD', p..'running', t[1] * 1000 + math.floor(t[2] / 1000) + lease_ms, job)
return 1
"""

_FINISH = """
local p, job, owner, state, keep_s = ARGV[1], ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5])
local h = p..'job:'..job
if owner ~= '' and redis.call('HGET', h, 'owner') ~= owner then return 0 end
redis.call('ZREM', p..'running', job)
redis.call('HSET', h, 'state', state)
redis.call('HDEL', h, 'owner')
redis.call('EXPIRE', h, keep_s)
redis.call('EXPIRE', p..'events:'..job, keep_s)
if state == 'succeeded' then
  local t = redis.call('TIME')
  redis.call('LPUSH', p..'done', (t[1] * 1000 + math.floor(t[2] / 1000)) .. ' ' .. (redis.call('HGET', h, 'cost') or 0))
  redis.call('LTRIM', p..'done', 0, 49)
end
return 1
"""

_EXPIRED = """
local p, limit = ARGV[1], tonumber(ARGV[2])
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local jobs = redis.call('ZRANGEBYSCORE', p..'running', '-inf', now, 'LIMIT', 0, limit)
for _, job in ipairs(jobs) do
  redis.call('ZREM', p..'running', job)
  redis.call('HDEL', p..'job:'..job, 'owner')
  redis.call('HINCRBY', p..'stats', 'redelivered', 1)
end
return jobs
"""


@dataclass(frozen=True)
class Admission:
    ok: bool
    level: int = 0              # the Celery priority level of an admitted job
    queued_cost: int = 0        # image-steps queued (after admission; or the total that refused it)
    refused_by: str | None = None  # "total" or "key" when refused


class JobQueue:
    """The bookkeeping of one queue (see the module docstring); `client` is a redis-py client."""

    def __init__(self, client, max_queued_cost: int, max_queued_cost_per_key: int, prefix: str = "imagine:"):
        self.r, self.p = client, prefix
        self.max_queued_cost, self.max_queued_cost_per_key = max_queued_cost, max_queued_cost_per_key
        self._scripts = {name: client.register_script(src) for name, src in (
            ("admit", _ADMIT), ("release", _RELEASE), ("claim", _CLAIM), ("renew", _RENEW), ("finish", _FINISH),
            ("expired", _EXPIRED))}

    def _run(self, name: str, *args):
        return self._scripts[name](keys=[], args=[self.p, *args])

    def ping(self) -> bool:
        return bool(self.r.ping())

    # ---- admission and the line ---------------------------------------------------------------------
    def admit(self, job_id: str, key_id: str, tier: str, cost: int) -> Admission:
        ok, a, b = self._run("admit", job_id, key_id, tier, cost, self.max_queued_cost,
                             self.max_queued_cost_per_key, TIERS[tier])
        if ok:
            return Admission(True, level=int(a), queued_cost=int(b))
        return Admission(False, queued_cost=int(b), refused_by=a.decode() if isinstance(a, bytes) else a)

    def release(self, job_id: str) -> bool:
        """The job left the line (it starts, or was cancelled or refused): its cost leaves the totals. Idempotent."""
        return bool(self._run("release", job_id))

    def position(self, job_id: str) -> tuple[int, int] | None:
        """(jobs ahead, image-steps ahead) of a queued job; None when it is not queued."""
        rank = self.r.zrank(self.p + "queued", job_id)
        if rank is None:
            return None
        ahead = self.r.zrange(self.p + "queued", 0, rank - 1) if rank else []
        pipe = self.r.pipeline()
        for j in ahead:
            pipe.hget(self.p + "job:" + j.decode(), "cost")
        return rank, sum(int(c or 0) for c in pipe.execute())

    def drain_rate(self) -> float | None:
        """Image-steps finished per second over the last completions; None until two are known."""
        rows = [line.decode().split() for line in self.r.lrange(self.p + "done", 0, -1)]
        if len(rows) < 2:
            return None
        span_s = (int(rows[0][0]) - int(rows[-1][0])) / 1000
        done = sum(int(c) for _, c in rows[:-1])  # the oldest one only opens the window
        return done / span_s if span_s > 0 else None

    def wait_estimate_s(self, cost_ahead: int) -> float | None:
        rate = self.drain_rate()
        return cost_ahead / rate if rate else None

    def retry_after_s(self, excess_cost: int, default_s: int = 10) -> int:
        """How long until `excess_cost` image-steps have drained, at the measured rate (1 s .. 10 min)."""
        rate = self.drain_rate()
        return min(600, max(1, math.ceil(excess_cost / rate))) if rate else default_s

    # ---- running: leases ----------------------------------------------------------------------------
    def claim(self, job_id: str, owner: str, lease_s: float) -> int:
        """Take the job for `owner`: its attempt number, or 0 when another runner's lease on it is live."""
        return int(self._run("claim", job_id, owner, int(lease_s * 1000)))

    def renew(self, job_id: str, owner: str, lease_s: float) -> bool:
        """Extend the lease; False when another runner has claimed the job since (this run must stop). A lease
        that only expired (Redis was away) and was re-enqueued but not yet claimed is taken back."""
        return bool(self._run("renew", job_id, owner, int(lease_s * 1000)))

    def finish(self, job_id: str, state: str, owner: str = "") -> bool:
        """The job ended (`state`): its lease goes, its live state expires later; counted for the drain rate."""
        return bool(self._run("finish", job_id, owner, state, KEEP_DONE_S))

    def expired(self, limit: int = 20) -> list[str]:
        """Jobs whose lease ran out, each returned to exactly one caller, who must re-enqueue it."""
        return [j.decode() for j in self._run("expired", limit)]

    def keep_outcome(self, job_id: str, record_json: str) -> None:
        """A job's terminal record, kept until S3 has it (a delivery that finds it only writes it out)."""
        self.r.hset(self.p + "job:" + job_id, "outcome", record_json)

    def drop_outcome(self, job_id: str) -> None:
        self.r.hdel(self.p + "job:" + job_id, "outcome")

    def attempts(self, job_id: str) -> int:
        return int(self.r.hget(self.p + "job:" + job_id, "attempts") or 0)

    def info(self, job_id: str) -> dict[str, str]:
        return {k.decode(): v.decode() for k, v in self.r.hgetall(self.p + "job:" + job_id).items()}

    # ---- a key's jobs, newest first (the gallery's history) ------------------------------------------
    def index_job(self, key_id: str, job_id: str, created_at: float) -> None:
        self.r.zadd(self.p + "keyjobs:" + key_id, {job_id: created_at})

    def key_jobs(self, key_id: str, before: float | None = None, limit: int = 20) -> list[tuple[str, float]]:
        """(job id, created_at) of the key's jobs created before `before` (None: the newest), newest first."""
        top = f"({before}" if before is not None else "+inf"
        rows = self.r.zrevrangebyscore(self.p + "keyjobs:" + key_id, top, "-inf", start=0, num=limit,
                                       withscores=True)
        return [(j.decode(), score) for j, score in rows]

    # ---- cancel, live record, events ---------------------------------------------------------------
    def request_cancel(self, job_id: str) -> None:
        self.r.hset(self.p + "job:" + job_id, "cancel", 1)

    def cancel_requested(self, job_id: str) -> bool:
        return self.r.hget(self.p + "job:" + job_id, "cancel") is not None

    def publish(self, job_id: str, record: dict) -> None:
        """The job's latest record: kept for GET, appended to its event stream for SSE readers."""
        data = json.dumps(record)
        pipe = self.r.pipeline()
        pipe.hset(self.p + "job:" + job_id, "record", data)
        pipe.xadd(self.p + "events:" + job_id, {"record": data}, maxlen=EVENTS_KEPT, approximate=True)
        pipe.expire(self.p + "events:" + job_id, KEEP_DONE_S)
        pipe.execute()

    def live_record(self, job_id: str) -> dict | None:
        data = self.r.hget(self.p + "job:" + job_id, "record")
        return json.loads(data) if data else None

    def events(self, job_id: str, after: str = "0", block_ms: int = 15000) -> list[tuple[str, dict]]:
        """Records published after stream id `after` ("0": from the start), waiting up to block_ms for one."""
        answer = self.r.xread({self.p + "events:" + job_id: after}, block=block_ms)
        return [(eid.decode(), json.loads(fields[b"record"])) for _, entries in answer for eid, fields in entries]

    # ---- dead letters and numbers -----------------------------------------------------------------
    def bury(self, job_id: str, error: str, attempts: int) -> None:
        """The job gave up after its attempts: it goes to the dead-letter list (`imagine jobs dead`)."""
        entry = json.dumps({"job_id": job_id, "error": error[:500], "attempts": attempts, "at": time.time()})
        pipe = self.r.pipeline()
        pipe.lpush(self.p + "dead", entry)
        pipe.ltrim(self.p + "dead", 0, 9999)
        pipe.hincrby(self.p + "stats", "dead", 1)
        pipe.execute()

    def dead(self, limit: int = 100) -> list[dict]:
        return [json.loads(x) for x in self.r.lrange(self.p + "dead", 0, limit - 1)]

    def messages_waiting(self, queue_name: str) -> int:
        """Celery's messages not yet taken by any consumer: the lengths of the queue's Redis lists, one per
        priority step (kombu names them `<queue>` for 0 and `<queue>\\x06\\x16<n>` for 3, 6, 9)."""
        pipe = self.r.pipeline()
        for level in (0, 3, 6, 9):
            pipe.llen(queue_name + (f"\x06\x16{level}" if level else ""))
        return sum(pipe.execute())

    def stats(self) -> dict:
        """What `imagine status` and the metrics show: the line per tier, its oldest job, running, counters."""
        queued = self.r.zrange(self.p + "queued", 0, -1, withscores=True)
        pipe = self.r.pipeline()
        for job, _ in queued:
            pipe.hmget(self.p + "job:" + job.decode(), "tier", "enqueued_ms")
        rows = pipe.execute()
        now_ms = time.time() * 1000
        by_tier = {t: 0 for t in TIERS}
        for tier, _ in rows:
            by_tier[tier.decode() if tier else "fast"] += 1
        oldest = max((now_ms - int(ms) for _, ms in rows if ms), default=0.0) / 1000
        counters = {k.decode(): int(v) for k, v in self.r.hgetall(self.p + "stats").items()}
        cost = {k.decode(): int(v) for k, v in self.r.hgetall(self.p + "cost").items()}
        return {"queued": by_tier, "queued_image_steps": cost.get("total", 0), "oldest_queued_s": round(oldest, 1),
                "running": self.r.zcard(self.p + "running"), "redelivered": counters.get("redelivered", 0),
                "dead": counters.get("dead", 0), "drain_image_steps_per_s": self.drain_rate()}
