"""P8: a failed auto top-up emails the customer at once with the decline reason,
through a real SMTP server; delivery is retried while the server is down."""

from __future__ import annotations

from collections.abc import Iterator
from email import message_from_bytes
from email.message import Message

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

from balance_gate.app import App
from balance_gate.devservers import free_port
from balance_gate.emails import EmailSender, SmtpConfig
from tests.helpers import USD, fund, rid


class Inbox:
    def __init__(self) -> None:
        self.messages: list[Message] = []

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        assert isinstance(envelope.content, bytes)
        self.messages.append(message_from_bytes(envelope.content))
        return "250 OK"


@pytest.fixture
def smtp_server() -> Iterator[tuple[Inbox, int]]:
    inbox, port = Inbox(), free_port()
    controller = Controller(inbox, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield inbox, port
    finally:
        controller.stop()


def _config(port: int) -> SmtpConfig:
    return SmtpConfig("127.0.0.1", port, "billing@gate.test", None, None, starttls=False)


async def _declined_auto_top_up(app: App, account_id: str, card: str) -> None:
    await app.hot.ensure_top_up_groups()
    await fund(app, account_id, 10 * USD)
    await app.topups.set_billing_email(account_id, f"ops+{account_id}@customer.test")
    await app.topups.set_payment_methods(account_id, card, "")
    await app.topups.set_auto_top_up(account_id, True, 5 * USD, 20 * USD, 100 * USD, 0)
    await app.gate.authorize(account_id, rid(), 6 * USD, "")


async def test_p8_a_declined_top_up_emails_the_decline_reason(
    app: App, smtp_server: tuple[Inbox, int]
) -> None:
    inbox, port = smtp_server
    await _declined_auto_top_up(app, "mailme", "pm_card_insufficient_funds")
    assert await app.topups.auto("mailme", 0) == "insufficient_funds"

    sender = EmailSender(app.pool, _config(port))
    assert await sender.send_due() == 1
    [message] = inbox.messages
    assert message["To"] == "ops+mailme@customer.test"
    assert message["From"] == "billing@gate.test"
    body = message.get_payload(decode=True)
    assert isinstance(body, bytes)
    assert b"insufficient_funds" in body
    assert await sender.send_due() == 0  # sent once


async def test_p11_pausing_auto_top_up_says_so_by_email(
    app: App, smtp_server: tuple[Inbox, int]
) -> None:
    inbox, port = smtp_server
    await _declined_auto_top_up(app, "paused", "pm_card_declined")
    for _ in range(3):
        await app.topups.auto("paused", 0)
    assert await EmailSender(app.pool, _config(port)).send_due() == 3
    assert [m["Subject"] for m in inbox.messages] == ["Your automatic top-up failed"] * 3
    last = inbox.messages[-1].get_payload(decode=True)
    assert isinstance(last, bytes)
    assert b"now paused" in last
    kinds = await app.pool.fetch("SELECT kind FROM email_outbox ORDER BY email_id")
    assert [k["kind"] for k in kinds] == ["top_up_failed"] * 2 + ["auto_top_up_paused"]


async def test_emails_wait_in_the_outbox_while_smtp_is_down(app: App) -> None:
    await _declined_auto_top_up(app, "later", "pm_card_declined")
    await app.topups.auto("later", 0)
    down = EmailSender(app.pool, _config(free_port()))  # nothing listens there
    assert await down.send_due() == 0
    row = await app.pool.fetchrow("SELECT attempts, last_error, sent_at FROM email_outbox")
    assert row is not None
    assert (row["attempts"], row["sent_at"]) == (1, None)
    assert row["last_error"]
