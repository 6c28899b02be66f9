"""Delayed and recurring jobs for the Python client (aio.py, client.py).

They are JetStream message schedules (nats-server >= 2.12) in the jobs
stream, as the Go client makes them (client/schedule.go): the server fires
them whether or not a node runs, so nothing here keeps time. The contract is
docs/protocol.md ("Jobs: schedules").
"""

from __future__ import annotations

import json
import re
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

import nats.errors
from nats.js import errors as jserrors

from .errors import BadRequest, Unavailable

if TYPE_CHECKING:
    from .aio import AsyncClient

H_SCHEDULE = "Nats-Schedule"
H_SCHEDULE_TARGET = "Nats-Schedule-Target"
H_CRON = "Pyfleet-Cron"
H_JOB_ID = "Pyfleet-Job-Id"
H_MSG_ID = "Nats-Msg-Id"
MIN_SERVER = (2, 12, 0)
# nats-server's error codes (server/jetstream_errors_generated.go).
ERR_SCHEDULES_DISABLED = 10188
ERR_PATTERN_INVALID = 10189
ERR_WRONG_LAST_SEQUENCE = 10071

_MACROS = ("@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly")
_DURATION = re.compile(r"^(\d+(\.\d+)?(ns|us|µs|ms|s|m|h))+$")
_UNIT = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def cron_pattern(expr: str) -> str:
    """The pattern nats-server takes for a recurring schedule, as
    protocol.CronPattern makes it: 5 fields (minute first) get a 0 seconds
    field, 6 fields (seconds first), ``@every <duration>`` (Go duration, at
    least 1s) and @hourly, @daily and the like pass. ValueError otherwise."""
    if not isinstance(expr, str):
        raise TypeError(f"cron must be a str, not {type(expr).__name__}")
    e = expr.strip()
    if e == "":
        raise ValueError(
            "cron: empty schedule: want 5 fields (minute hour day month weekday), 6 (seconds first), "
            "@every <duration> or @hourly/@daily/@weekly/@monthly/@yearly"
        )
    if e.startswith("@every "):
        d = e[len("@every "):].strip()
        if not _DURATION.match(d):
            raise ValueError(f"cron {expr!r}: {d!r} is not a duration such as 90s, 5m or 1h30m")
        secs = sum(float(n) * _UNIT[u] for n, _, u in re.findall(r"(\d+(\.\d+)?)(ns|us|µs|ms|s|m|h)", d))
        if secs < 1:
            raise ValueError(f"cron {expr!r}: the interval must be at least 1s")
        return "@every " + d
    if e.startswith("@"):
        if e in _MACROS:
            return e
        raise ValueError(f"cron {expr!r}: unknown macro: want @every <duration>, {', '.join(_MACROS)}")
    fields = e.split()
    if len(fields) == 5:
        return "0 " + " ".join(fields)
    if len(fields) == 6:
        return " ".join(fields)
    raise ValueError(f"cron {expr!r}: {len(fields)} fields: want 5 (minute hour day month weekday) or 6 (seconds first)")


def _rfc3339(t: datetime) -> str:
    return t.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def due_time(job_id: str, delay: float | None, at: datetime | None) -> datetime | None:
    """When a job submitted with delay (seconds) or at (an aware datetime,
    or a naive one in local time) is due, or None for neither."""
    if delay is None and at is None:
        return None
    if delay is not None and at is not None:
        raise ValueError(f"job {job_id}: give delay or at, not both")
    now = datetime.now(timezone.utc)
    if delay is not None:
        if isinstance(delay, timedelta):
            delay = delay.total_seconds()
        if not isinstance(delay, (int, float)) or isinstance(delay, bool) or not delay > 0:
            raise ValueError(f"job {job_id}: delay {delay!r}: want a positive number of seconds")
        return now + timedelta(seconds=float(delay))
    if not isinstance(at, datetime):
        raise TypeError(f"at must be a datetime, not {type(at).__name__}")
    if at.tzinfo is None:
        at = at.astimezone()  # local time, as datetime.now() gives it
    if at <= now:
        raise ValueError(f"job {job_id}: at {at.isoformat()} is in the past (now {now.isoformat(timespec='seconds')})")
    return at.astimezone(timezone.utc)


def check_server(c: AsyncClient) -> None:
    """Refuses schedules on a server that would keep them as plain messages
    that never fire."""
    v = c._nc_or_raise().connected_server_version
    try:
        have = (v.major, v.minor, v.patch)
    except Exception:  # an unreadable version: let the server decide
        return
    if have < MIN_SERVER:
        raise Unavailable(
            f"delayed and recurring jobs need nats-server >= 2.12 (JetStream message schedules); "
            f"the server is {v}",
            type="NoSchedules",
        )


def delay_headers(c: AsyncClient, subject: str, job_id: str, due: datetime, headers: dict[str, str]) -> str:
    """Makes the headers of a job about to be published those of the
    schedule that publishes it when due, and returns the schedule's subject.
    The id goes in Pyfleet-Job-Id: the server strips Nats-Msg-Id from what
    a schedule produces."""
    check_server(c)
    headers[H_SCHEDULE] = "@at " + _rfc3339(due)
    headers[H_SCHEDULE_TARGET] = subject
    headers[H_JOB_ID] = job_id
    return f"{c.prefix}.sched.{c.pool}.at.{job_id}"


async def jobs_stream(c: AsyncClient) -> str:
    return await c._stream_for(f"{c.prefix}.sched.{c.pool}.cron._", "jobs")


def schedules_disabled(c: AsyncClient) -> Unavailable:
    name = f"{c.prefix.replace('.', '_').upper()}_JOBS"
    return Unavailable(
        f"the jobs stream {name} does not allow message schedules: start a poolnode of this version, "
        f"which enables them, or run `nats stream edit {name} --allow-schedules`",
        type="NoSchedules",
    )


async def schedule(
    c: AsyncClient,
    name: str,
    cron: str,
    function: str,
    payload: Any,
    raw: bool,
    timeout: float | None,
    reply_to: str | None,
) -> dict[str, Any]:
    from .aio import check_header, check_timeout, check_token, encode, millis

    check_token("schedule name", name)
    check_token("function", function)
    pattern = cron_pattern(cron)
    body = encode(payload, raw)
    headers = {H_SCHEDULE: pattern, H_SCHEDULE_TARGET: f"{c.prefix}.job.{c.pool}.{function}", H_CRON: cron.strip()}
    if timeout is not None:
        headers["Pyfleet-Timeout"] = millis(check_timeout(timeout, 0))
    if reply_to is not None:
        headers["Pyfleet-Reply-To"] = check_header("reply_to", reply_to)
    check_server(c)
    js = c._js_or_raise()
    subject = f"{c.prefix}.sched.{c.pool}.cron.{name}"
    try:
        ack = await js.publish(subject, body, timeout=10.0, headers=headers)
    except jserrors.NoStreamResponseError:
        await c._explain_no_jetstream()
        raise Unavailable(f"no stream stores {subject}: is a poolnode running?", type="NoStream") from None
    except jserrors.APIError as exc:
        if exc.err_code == ERR_PATTERN_INVALID:
            raise BadRequest(f"schedule {name}: cron {cron!r} ({pattern}): the NATS server refuses the pattern") from None
        if exc.err_code == ERR_SCHEDULES_DISABLED:
            raise schedules_disabled(c) from None
        raise
    return {"name": name, "cron": cron.strip(), "pattern": pattern, "function": function,
            "payload": _payload(body), "created": _rfc3339(datetime.now(timezone.utc)), "seq": ack.seq}


def _payload(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        return body


async def schedules(c: AsyncClient) -> list[dict[str, Any]]:
    js = c._js_or_raise()
    stream = await jobs_stream(c)
    prefix = f"{c.prefix}.sched.{c.pool}.cron."
    info = await js.stream_info(stream, subjects_filter=prefix + "*")
    out = []
    for subject in (info.state.subjects or {}):
        try:
            m = await js.get_last_msg(stream, subject)
        except jserrors.NotFoundError:
            continue  # removed meanwhile
        h = m.headers or {}
        if not h.get(H_SCHEDULE):
            continue
        out.append({
            "name": subject[len(prefix):],
            "cron": h.get(H_CRON, ""),
            "pattern": h[H_SCHEDULE],
            "function": h.get(H_SCHEDULE_TARGET, "").removeprefix(f"{c.prefix}.job.{c.pool}."),
            "payload": _payload(m.data or b""),
            "created": _rfc3339(m.time) if m.time else None,
            "seq": m.seq,
        })
    return sorted(out, key=lambda s: s["name"])


async def unschedule(c: AsyncClient, name: str) -> bool:
    from .aio import check_token

    check_token("schedule name", name)
    js = c._js_or_raise()
    stream = await jobs_stream(c)
    subject = f"{c.prefix}.sched.{c.pool}.cron.{name}"
    try:
        m = await js.get_last_msg(stream, subject)
    except jserrors.NotFoundError:
        return False
    if not (m.headers or {}).get(H_SCHEDULE):
        return False
    await js.purge_stream(stream, subject=subject)
    return True


async def fire_cancelled(c: AsyncClient, job_id: str) -> None:
    """Makes the schedule of a delayed job that was just cancelled fire now,
    if it has not fired: the node that takes it sees the cancel and settles
    it without running it, storing the cancelled result ``result()`` reads.
    The expected last sequence makes this a no-op if it fires meanwhile."""
    js = c._js_or_raise()
    try:
        stream = await jobs_stream(c)
    except Unavailable:
        return
    subject = f"{c.prefix}.sched.{c.pool}.at.{job_id}"
    try:
        m = await js.get_last_msg(stream, subject)
    except jserrors.NotFoundError:
        return  # not a delayed job, or fired already
    h = dict(m.headers or {})
    if not h.get(H_SCHEDULE):
        return
    for k in list(h):
        if k == H_MSG_ID or k.startswith("Nats-Expected") or k == "Nats-Rollup":
            del h[k]
    h[H_SCHEDULE] = "@at " + _rfc3339(datetime.now(timezone.utc))
    h["Nats-Expected-Last-Subject-Sequence"] = str(m.seq)
    try:
        await js.publish(subject, m.data or b"", timeout=10.0, headers=h)
    except jserrors.APIError as exc:
        if exc.err_code == ERR_WRONG_LAST_SEQUENCE:
            return  # it fired meanwhile; the node sees the cancel
        raise
    except nats.errors.TimeoutError:
        raise Unavailable(
            f"job {job_id} is cancelled, but its schedule could not be moved (it will be settled when due)",
            type="NoAck",
        ) from None

