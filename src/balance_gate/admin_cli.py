"""`balance-gate admin ...`: the operators' CLI over the admin gRPC API.

One subcommand per RPC of `balance_gate.v1.Admin`, built from the protobuf
descriptors: each field of the request becomes a named option, so a new RPC or
field shows up here without new code (COMMANDS names it and says what it does).

- Amounts (`*_micros` fields) are decimal strings in units of the currency,
  `--amount 12.50`, or micro-units, `--amount-micros 12500000`. Both are parsed
  exactly (regular expression and integers; never a float).
- Commands that move money (Credit, TopUp, RefundTopUp) take
  `--idempotency-key`. Without one, a key is generated and printed on stderr,
  so a retry of a call whose outcome is unknown can reuse it.
- Output is a table (amounts in units of the currency) or, with `--json`, one
  JSON object with every field (amounts as integer micros).
- An RPC error is `error: <STATUS>: <message>` on stderr and exit status 1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any, cast

import grpc
from google.protobuf.descriptor import (
    Descriptor,
    EnumDescriptor,
    FieldDescriptor,
    MethodDescriptor,
)
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from google.protobuf.timestamp_pb2 import Timestamp

from balance_gate.client import Connection
from balance_gate.v1 import admin_pb2

ADMIN_ADDRESS_DEFAULT = "127.0.0.1:50052"
TOKEN_ENV = "BALANCE_GATE_ADMIN_TOKEN"
TIMEOUT_S_DEFAULT = 10.0
MICROS_PER_UNIT = 1_000_000
INT64_MAX = 2**63 - 1
INT32_MAX = 2**31 - 1
# A decimal amount: an optional sign, digits, at most 6 decimals (micro-units).
_DECIMAL = re.compile(r"^(-?)(\d{1,15})(?:\.(\d{1,6}))?$")

SERVICE = admin_pb2.DESCRIPTOR.services_by_name["Admin"]


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    required: tuple[str, ...] = ()
    # Fields that are output only, or set another way.
    skip: tuple[str, ...] = ()


# RPC name -> its subcommand. A test checks that every RPC of Admin is here.
COMMANDS: dict[str, Command] = {
    "CreateAccount": Command(
        "create-account", "create an account (currency: ISO 4217, default USD)", ("account_id",)
    ),
    "GetAccount": Command("get-account", "show an account and its balance", ("account_id",)),
    "Credit": Command(
        "credit",
        "credit (or, negative, debit) an account: an operator's adjustment, idempotent on"
        " --idempotency-key",
        ("account_id", "amount_micros", "reason"),
    ),
    "SetAccountStatus": Command(
        "set-status", "enable or disable an account", ("account_id", "status")
    ),
    "SetPaymentMethods": Command(
        "set-payment-methods",
        "set the primary and (optional) backup payment-method tokens",
        ("account_id", "primary"),
    ),
    "SetAccountTimeZone": Command(
        "set-time-zone",
        "set the IANA time zone of the account's day (daily caps, invoice months)",
        ("account_id", "time_zone"),
    ),
    "SetCreditValidity": Command(
        "set-credit-validity",
        "set how many days new credit lots stay valid (0: never expire)",
        ("account_id", "days"),
    ),
    "SetBillingEmail": Command(
        "set-billing-email", "set where failure emails go", ("account_id", "email")
    ),
    "SetAutoTopUp": Command(
        "set-auto-top-up",
        "configure auto top-up (amounts in the account's currency; a daily cap is required"
        " to enable it)",
        ("account_id",),
    ),
    "ResumeAutoTopUp": Command(
        "resume-auto-top-up",
        "re-enable a paused auto top-up and clear its failure count",
        ("account_id",),
    ),
    "TopUp": Command(
        "top-up",
        "charge the default card now (amount in the account's currency), idempotent on"
        " --idempotency-key",
        ("account_id", "amount_micros"),
    ),
    "RefundTopUp": Command(
        "refund-top-up",
        "refund the unconsumed part of a succeeded top-up (amount 0: all of it), in USD",
        ("top_up_id", "reason"),
    ),
    "FileAbuseAppeal": Command(
        "file-abuse-appeal",
        "file a customer's appeal against the auto top-ups of the last 7 days",
        ("account_id", "description"),
    ),
    "ResolveAbuseAppeal": Command(
        "resolve-abuse-appeal",
        "confirm (--confirmed: refund and pause) or reject (--no-confirmed) an appeal",
        ("appeal_id", "confirmed"),
    ),
    "SetCreditLine": Command(
        "set-credit-line",
        "create or replace the account's credit line (limit in USD)",
        ("account_id",),
        skip=("next_review_on",),
    ),
    "GetCreditLine": Command("get-credit-line", "show the account's credit line", ("account_id",)),
    "ListCreditReviews": Command(
        "list-reviews", "list the account's credit reviews", ("account_id",)
    ),
    "CloseCreditReview": Command(
        "close-review",
        "close a credit review with a decision (and, optionally, a new limit)",
        ("review_id", "decision"),
    ),
    "MarkInvoiceOverdue": Command("mark-overdue", "mark an invoice overdue", ("invoice_number",)),
    "MarkInvoicePaid": Command("mark-paid", "mark an invoice paid", ("invoice_number",)),
    "ListTopUps": Command("list-top-ups", "list the account's top-ups", ("account_id",)),
    "ListInvoices": Command("list-invoices", "list the account's invoices", ("account_id",)),
    "MonthlyReport": Command(
        "monthly-report",
        "top-ups, invoices, usage and credit lots of one month",
        ("account_id", "month"),
    ),
    "SetFxRates": Command(
        "set-fx-rates",
        "store one day's FX rates from a base currency: --rate USD=1.0842 ...",
        ("date", "base", "rates"),
    ),
}

_FIELD_HELP = {
    "currency": "ISO 4217 code",
    "reason": "why (shown in the ledger)",
    "idempotency_key": "the retry key; generated and printed when left out",
    "status": "the account status",
    "time_zone": "IANA name, e.g. Europe/Berlin",
    "month": "YYYY-MM, in the account's time zone",
    "date": "YYYY-MM-DD",
    "rates": "QUOTE=RATE, e.g. USD=1.0842 (a decimal string); repeat for each quote",
    "force_reason": "why rates far from the last ones are right (else they are refused)",
    "high_cost_capabilities": "a high-cost capability; repeat for each",
    "primary": "payment-method token, e.g. pm_card_visa",
    "backup": "payment-method token tried after the primary failed 3 times",
}


class UsageError(Exception):
    """Bad command-line input found after parsing; printed like argparse's errors."""


# --- parsing ----------------------------------------------------------------


def parse_units(text: str) -> int:
    """`12.50` -> 12_500_000 micros, exactly; at most 6 decimals."""
    match = _DECIMAL.match(text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(
            f"expected a decimal amount with at most 6 decimals, e.g. 12.50, got {text!r}"
        )
    sign, whole, fraction = match.groups()
    micros = int(whole) * MICROS_PER_UNIT + int((fraction or "").ljust(6, "0"))
    return -micros if sign else micros


def parse_micros(text: str) -> int:
    try:
        value = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if abs(value) > INT64_MAX:
        raise argparse.ArgumentTypeError(f"must be within ±{INT64_MAX}, got {text}")
    return value


def _int_of(bound: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = parse_micros(text)
        if abs(value) > bound:
            raise argparse.ArgumentTypeError(f"must be within ±{bound}, got {text}")
        return value

    return parse


def _pair(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def format_units(micros: int) -> str:
    """12_500_000 -> `12.50`; 7_500 -> `0.0075`: exact, at least 2 decimals."""
    units = Decimal(micros).scaleb(-6)
    text = f"{units:f}"
    whole, _, fraction = text.partition(".")
    fraction = fraction.rstrip("0").ljust(2, "0")
    return f"{whole}.{fraction}"


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def _is_amount(field: FieldDescriptor) -> bool:
    return field.type == FieldDescriptor.TYPE_INT64 and field.name.endswith("_micros")


def _is_map(field: FieldDescriptor) -> bool:
    return (
        field.type == FieldDescriptor.TYPE_MESSAGE and _message_type(field).GetOptions().map_entry
    )


def _add_field(
    parser: argparse.ArgumentParser, field: FieldDescriptor, prefix: str, required: bool
) -> None:
    """Add the option(s) of one request field; dest is the field's dotted path."""
    dest = prefix + field.name
    flag = _option(dest.replace(".", "_"))
    label = _FIELD_HELP.get(field.name, field.name.replace("_", " "))
    if field.type == FieldDescriptor.TYPE_MESSAGE and not _is_map(field):
        for sub in _message_type(field).fields:
            _add_field(parser, sub, dest + ".", False)
        return
    if _is_amount(field):
        base = flag.removesuffix("-micros")
        group = parser.add_mutually_exclusive_group(required=required)
        group.add_argument(
            base,
            dest=dest,
            type=parse_units,
            metavar="UNITS",
            help=f"{label.removesuffix(' micros')}: a decimal amount, e.g. 12.50",
        )
        group.add_argument(
            flag, dest=dest, type=parse_micros, metavar="MICROS", help="the same in micro-units"
        )
        return
    kwargs: dict[str, Any] = {"dest": dest, "required": required, "help": label}
    if _is_map(field):
        kwargs.update(type=_pair, action="append", metavar="KEY=VALUE")
        flag = flag.removesuffix("s")  # --rate USD=1.0842 --rate GBP=0.8571
    elif field.is_repeated:
        kwargs.update(action="append", metavar="VALUE")
        flag = flag.removesuffix("s")  # --high-cost-capability X --high-cost-capability Y
    elif field.type == FieldDescriptor.TYPE_BOOL:
        kwargs.update(action=argparse.BooleanOptionalAction)
    elif field.type == FieldDescriptor.TYPE_ENUM:
        prefix_len = len(_enum_prefix(field))
        kwargs.update(
            choices=[v.name[prefix_len:].lower() for v in _enum_type(field).values if v.number],
        )
    elif field.type in (FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_UINT64):
        kwargs.update(type=_int_of(INT64_MAX), metavar="N")
    elif field.type == FieldDescriptor.TYPE_INT32:
        kwargs.update(type=_int_of(INT32_MAX), metavar="N")
    parser.add_argument(flag, **kwargs)


def _enum_prefix(field: FieldDescriptor) -> str:
    """`ACCOUNT_STATUS_` for AccountStatus: its zero value without `UNSPECIFIED`."""
    return _enum_type(field).values_by_number[0].name.removesuffix("UNSPECIFIED")


def _message_type(field: FieldDescriptor) -> Descriptor:
    assert field.message_type is not None, field.name
    return field.message_type


def _enum_type(field: FieldDescriptor) -> EnumDescriptor:
    assert field.enum_type is not None, field.name
    return field.enum_type


def _fields(message: Message) -> Sequence[FieldDescriptor]:
    return cast(Sequence[FieldDescriptor], message.DESCRIPTOR.fields)


def _connection_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("connection")
    group.add_argument(
        "--admin",
        metavar="ADDRESS",
        default=os.environ.get("BALANCE_GATE_ADMIN_LISTEN") or ADMIN_ADDRESS_DEFAULT,
        help="host:port of the admin API (default: $BALANCE_GATE_ADMIN_LISTEN or %(default)s)",
    )
    group.add_argument(
        "--token", help=f"admin bearer token (default: ${TOKEN_ENV}); prefer --token-file"
    )
    group.add_argument(
        "--token-file",
        help="file holding the token: its first line that is not blank or a # comment",
    )
    group.add_argument("--cacert", help="PEM CA certificates: connect with TLS")
    group.add_argument("--cert", help="PEM client certificate (mutual TLS; with --key)")
    group.add_argument("--key", help="PEM private key of --cert")
    group.add_argument(
        "--server-name", help="the name the server certificate must carry, if not ADDRESS's host"
    )
    group.add_argument(
        "--timeout", type=float, default=TIMEOUT_S_DEFAULT, help="seconds (default %(default)s)"
    )
    group.add_argument("--json", action="store_true", help="print JSON (amounts as integer micros)")
    return common


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`admin` and its subcommands, one per RPC of balance_gate.v1.Admin."""
    admin = commands.add_parser(
        "admin",
        help="operator commands over the admin gRPC API (accounts, credit, top-ups, ...)",
        description="Operator commands over the admin gRPC API. Amounts: --amount 12.50"
        " (units) or --amount-micros 12500000. Connection options go after the command.",
    )
    sub = admin.add_subparsers(dest="admin_command", required=True, metavar="COMMAND")
    common = _connection_options()
    for method in SERVICE.methods:
        command = COMMANDS[method.name]
        parser = sub.add_parser(
            command.name,
            help=command.help,
            description=f"{command.help} (Admin/{method.name}).",
            parents=[common],
        )
        for field in method.input_type.fields:
            if field.name not in command.skip:
                _add_field(parser, field, "", field.name in command.required)
        parser.set_defaults(admin_method=method)


# --- the call ---------------------------------------------------------------


def _read_token(args: argparse.Namespace) -> str:
    if args.token:
        return str(args.token)
    if args.token_file:
        try:
            lines = Path(args.token_file).read_text().splitlines()
        except OSError as exc:
            raise UsageError(
                f"--token-file: cannot read {args.token_file}: {exc.strerror}"
            ) from None
        for line in lines:
            if line.strip() and not line.lstrip().startswith("#"):
                return line.strip()
        raise UsageError(f"--token-file: {args.token_file} holds no token")
    return os.environ.get(TOKEN_ENV, "")


def connection_of(args: argparse.Namespace) -> Connection:
    try:
        return Connection(
            args.admin,
            ca_file=args.cacert or "",
            cert_file=args.cert or "",
            key_file=args.key or "",
            token=_read_token(args),
            server_name=args.server_name or "",
        )
    except ValueError as exc:
        raise UsageError(str(exc).replace("ca_file", "--cacert")) from None


def build_request(method: MethodDescriptor, args: argparse.Namespace) -> Message:
    request = GetMessageClass(method.input_type)()
    values = {k: v for k, v in vars(args).items() if v is not None}
    _fill(request, method.input_type, values, "")
    return request


def _fill(message: Message, descriptor: Descriptor, values: dict[str, Any], prefix: str) -> None:
    for field in descriptor.fields:
        dest = prefix + field.name
        if field.type == FieldDescriptor.TYPE_MESSAGE and not _is_map(field):
            if any(key.startswith(dest + ".") for key in values):
                _fill(getattr(message, field.name), _message_type(field), values, dest + ".")
            continue
        if dest not in values:
            continue
        value = values[dest]
        if _is_map(field):
            getattr(message, field.name).update(dict(value))
        elif field.is_repeated:
            getattr(message, field.name).extend(value)
        elif field.type == FieldDescriptor.TYPE_ENUM:
            setattr(message, field.name, _enum_prefix(field) + str(value).upper())
        else:
            setattr(message, field.name, value)


def _ensure_idempotency_key(request: Message) -> None:
    """A money-moving call without a key gets one, printed so a retry can reuse it."""
    fields = request.DESCRIPTOR.fields_by_name
    if "idempotency_key" in fields and not getattr(request, "idempotency_key"):  # noqa: B009
        key = f"cli-{uuid.uuid4().hex}"
        setattr(request, "idempotency_key", key)  # noqa: B010
        print(
            f"idempotency key: {key}; to retry this call, pass --idempotency-key {key}",
            file=sys.stderr,
        )


async def _call(
    connection: Connection, method: MethodDescriptor, request: Message, timeout_s: float
) -> Message:
    response_class = GetMessageClass(method.output_type)
    async with connection.channel() as channel:
        call = channel.unary_unary(
            f"/{SERVICE.full_name}/{method.name}",
            request_serializer=lambda message: message.SerializeToString(),
            response_deserializer=response_class.FromString,
        )
        response = await call(request, timeout=timeout_s, metadata=connection.metadata)
    assert isinstance(response, Message)
    return response


# --- output -----------------------------------------------------------------


def to_json(message: Message) -> dict[str, Any]:
    """Every field, integers as JSON numbers (micros stay exact), enums by name."""
    out: dict[str, Any] = {}
    for field in _fields(message):
        value = getattr(message, field.name)
        if _is_map(field):
            out[field.name] = dict(sorted(value.items()))
        elif field.is_repeated and field.type == FieldDescriptor.TYPE_MESSAGE:
            out[field.name] = [to_json(item) for item in value]
        elif field.is_repeated:
            out[field.name] = list(value)
        elif field.has_presence and not message.HasField(field.name):
            out[field.name] = None
        elif isinstance(value, Timestamp):
            out[field.name] = value.ToJsonString()
        elif isinstance(value, Message):
            out[field.name] = to_json(value)
        elif field.type == FieldDescriptor.TYPE_ENUM:
            out[field.name] = _enum_type(field).values_by_number[value].name
        else:
            out[field.name] = value
    return out


def _rows(message: Message, prefix: str = "") -> list[tuple[str, str]]:
    """(name, text) of every field, nested messages flattened, amounts in units."""
    rows: list[tuple[str, str]] = []
    for field in _fields(message):
        name = prefix + field.name
        value = getattr(message, field.name)
        if _is_map(field):
            rows.append((name, ", ".join(f"{k}={v}" for k, v in sorted(value.items()))))
        elif field.is_repeated:
            rows.append((name, ", ".join(str(item) for item in value)))
        elif field.has_presence and not message.HasField(field.name):
            rows.append((name.removesuffix("_micros"), ""))
        elif isinstance(value, Timestamp):
            rows.append((name, value.ToJsonString()))
        elif isinstance(value, Message):
            rows.extend(_rows(value, name + "."))
        elif field.type == FieldDescriptor.TYPE_ENUM:
            full = _enum_type(field).values_by_number[value].name
            rows.append((name, full[len(_enum_prefix(field)) :].lower()))
        elif _is_amount(field):
            rows.append((name.removesuffix("_micros"), format_units(value)))
        elif isinstance(value, bool):
            rows.append((name, "yes" if value else "no"))
        else:
            rows.append((name, str(value)))
    return rows


def format_table(message: Message) -> str:
    """One message: a field/value table. A list answer: one row per item."""
    fields = _fields(message)
    if not fields:
        return "ok"
    if (
        len(fields) == 1
        and fields[0].is_repeated
        and fields[0].type == FieldDescriptor.TYPE_MESSAGE
    ):
        items = list(getattr(message, fields[0].name))
        if not items:
            return f"no {fields[0].name.replace('_', ' ')}"
        table = [_rows(item) for item in items]
        header = [name for name, _ in table[0]]
        return _grid([header, *([text for _, text in row] for row in table)])
    return _grid([[name, text] for name, text in _rows(message)])


def _grid(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


# --- entry point ------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    """Run one `balance-gate admin <command>`; the exit status."""
    method: MethodDescriptor = args.admin_method
    try:
        connection = connection_of(args)
        request = build_request(method, args)
    except (UsageError, ValueError, TypeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    _ensure_idempotency_key(request)
    try:
        response = asyncio.run(_call(connection, method, request, args.timeout))
    except grpc.aio.AioRpcError as exc:
        print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    except OSError as exc:  # e.g. a --cacert that cannot be read
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(to_json(response), indent=2, ensure_ascii=False))
    else:
        print(format_table(response))
    return 0
