"""Customer emails (P8): written to an outbox with the event, sent over SMTP later.

The outbox row commits in the same transaction as the failure it reports, so a
crash can never lose the email or send one for a failure that did not happen.
Senders in several sidecars take rows with SKIP LOCKED; delivery is at least
once (a crash after SMTP accepted and before the row is marked repeats it).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
from dataclasses import dataclass, field
from email.message import EmailMessage

import aiosmtplib
import asyncpg

from balance_gate import metrics
from balance_gate.postgres_store import Connection

log = logging.getLogger(__name__)

_MAX_BACKOFF_S = 3_600


@dataclass(frozen=True, slots=True)
class SmtpConfig:
    host: str
    port: int
    sender: str
    username: str | None
    password: str | None = field(repr=False)  # never in a log line or a repr
    starttls: bool
    timeout_s: float = 10.0


async def queue_email(
    conn: Connection, account_id: str, kind: str, subject: str, body: str
) -> bool:
    """Add an email to the outbox in the caller's transaction; False without an address."""
    address = await conn.fetchval(
        "SELECT billing_email FROM accounts WHERE account_id = $1", account_id
    )
    if not address:
        log.warning("account %r has no billing email; %s not sent", account_id, kind)
        return False
    await conn.execute(
        """INSERT INTO email_outbox (account_id, kind, to_address, subject, body)
           VALUES ($1, $2, $3, $4, $5)""",
        account_id,
        kind,
        address,
        subject,
        body,
    )
    return True


def top_up_failed(account_id: str, decline_reason: str, paused: bool) -> tuple[str, str]:
    subject = "Your automatic top-up failed"
    body = (
        f"We could not charge your card for an automatic top-up of account {account_id}.\n"
        f"The card network returned: {decline_reason}\n\n"
    )
    if paused:
        body += (
            "After repeated failures, automatic top-up is now paused. Update your payment\n"
            "method and re-enable automatic top-up to resume it.\n"
        )
    else:
        body += "We will try the same card again with your next request.\n"
    return subject, body


class EmailSender:
    def __init__(self, pool: asyncpg.Pool, smtp: SmtpConfig | None, batch: int = 50) -> None:
        self._pool = pool
        self._smtp = smtp
        self._batch = batch

    async def run(self, stop: asyncio.Event, interval_s: float = 1.0) -> None:
        while not stop.is_set():
            try:
                await self.send_due()
            except Exception:  # keep sending; the next round retries
                log.exception("email sender failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval_s)

    async def send_due(self) -> int:
        """Send what is due; return how many were delivered now."""
        backlog = await self._pool.fetchval(
            "SELECT count(*) FROM email_outbox WHERE sent_at IS NULL"
        )
        metrics.EMAIL_BACKLOG.set(backlog)
        if self._smtp is None:
            return 0
        sent = 0
        async with self._pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(
                """SELECT email_id, to_address, subject, body, attempts FROM email_outbox
                   WHERE sent_at IS NULL AND next_attempt_at <= now()
                   ORDER BY email_id LIMIT $1 FOR UPDATE SKIP LOCKED""",
                self._batch,
            )
            for row in rows:
                if await self._deliver(conn, row):
                    sent += 1
        return sent

    async def _deliver(self, conn: Connection, row: asyncpg.Record) -> bool:
        assert self._smtp is not None
        message = EmailMessage()
        message["From"] = self._smtp.sender
        message["To"] = row["to_address"]
        message["Subject"] = row["subject"]
        message.set_content(row["body"])
        try:
            await aiosmtplib.send(
                message,
                hostname=self._smtp.host,
                port=self._smtp.port,
                username=self._smtp.username,
                password=self._smtp.password,
                start_tls=self._smtp.starttls,
                timeout=self._smtp.timeout_s,
            )
        except (aiosmtplib.SMTPException, OSError) as exc:
            delay = dt.timedelta(seconds=min(_MAX_BACKOFF_S, 2 ** min(row["attempts"], 12)))
            await conn.execute(
                """UPDATE email_outbox SET attempts = attempts + 1, last_error = $2,
                                           next_attempt_at = now() + $3
                   WHERE email_id = $1""",
                row["email_id"],
                str(exc)[:500],
                delay,
            )
            metrics.EMAILS.labels("failed").inc()
            return False
        await conn.execute(
            "UPDATE email_outbox SET sent_at = now(), attempts = attempts + 1 WHERE email_id = $1",
            row["email_id"],
        )
        metrics.EMAILS.labels("sent").inc()
        return True
